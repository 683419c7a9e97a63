"""Where and how a backend loads its model: the local path, the device and the dtype.

Shared by every in-process backend and by the vLLM server launcher, so they all resolve a
config the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cotrec.config import LLMConfig
from cotrec.llm.embedded import resolve_model


@dataclass(frozen=True)
class Placement:
    path: str  # a local model folder or an HF id
    device: str  # cpu | cuda
    dtype: str  # bfloat16 | float16 | float32

    def __iter__(self):  # path, device, dtype = resolve_placement(config)
        return iter((self.path, self.device, self.dtype))


def usable_cores() -> int:
    """The cores this process may run on (a cpuset or affinity mask can allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def give_engine_every_core(config: LLMConfig) -> None:
    """Call in a Ray actor before its engine starts: Ray caps an actor's OpenMP threads at its CPU
    share, and an engine on CPU wants the cores it may use (its processes inherit the setting)."""
    os.environ["OMP_NUM_THREADS"] = str(config.threads or usable_cores())


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


NATIVE_BF16_LEVELS = ("amx", "avx512_bf16")  # the cpu_isa levels that compute bfloat16 natively
# each level with the /proc/cpuinfo flag that marks it, widest first; "other" is none of them
ISA_FLAGS = (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"))
CPU_ISA_LEVELS = (*(level for level, _ in ISA_FLAGS), "other")


def cpu_isa(flags: set[str] | None = None) -> str:
    """The CPU's widest vector level that matters here: amx, avx512_bf16, avx512, avx2 or other
    (bfloat16 results differ between the first two and the rest). `flags`: /proc/cpuinfo's."""
    if flags is None:
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                line = next((line for line in cpuinfo if line.startswith("flags")), "")
        except OSError:
            line = ""
        flags = set(line.partition(":")[2].split())
    for level, flag in ISA_FLAGS:
        if flag in flags:
            return level
    return "other"


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere it is emulated."""
    return cpu_isa() in NATIVE_BF16_LEVELS


def pick_dtype(requested: str, device: str) -> str:
    """`auto`: bfloat16 on GPUs and on CPUs with native bf16, else float32 (a CPU without it
    emulates bfloat16, far slower than float32: `cotrec bench llm` shows it)."""
    if requested != "auto":
        return requested
    if device == "cuda" or cpu_has_bf16():
        return "bfloat16"
    return "float32"


def resolve_placement(config: LLMConfig) -> Placement:
    """Resolve `llm.model`, `llm.device` and `llm.dtype`; a local model never touches a hub."""
    path = resolve_model(config.model)
    if os.path.isdir(path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = pick_device(config.device)
    return Placement(path, device, pick_dtype(config.dtype, device))
