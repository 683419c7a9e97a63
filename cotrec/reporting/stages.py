"""The wall time of every stage of the main job (`reports/stages.json`) and its table.

`cotrec run` records each stage as it ends; `cotrec report` renders what was recorded, so the
time of a stage is that of the run that did its work, whatever reran it later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence, TypedDict

from cotrec.reporting.plots import plot_stages
from cotrec.rundir import RunDir, atomic_write_text, write_json

STAGES_JSON = "reports/stages.json"
STAGES_MD = "reports/stages.md"


class StageRecord(TypedDict, total=False):
    """A stage's entry in `reports/stages.json`: its finished work's time, or its interrupted attempts'."""

    seconds: float
    skipped: bool
    finished_at: float
    of_which_interrupted_seconds: float
    interrupted_seconds: float
    last_checked_at: float
    last_check_seconds: float


class StageTiming(TypedDict, total=False):
    """One stage of this run of the main job: its time, whether it was skipped, and why it was not
    needed (`unneeded`, only then)."""

    stage: str
    seconds: float
    skipped: bool
    unneeded: str


def record_stage(run: RunDir, stage: str, seconds: float, skipped: bool, interrupted: bool = False) -> None:
    """Remember a stage's wall time.

    A skipped stage keeps the time of the run that did the work. An interrupted attempt (killed,
    failed) keeps its time as `interrupted_seconds`: the stages resume where they stopped, so the
    attempt that finishes the stage records its own time plus the interrupted ones.
    """
    records = stage_records(run)
    previous = records.get(stage, {})
    earlier = previous.get("interrupted_seconds", 0.0)
    if interrupted:
        records[stage] = {**previous, "interrupted_seconds": round(earlier + seconds, 3)}
    elif skipped and "seconds" in previous:
        records[stage] = {**previous, "last_checked_at": time.time(), "last_check_seconds": round(seconds, 3)}
    else:
        records[stage] = {"seconds": round(seconds + earlier, 3), "skipped": skipped, "finished_at": time.time()}
        if earlier:
            records[stage]["of_which_interrupted_seconds"] = round(earlier, 3)
    write_json(run / STAGES_JSON, records)


def stage_records(run: RunDir) -> dict[str, StageRecord]:
    try:
        return json.loads((run / STAGES_JSON).read_text())
    except (OSError, ValueError):
        return {}


def finished_stage_seconds(records: dict[str, StageRecord]) -> dict[str, float]:
    """Wall time of each stage that has finished (a stage only interrupted so far has none)."""
    return {stage: record["seconds"] for stage, record in records.items() if "seconds" in record}


def write_stages(run: RunDir, records: dict[str, StageRecord], usage: dict[str, dict[str, int]],
                 stage_names: Sequence[str]) -> Path:
    """`reports/stages.md` and `stages.png`: each stage of `stage_names` with its time and LLM usage."""
    finished = finished_stage_seconds(records)
    lines = ["# Time and tokens per stage", "",
             "Wall time is that of the run that did the stage's work (`cotrec run` records it), with the time of "
             "attempts interrupted before it added (the stages resume where they stopped); LLM figures are summed "
             "over the newest row per key of the stage's shards.", "",
             "| Stage | Wall time (s) | Rows | LLM calls | Prompt tokens | Generated tokens | Failed rows |",
             "|---|---|---|---|---|---|---|"]
    for stage in stage_names:
        record = records.get(stage, {})
        seconds = f"{finished[stage]:.1f}" if stage in finished else "-"
        if record.get("of_which_interrupted_seconds"):
            seconds += f" (of which {record['of_which_interrupted_seconds']:.1f} interrupted)"
        elif stage not in finished and record.get("interrupted_seconds"):
            seconds += f" (interrupted after {record['interrupted_seconds']:.1f})"
        u = usage.get(stage)
        llm = (f"{u['rows']:,} | {u['calls']:,} | {u['prompt_tokens']:,} | {u['completion_tokens']:,} | {u['failed']:,}"
               if u else "- | - | - | - | -")
        lines.append(f"| {stage} | {seconds} | {llm} |")
    total = sum(finished.values())
    lines += ["", f"Total recorded wall time of the finished stages: {total:.1f} s ({total / 60:.1f} min)."]
    path = run / STAGES_MD
    atomic_write_text(path, "\n".join(lines) + "\n")
    plot_stages(run, {s: finished[s] for s in stage_names if s in finished},
                {s: u["completion_tokens"] for s, u in usage.items()})
    return path
