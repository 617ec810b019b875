# Shared settings of the example workflows (sourced, not run). Every example runs offline on
# the built-in toy models; override the sizes for a quick run, e.g.
#   LIMIT=20 N_SAMPLES=8 bash examples/basic_sensitivity.sh
# or point MODEL at a Hugging Face name or folder (then also DATA=hf:... or a local file).
set -euo pipefail
MODEL="${MODEL:-toy}"
DATA="${DATA:-toy}"
LIMIT="${LIMIT:-200}"          # items per evaluation task
N_SAMPLES="${N_SAMPLES:-32}"   # calibration sequences
SEQ_LEN="${SEQ_LEN:-128}"
SEEDS="${SEEDS:-0,1,2}"
TOPK="${TOPK:-263}"            # 0.05% of the toy model's 526,336 weights
OUT="${OUT:-results/$(basename "$0" .sh)}"
export CWA_STORE="${CWA_STORE:-$OUT/store}"
mkdir -p "$OUT"
SCORE_DATA=(--data "$DATA" --n-samples "$N_SAMPLES" --seq-len "$SEQ_LEN")
finish() {
    echo "report: $OUT/report/report.html (open it in a browser; it is self-contained)"
}
