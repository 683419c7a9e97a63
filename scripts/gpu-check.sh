#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, install the GPU extra in its own venv and run
# the LLM bench (CUDA vLLM vs transformers), one GPU worker's encoder and SASRec throughput (what
# `cotrec plan` uses for GPU stages), the ranker bench and the demo main job on CUDA, every JSON
# under one folder. `make gpu-check DRY_RUN=1` (or `scripts/gpu-check.sh --dry-run`) prints
# the plan without running it, on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
VENV=${GPU_VENV:-.venv-gpu}
OUT=${OUT:-bench/gpu-check}
RUN_DIR=${RUN_DIR:-runs/gpu-demo}
COTREC="$VENV/bin/cotrec"
# One GPU: every engine and the fine-tune on it, one Train worker; bf16 is native on CUDA.
CUDA=(--set llm.device=cuda --set extract.gpus_per_actor=1 --set extract.max_actors=1
      --set ranker.gpus_per_worker=1 --set ranker.num_workers=1 --set ranker.precision=bf16
      --set retriever.gpus_per_worker=0)

step() {
    echo "+ $*"
    if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

if [[ "$DRY_RUN" != 1 ]] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed); --dry-run prints the plan" >&2
    exit 2
fi
step mkdir -p "$OUT"
step make venv VENV="$VENV" EXTRAS=gpu,dev
step "$COTREC" bench llm --set llm.device=cuda --backends vllm:eager,transformers --rounds 3 --out "$OUT/llm.json"
step "$COTREC" bench models --config gpu-cluster --parts encoder,sasrec,users --set embed.device=cuda \
     --set embed.gpus_per_actor=1 --rounds 5 --texts 8192 --sasrec-steps 200 --out "$OUT/models.json"
step env VLLM_LOGGING_LEVEL=WARNING "$COTREC" run --config demo --run-dir "$RUN_DIR" "${CUDA[@]}"
step "$COTREC" bench ranker --config demo --run-dir "$RUN_DIR" --set llm.device=cuda --out "$OUT/ranker.json"
step cp "$RUN_DIR/reports/stages.json" "$OUT/demo-stages.json"
step cp "$RUN_DIR/reports/summary.md" "$OUT/demo-summary.md"
echo "gpu-check: $( [[ "$DRY_RUN" == 1 ]] && echo "plan printed (dry run)" || echo "figures in $OUT" )"
