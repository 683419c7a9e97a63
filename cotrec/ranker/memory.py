"""Memory the ranker's fine-tune and merge need, estimated from the base model's size.

`cotrec plan` prints it per GPU and per host, and the merge task asks Ray for its host share, so a
7B merge is placed on a node that holds it instead of wherever a CPU is free. The estimate:

  parameters P   counted from the weights' safetensors headers when the model is on this machine,
                 else from its config.json (a Llama/Qwen/Mistral decoder: embeddings, attention,
                 gated MLP, norms), else from the "7B" in its name (then the LoRA size and the
                 activations are not known and say so)
  fine-tune      per Train worker: the frozen base in the training precision (bf16 2 bytes, fp32 4),
                 partitioned over the workers only at ZeRO-3; the LoRA parameters L (exact from the
                 shapes of the targeted projections) in float32 with their gradients (partitioned
                 at ZeRO-2 and up), Adam's two moments and, under bf16, a float32 master copy
                 (partitioned at ZeRO-1 and up); activations of one micro-batch at
                 `llm.max_model_len` tokens (the longest prompt the config allows): per layer and
                 token (16 + 6 I / H) H values (hidden width H, MLP width I; attention scores are
                 not kept by PyTorch's fused attention), all layers without gradient checkpointing,
                 one layer plus each layer's input with it. On a GPU the host holds the base model
                 once while it loads; on CPUs the host holds all of it.
  merge          the base in float32 (merged in float32) on the worker's device, plus on the host the
                 checkpoint in `ranker.merged_dtype` as it is written.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypedDict

GIB = 1024 ** 3
BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2,
         "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# config.json fields of the gpu-cluster preset's model, so a machine that has not fetched it (a laptop
# sizing a cluster) plans it from its shapes rather than from its name.
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-7B-Instruct": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                 "tie_word_embeddings": False, "model_type": "qwen2"},
}
SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([BbMm])(?![a-zA-Z])")
# LoRA parameters as a share of the base where the architecture is unknown: above what r <= 64 on the
# attention projections adds to any decoder of this family.
UNKNOWN_LORA_SHARE = 0.01


@dataclass(frozen=True)
class ModelShape:
    """A decoder's parameter count and, when its config is known, the widths the estimate uses."""

    parameters: int
    source: str
    config: Optional[dict[str, Any]] = None

    def width(self, key: str) -> int:
        return int(self.config[key])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.width("hidden_size") // self.width("num_attention_heads"))


def safetensors_parameters(folder: Path) -> Optional[int]:
    """Parameters in a folder's safetensors files, from their headers (nothing else is read)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for size in entry["shape"]:
                    count *= size
                total += count
    return total


def config_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama-family decoder from its config.json: embeddings (and an untied head),
    per layer q/k/v/o (k/v over the key-value heads; biases on q/k/v for Qwen2), a gated MLP and two
    norms, and the final norm."""
    shape = ModelShape(0, "", config)
    hidden, layers, mlp = shape.width("hidden_size"), shape.width("num_hidden_layers"), shape.width("intermediate_size")
    heads = shape.width("num_attention_heads")
    kv = int(config.get("num_key_value_heads") or heads)
    q_width, kv_width = heads * shape.head_dim, kv * shape.head_dim
    attention = 2 * hidden * q_width + 2 * hidden * kv_width
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        attention += q_width + 2 * kv_width
    embeddings = shape.width("vocab_size") * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers * (attention + 3 * hidden * mlp + 2 * hidden) + embeddings + hidden


def _local_folder(name: str) -> Optional[Path]:
    """The model's folder on this machine: the embedded model, a path, or the Hugging Face cache."""
    from cotrec.llm.embedded import EMBEDDED_NAMES, resolve_model

    if name in EMBEDDED_NAMES or Path(name).expanduser().is_dir():
        return Path(resolve_model(name))
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not an id the hub library accepts: a path that is not there, a URI
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_shape(name: str) -> Optional[ModelShape]:
    """The base model's size as `llm.model` names it; None when nothing tells it."""
    folder = _local_folder(name)
    config = None
    if folder is not None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        counted = safetensors_parameters(folder)
        if counted:
            return ModelShape(counted, f"its weights ({folder})", config)
    config = config or KNOWN_CONFIGS.get(name)
    if config is not None:
        try:
            return ModelShape(config_parameters(config), "its config.json", config)
        except (KeyError, TypeError, ValueError):
            pass  # not a decoder of the family the formula knows: try the name
    match = SIZE_IN_NAME.search(Path(name).name)
    if match:
        scale = 1e9 if match.group(2).lower() == "b" else 1e6
        return ModelShape(int(float(match.group(1)) * scale), f"the {match.group(0)} in its name")
    return None


def lora_parameters(shape: ModelShape, targets: list[str], r: int) -> int:
    """LoRA parameters: r x (in + out) for each targeted projection of every layer."""
    if shape.config is None:
        return int(shape.parameters * UNKNOWN_LORA_SHARE)
    hidden, mlp = shape.width("hidden_size"), shape.width("intermediate_size")
    heads = shape.width("num_attention_heads")
    kv = int(shape.config.get("num_key_value_heads") or heads)
    q_width, kv_width = heads * shape.head_dim, kv * shape.head_dim
    sizes = {"q_proj": hidden + q_width, "k_proj": hidden + kv_width, "v_proj": hidden + kv_width,
             "o_proj": q_width + hidden, "gate_proj": hidden + mlp, "up_proj": hidden + mlp, "down_proj": mlp + hidden}
    return shape.width("num_hidden_layers") * r * sum(sizes.get(t, 0) for t in targets)


def activation_bytes(shape: ModelShape, tokens: int, value_bytes: int, checkpointing: bool) -> Optional[int]:
    """Activations kept for the backward pass of `tokens` tokens (a micro-batch's prompts)."""
    if shape.config is None:
        return None
    hidden, mlp, layers = shape.width("hidden_size"), shape.width("intermediate_size"), shape.width("num_hidden_layers")
    per_layer = tokens * hidden * (16 + 6 * mlp / hidden) * value_bytes
    if checkpointing:  # each layer's input, and one layer recomputed at a time
        return int(layers * tokens * hidden * value_bytes + per_layer)
    return int(layers * per_layer)


class FinetuneMemory(TypedDict):
    """`finetune_memory`: one fine-tune worker's parameters and bytes (None: not on that device, or unknown)."""

    parameters: int
    lora_parameters: int
    base_bytes: int
    lora_state_bytes: int
    activation_bytes: Optional[int]
    tokens: int
    gpu_bytes: Optional[int]
    host_bytes: int


class MergeMemory(TypedDict):
    """`merge_memory`: bytes on the merge's GPU (None: it runs on the host) and host."""

    gpu_bytes: Optional[int]
    host_bytes: int


def finetune_memory(shape: ModelShape, ranker: Any, max_tokens: int, precision: str) -> FinetuneMemory:
    """Bytes per GPU and per host of one fine-tune worker (`precision`: bf16 or fp32, resolved)."""
    workers, stage = max(1, ranker.num_workers), ranker.zero_stage
    weight_bytes = BYTES[precision]
    base = shape.parameters * weight_bytes / (workers if stage == 3 else 1)
    lora = lora_parameters(shape, ranker.lora_targets, ranker.lora_r)
    states = (lora * 4 / (workers if stage == 3 else 1) + lora * 4 / (workers if stage >= 2 else 1)
              + lora * (8 + (4 if precision == "bf16" else 0)) / (workers if stage >= 1 else 1))
    activations = activation_bytes(shape, ranker.micro_batch * max_tokens, weight_bytes, ranker.gradient_checkpointing)
    device = base + states + (activations or 0)
    on_gpu = ranker.gpus_per_worker > 0
    return {"parameters": shape.parameters, "lora_parameters": lora, "base_bytes": int(base), "lora_state_bytes": int(states),
            "activation_bytes": activations, "tokens": max_tokens, "gpu_bytes": int(device) if on_gpu else None,
            "host_bytes": int(shape.parameters * weight_bytes if on_gpu else device)}


def merge_memory(shape: ModelShape, merged_dtype: str, on_gpu: bool) -> MergeMemory:
    """Bytes on the merge's device and host: the base in float32, and the checkpoint written."""
    merged = shape.parameters * 4
    written = shape.parameters * BYTES[merged_dtype]
    return {"gpu_bytes": merged if on_gpu else None, "host_bytes": written if on_gpu else merged + written}


def merge_request_bytes(base_path: str, merged_dtype: str, on_gpu: bool) -> Optional[int]:
    """What the merge task asks Ray for: its host estimate and 1 GiB for the libraries; None when the
    model's size is unknown."""
    shape = model_shape(base_path)
    return None if shape is None else int(merge_memory(shape, merged_dtype, on_gpu)["host_bytes"] + GIB)
