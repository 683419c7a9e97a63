"""The committed benchmark files: each can be traced to the code, the command and the machine."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from cotrec.bench.common import Stamp
from cotrec.llm.placement import CPU_ISA_LEVELS

BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.json")), ids=lambda p: p.name)
def test_every_committed_bench_file_carries_the_stamp(path):
    data = json.loads(path.read_text())
    missing = [key for key in Stamp.__required_keys__ if key not in data] + \
              [key for key in ("commit", "command") if key in data and not data[key]]
    assert not missing, f"{path.name} lacks {missing}: rerun the command docs/benchmarks.md names for it"
    assert data["cpu_isa"] in CPU_ISA_LEVELS and len(data["load_average"]) == 3 and data["rounds"] >= 1
    assert datetime.fromisoformat(data["timestamp"]).tzinfo is not None
    assert len(data["commit"]) == 40 and all(c in "0123456789abcdef" for c in data["commit"])
    if data["dirty"] is None:  # a stamp taken afterwards from git history says so
        assert "git history" in data.get("stamp_from_git", ""), path.name
