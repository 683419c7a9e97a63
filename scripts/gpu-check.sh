#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, install the GPU extra in its own venv and run
# the LLM bench (CUDA vLLM vs transformers), one GPU worker's encoder and SASRec throughput (what
# `cotrec plan` uses for GPU stages), the ranker bench and the demo main job on CUDA, every JSON
# under one folder. Every step's config is loaded and validated before the first one runs, so a
# step the config check refuses stops the check at its start, not an hour in. `make gpu-check
# DRY_RUN=1` (or `scripts/gpu-check.sh --dry-run`) prints the plan and validates every step's
# config on any machine with `.venv` (CHECK_PYTHON names another Python that imports cotrec).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
VENV=${GPU_VENV:-.venv-gpu}
OUT=${OUT:-bench/gpu-check}
RUN_DIR=${RUN_DIR:-runs/gpu-demo}
COTREC="$VENV/bin/cotrec"
# One GPU: every engine and the fine-tune on it, one Train worker; bf16 is native on CUDA. The
# benches run their engines in-process, but the config check places every CUDA engine the config
# names, so they take the same settings as the demo.
CUDA=(--set llm.device=cuda --set extract.gpus_per_actor=1 --set extract.max_actors=1
      --set ranker.gpus_per_worker=1 --set ranker.num_workers=1 --set ranker.precision=bf16
      --set retriever.gpus_per_worker=0)

LLM=(bench llm "${CUDA[@]}" --backends vllm:eager,transformers --rounds 3 --out "$OUT/llm.json")
MODELS=(bench models --config gpu-cluster --parts encoder,sasrec,users --set embed.device=cuda
        --set embed.gpus_per_actor=1 --rounds 5 --texts 8192 --sasrec-steps 200 --out "$OUT/models.json")
DEMO=(run --config demo --run-dir "$RUN_DIR" "${CUDA[@]}")
RANKER=(bench ranker --config demo --run-dir "$RUN_DIR" "${CUDA[@]}" --out "$OUT/ranker.json")

step() {
    echo "+ $*"
    if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

# The --config and --set arguments of a cotrec command line, through `cotrec config`: the loader and
# validator every command uses (a command without --config reads the demo preset, as here).
validate() {
    local python=$1 name=$2; shift 2
    local args=() error
    while (($#)); do
        case $1 in
            --config|-c|--set) args+=("$1" "$2"); shift 2 ;;
            *) shift ;;
        esac
    done
    if ! error=$("$python" -m cotrec config "${args[@]}" 2>&1 >/dev/null); then
        echo "gpu-check: step \`cotrec $name\`: ${error#cotrec: error: }" >&2
        exit 2
    fi
}

if [[ "$DRY_RUN" != 1 ]] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed); --dry-run prints the plan" >&2
    exit 2
fi
if [[ "$DRY_RUN" == 1 ]]; then
    CHECK_PYTHON=${CHECK_PYTHON:-.venv/bin/python}
    if [[ ! -x "$CHECK_PYTHON" ]]; then
        echo "gpu-check: the dry run validates each step's config with $CHECK_PYTHON, which is not there; run \`make venv\` or set CHECK_PYTHON" >&2
        exit 2
    fi
else
    CHECK_PYTHON="$VENV/bin/python"
fi
step mkdir -p "$OUT"
step make venv VENV="$VENV" EXTRAS=gpu,dev
for command in LLM MODELS DEMO RANKER; do
    declare -n words=$command
    validate "$CHECK_PYTHON" "${words[*]:0:2}" "${words[@]}"
done
echo "gpu-check: every step's config validates"
step "$COTREC" "${LLM[@]}"
step "$COTREC" "${MODELS[@]}"
step env VLLM_LOGGING_LEVEL=WARNING "$COTREC" "${DEMO[@]}"
step "$COTREC" "${RANKER[@]}"
step cp "$RUN_DIR/reports/stages.json" "$OUT/demo-stages.json"
step cp "$RUN_DIR/reports/summary.md" "$OUT/demo-summary.md"
echo "gpu-check: $( [[ "$DRY_RUN" == 1 ]] && echo "plan printed (dry run)" || echo "figures in $OUT" )"
