#!/usr/bin/env bash
# Workflow 5 — comprehensive analysis: the original runner's Quick Start, nearly verbatim, in one
# command: every analysis switch, results and the report under --out-dir.
source "$(dirname "$0")/_common.sh"
cwa run --model "$MODEL" --metric grad_x_weight --topk "$TOPK" --seeds "$SEEDS" \
    "${SCORE_DATA[@]}" --limit "$LIMIT" \
    --weight-analysis --architecture-analysis --temporal-stability --downstream-tasks \
    --advanced-perturbations --save-plots --out-dir "$OUT/report"
finish
