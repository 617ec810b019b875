#!/usr/bin/env bash
# Workflow 4 — perturbation effectiveness: how does the damage grow with the number of weights
# perturbed (k-curve) and with the strength of the perturbation (scale curve), for the top-k
# against matched controls over seeds? Then the effect sizes (difference, ratio, interval, z).
source "$(dirname "$0")/_common.sh"
cwa score --model "$MODEL" --metric grad_x_weight "${SCORE_DATA[@]}" --experiment effectiveness
cwa rank latest:score --topk "$TOPK"
k_small=$(( TOPK / 100 > 0 ? TOPK / 100 : 1 )); k_mid=$(( TOPK / 10 > 0 ? TOPK / 10 : 1 ))
cwa perturb latest:rank --method sign_flip --k-values "$k_small,$k_mid,$TOPK" \
    --controls random_k,bottom_k --seeds "$SEEDS" --tasks perplexity,hellaswag --limit "$LIMIT"
cwa perturb latest:rank --method scale --scales 0,0.5,2,4 --controls random_k \
    --seeds "$SEEDS" --tasks perplexity --limit "$LIMIT"
perturbs=$(cwa --json runs list --stage perturb --experiment effectiveness \
    | python -c "import json,sys; print(' '.join(r['run_id'] for r in json.load(sys.stdin)))")
# shellcheck disable=SC2086  # several run ids
cwa analyze effects $perturbs
# shellcheck disable=SC2086
cwa report $perturbs --out "$OUT/report"
finish
