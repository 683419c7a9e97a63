"""The run directory: where stages find their inputs and leave their outputs.

It is also the one reader of the prepared tables (`read_table`, `read_stats`) every stage starts
from.

Every stage writes into a hidden sibling folder first and renames it into place only when it is
whole, with a `.complete.json` marker that records the fingerprint of the config it was made
from. A folder without a matching marker is never taken as a finished output, so an interrupted
stage leaves nothing that looks complete, and a rerun with the same inputs is skipped.

The root may be a URI (`s3://bucket/run`; see `cotrec.storage`): the same layout, published with
the marker copied last instead of renamed.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, TypedDict

import pandas as pd

from cotrec.config import Config
from cotrec.errors import DataError
from cotrec.storage import publish_folder, remove_tree, replace_file, run_path

COMPLETE_MARKER = ".complete.json"
DATA_DIR = "data"  # what `prepare` writes: the tables below and stats.json
TABLES = ("interactions", "items", "users")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all (`storage.replace_file`)."""
    replace_file(lambda target: target.write_text(text), path)


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


class RunDir:
    """Paths and completion markers of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = run_path(root)

    def __truediv__(self, part: str) -> Path:
        return self.root / part

    def write_config(self, config: Config) -> Path:
        path = self.root / "config.yaml"
        atomic_write_text(path, config.to_yaml())
        return path

    def completion(self, stage_dir: str) -> dict[str, Any] | None:
        """The completion record of a stage folder, or None when it is absent or unfinished."""
        marker = self.root / stage_dir / COMPLETE_MARKER
        try:
            return json.loads(marker.read_text())
        except (OSError, ValueError):
            return None

    def is_complete(self, stage_dir: str, fingerprint: str) -> bool:
        """Whether the stage's outputs are current; when they are, the stage is skipped, so what a
        process killed while publishing them left beside them goes here (`staged` would have
        removed it, but a skipped stage never gets there)."""
        record = self.completion(stage_dir)
        current = record is not None and record.get("fingerprint") == fingerprint
        if current:
            _remove_leftovers(self.root / stage_dir)
        return current

    @contextmanager
    def staged(self, stage_dir: str, fingerprint: str) -> Iterator[Path]:
        """Yield an empty folder to write a stage's outputs into; publish it only on success.

        On success the folder gets its completion marker and replaces `<run>/<stage_dir>`
        (the old outputs, if any, are removed). On any exception it is deleted; one a killed
        process left behind is deleted when the stage next starts.
        """
        final = self.root / stage_dir
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(final)
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
        tmp.mkdir()
        try:
            yield tmp
            write_json(
                tmp / COMPLETE_MARKER,
                {"stage": stage_dir, "fingerprint": fingerprint, "finished_at": time.time()},
            )
            publish_folder(tmp, final, last=COMPLETE_MARKER)
        finally:
            remove_tree(tmp)


def _remove_leftovers(final: Path) -> None:
    """The hidden siblings of a stage folder that killed processes left: a partial folder (killed
    while writing it, or on a store after its marker was copied but before it was deleted) and on
    disk the old outputs a publication moved aside."""
    for pattern in (f".{final.name}.partial-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            remove_tree(stale)


class SampleStats(TypedDict, total=False):
    """How `data.sample_users` drew the run's users (and the k-core within the sample, if any)."""

    users: int
    seed: int
    from_users: int
    k_core: int
    k_core_rounds: int


class DatasetStats(TypedDict, total=False):
    """`<run>/data/stats.json`: what `prepare` read, filtered, sampled and split."""

    source: str
    dataset: str
    domain: str
    raw_interactions: int
    raw_users: int
    raw_items: int
    dropped_unknown_items: int
    dropped_low_rating: int
    dropped_repeats: int
    k_core: int
    k_core_user_minimum: int
    k_core_rounds: int
    sample: SampleStats
    users: int
    items: int
    interactions: int
    density: float
    history_length: dict[str, float]
    timestamps: dict[str, int]
    split_rule: str
    files: list[str]
    seconds: float


def read_stats(run: RunDir) -> DatasetStats:
    """The prepared dataset's `stats.json` (counts, domain, filtering and sampling record)."""
    return json.loads((run / DATA_DIR / "stats.json").read_text())


def read_table(run: RunDir, name: str, columns: Optional[list[str]] = None) -> pd.DataFrame:
    """One prepared table (or its `columns`); a clear error when `prepare` has not run for this run
    directory."""
    if name not in TABLES:
        raise ValueError(name)
    if run.completion(DATA_DIR) is None:
        raise DataError(f"{run / DATA_DIR}: no prepared data; run `cotrec prepare` first")
    return pd.read_parquet(str(run / DATA_DIR / f"{name}.parquet"), columns=columns)
