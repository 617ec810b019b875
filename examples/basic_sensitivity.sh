#!/usr/bin/env bash
# Workflow 1 — basic sensitivity analysis: which weights matter most, and does perturbing them
# hurt more than perturbing random or least-sensitive weights of the same number?
#   score (grad_x_weight) -> rank the global top-k -> perturb (sign flip) against random_k and
#   bottom_k over three seeds -> profile the scores -> report.
source "$(dirname "$0")/_common.sh"
cwa score --model "$MODEL" --metric grad_x_weight "${SCORE_DATA[@]}" --experiment basic
cwa rank latest:score --topk "$TOPK" --export "$OUT/top_weights.csv"
cwa perturb latest:rank --method sign_flip --controls random_k,bottom_k --seeds "$SEEDS" \
    --tasks perplexity,hellaswag,lambada --limit "$LIMIT"
cwa analyze profile latest:score
cwa report latest:perturb --out "$OUT/report"
finish
