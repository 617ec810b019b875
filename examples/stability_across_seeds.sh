#!/usr/bin/env bash
# Workflow 3 — stability across seeds: are the critical weights the same when the calibration
# sample changes? One score run per seed (no dropout: scoring runs in eval mode, so seeds vary
# only the data), then top-k agreement (Jaccard, RBO, with a bootstrap interval over runs),
# per-tensor drift between two seeds, rank correlation between all of them, and the report.
source "$(dirname "$0")/_common.sh"
cwa score --model "$MODEL" --metric grad_x_weight "${SCORE_DATA[@]}" --seeds "$SEEDS" \
    --experiment seeds
cwa analyze stability --experiment seeds --k-values "100,1000,10000,0.1%"
first=$(cwa --json runs list --stage score --experiment seeds \
    | python -c "import json,sys; print(' '.join(r['run_id'] for r in json.load(sys.stdin)[-2:]))")
# shellcheck disable=SC2086  # two run ids
cwa analyze drift $first
cwa analyze correlation --experiment seeds
cwa report --experiment seeds --out "$OUT/report"
finish
