"""The three extractions as programs: what each runs per input row and the table it writes.

A `Program` pairs a per-row async program (`preference.user_program`, `description.item_program`,
`perception.pair_program`) with its output table: the folder under the run directory, the key of
an output row, the key of an input row and the parquet schema. The runner runs programs; the
shard store, the stages and every reader of extraction output (embed, the ranker, the report) go
through this registry and `stored_outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cotrec.extract.description import failed_item_rows, item_program
from cotrec.extract.perception import failed_pair_rows, pair_program
from cotrec.extract.preference import failed_user_rows, user_program
from cotrec.extract.shards import latest_rows, read_shards, shard_files
from cotrec.rundir import RunDir

# Columns every output row has: where it came from, how it went, what it cost, what made it.
COMMON_COLUMNS = [("source_digest", pa.string()), ("status", pa.string()), ("error", pa.string()),
                  ("calls", pa.int32()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
                  ("model", pa.string()), ("prompt_version", pa.string()), ("created_at", pa.float64())]


@dataclass(frozen=True)
class Program:
    """One kind of extraction: its per-row program, its failure rows, its output table."""

    kind: str
    folder: str  # under the run directory
    key: tuple[str, ...]  # what identifies an output row
    run: Callable[[dict[str, Any], Any], Awaitable[list[dict[str, Any]]]]
    failed: Callable[[dict[str, Any], str], list[dict[str, Any]]]
    schema: pa.Schema
    input_key: tuple[str, ...] = ()  # what identifies an input row (default: the output key)
    rows_per_input: int = 1  # output rows one input row makes

    @property
    def row_key(self) -> tuple[str, ...]:
        return self.input_key or self.key


PROGRAMS = {
    "items": Program("items", "extract/item_descriptions", ("item_idx",), item_program, failed_item_rows, pa.schema(
        [("item_idx", pa.int32()), ("description", pa.string()), *COMMON_COLUMNS])),
    # One input row per user makes its three horizons (train, valid, test).
    "users": Program("users", "extract/preferences", ("user_idx", "horizon"), user_program, failed_user_rows, pa.schema(
        [("user_idx", pa.int32()), ("horizon", pa.string()), ("preference", pa.string()),
         ("short_term", pa.list_(pa.string())), ("windows", pa.int32()), ("items_consumed", pa.int32()),
         ("history_start", pa.int32()), ("target_item_idx", pa.int32()), ("settled_windows", pa.int32()),
         ("settled_preference", pa.string()), ("trajectory_ends", pa.list_(pa.int32())),
         ("trajectory", pa.list_(pa.string())), ("consumed_digest", pa.string()), ("continued", pa.bool_()),
         ("failed_steps", pa.int32()), *COMMON_COLUMNS]), input_key=("user_idx",), rows_per_input=3),
    "perceptions": Program("perceptions", "extract/perceptions", ("user_idx", "horizon", "item_idx"), pair_program,
                           failed_pair_rows, pa.schema(
        [("user_idx", pa.int32()), ("horizon", pa.string()), ("item_idx", pa.int32()), ("review", pa.string()),
         ("key_terms", pa.list_(pa.string())), *COMMON_COLUMNS])),
}


def output_folder(run: RunDir, kind: str) -> Path:
    return run / PROGRAMS[kind].folder


def stored_outputs(run: RunDir, kind: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The newest row per key of a kind's output (empty when nothing was extracted). `columns`:
    only these (those a shard lacks, e.g. one written by hand, are left out)."""
    program = PROGRAMS[kind]
    folder = output_folder(run, kind)
    if columns is not None:
        files = shard_files(folder)
        if not files:
            return pd.DataFrame(columns=columns)
        present = set(pq.read_schema(str(files[0])).names)
        columns = [c for c in dict.fromkeys([*program.key, *columns, "created_at"]) if c in present]
    return latest_rows(read_shards(folder, columns), program.key)


def state_horizon(end: int) -> str:
    """The horizon of the preference the recurrence held after its window ending at training item
    `end` (exclusive): what a training-history list whose target comes at or after `end` may show."""
    return f"train@{end}"


def preferences_by_horizon(run: RunDir) -> pd.DataFrame:
    """(user_idx, horizon, preference) of every successful preference: the `train`, `valid` and
    `test` horizons, and each intermediate state of the `train` walk (`state_horizon`)."""
    frame = stored_outputs(run, "users")
    if frame.empty:
        return pd.DataFrame(columns=["user_idx", "horizon", "preference"])
    ok = frame[frame["status"].astype(str) == "ok"]
    rows = [ok[["user_idx", "horizon", "preference"]]]
    if "trajectory" in ok.columns:
        train = ok[(ok["horizon"] == "train") & ok["trajectory"].notna() & ok["trajectory_ends"].notna()]
        states = [(int(u), state_horizon(int(e)), str(t)) for u, ends, texts in
                  zip(train["user_idx"], train["trajectory_ends"], train["trajectory"]) for e, t in zip(ends, texts)]
        rows.append(pd.DataFrame(states, columns=["user_idx", "horizon", "preference"]))
    out = pd.concat(rows, ignore_index=True)
    out["user_idx"] = out["user_idx"].astype(np.int64)
    return out.drop_duplicates(["user_idx", "horizon"], keep="first").reset_index(drop=True)
