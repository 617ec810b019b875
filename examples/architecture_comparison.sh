#!/usr/bin/env bash
# Workflow 2 — architecture comparison: where do critical weights sit in a GPT-2-layout model
# (fused c_attn, learned positions) and in a Llama-layout one (separate q/k/v/o, gated MLP,
# grouped-query attention)? One experiment per model, each profiled and reported, then one SQL
# query puts the component shares side by side.
source "$(dirname "$0")/_common.sh"
for model in ${MODELS:-toy toy-llama}; do
    label="arch-$model"
    cwa score --model "$model" --metric grad_x_weight "${SCORE_DATA[@]}" --experiment "$label"
    cwa rank latest:score --topk "$TOPK"
    cwa analyze profile latest:score
    cwa report --experiment "$label" --out "$OUT/$model"
done
cwa sql "SELECT r.model_ref AS model, p.component, round(100 * p.share, 2) AS pct_of_mass,
                round(p.mean / m.mean, 2) AS density_vs_model
         FROM analysis_profile p
         JOIN runs r ON r.run_id = p.score_run_id
         JOIN analysis_profile m ON m.run_id = p.run_id AND m.level = 'model'
         WHERE p.level = 'component' ORDER BY model, pct_of_mass DESC"
for model in ${MODELS:-toy toy-llama}; do
    echo "report: $OUT/$model/report.html"
done
