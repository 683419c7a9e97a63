"""What every benchmark writes beside its figures: the machine, its load, rates and ratios."""

from __future__ import annotations

import os
import platform
from typing import Any

from cotrec.llm.placement import NATIVE_BF16_LEVELS, cpu_isa


def machine() -> dict[str, Any]:
    """The host a figure was measured on; its ISA level, as one CPU model name covers VMs with and
    without AVX512-BF16."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    isa = cpu_isa()
    return {"arch": platform.machine(), "cpus": os.cpu_count(), "cpu_model": model, "cpu_isa": isa,
            "cpu_native_bf16": isa in NATIVE_BF16_LEVELS,
            "platform": platform.platform(), "python": platform.python_version()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load: timings on a shared 2-core machine move with it."""
    return [round(x, 2) for x in os.getloadavg()]


def rate(numerator: float, seconds: float) -> float:
    return round(numerator / seconds, 4) if seconds > 0 else 0.0


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None
