"""What every benchmark writes beside its figures: where they came from (`stamp`), the machine, its
load, rates, ratios and the spread of repeated rounds."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, TypedDict

from cotrec.llm.placement import NATIVE_BF16_LEVELS, cpu_isa


class Machine(TypedDict):
    """`machine()`: the host a figure was measured on."""

    arch: str
    cpus: Optional[int]
    cpu_model: str
    cpu_isa: str
    cpu_native_bf16: bool
    platform: str
    python: str


class Spread(TypedDict):
    """`spread()`: a figure's min, median and max over the rounds (None: no rounds)."""

    min: Optional[float]
    median: Optional[float]
    max: Optional[float]


class Provenance(TypedDict):
    """`provenance()`: the commit measured, whether the checkout had changes, and the command."""

    commit: Optional[str]
    dirty: Optional[bool]
    command: str


class Stamp(Provenance):
    """`stamp()`: the head of every bench JSON."""

    bench: str
    timestamp: str
    cpu_isa: str
    load_average: list[float]
    rounds: int


def machine() -> Machine:
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


def spread(values: Iterable[float], digits: int = 2) -> Spread:
    """Min, median and max of a figure over rounds: one round on a shared machine says little alone."""
    values = list(values)
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": round(min(values), digits), "median": round(float(statistics.median(values)), digits),
            "max": round(max(values), digits)}


def provenance() -> Provenance:
    """The commit measured (and whether the checkout had changes) and the command line."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    if sys.argv and Path(sys.argv[0]).name in ("cotrec", "__main__.py"):  # the script or `python -m cotrec`
        command = " ".join(["cotrec", *sys.argv[1:]])
    else:
        command = " ".join(sys.argv)
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
            "command": command}


def stamp(bench: str, rounds: int) -> Stamp:
    """The head of every bench JSON, taken as the bench starts, so a figure can be traced to the
    code, the command and the machine's state that made it."""
    return {"bench": bench, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance(),
            "cpu_isa": cpu_isa(), "load_average": load_average(), "rounds": rounds}
