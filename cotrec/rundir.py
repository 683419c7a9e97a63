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
from typing import Any, Iterator, Optional

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
        record = self.completion(stage_dir)
        return record is not None and record.get("fingerprint") == fingerprint

    @contextmanager
    def staged(self, stage_dir: str, fingerprint: str) -> Iterator[Path]:
        """Yield an empty folder to write a stage's outputs into; publish it only on success.

        On success the folder gets its completion marker and replaces `<run>/<stage_dir>`
        (the old outputs, if any, are removed). On any exception it is deleted; one a killed
        process left behind is deleted when the stage next starts.
        """
        final = self.root / stage_dir
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            remove_tree(stale)
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


def read_stats(run: RunDir) -> dict[str, Any]:
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
