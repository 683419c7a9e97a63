"""The parquet shard store an extraction writes into, and what makes a rerun resume.

A folder holds shards `part-<ns clock>-<tag>.parquet`, each written under a hidden name and
renamed into place, so a shard is whole or absent whatever kills its writer. Rows are never
updated in place: a newer row for the same key supersedes an older one (`created_at`), readers
take the newest (`latest_rows`) and `compact` drops the superseded rows. A batch
written twice (its writer died after the rename and the batch ran again) is therefore harmless.

`manifest.json` records the settings a folder was made with; a folder made with other settings
starts afresh, one made with the same settings resumes: `pending_rows` drops the input rows whose
every output row is stored, ok, from the same inputs (`source_digest`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cotrec.fingerprint import fingerprint
from cotrec.progress import log
from cotrec.rundir import COMPLETE_MARKER, write_json
from cotrec.storage import as_path, remove_tree, replace_file

class Table(Protocol):
    """What the store needs to know of a folder's rows (`extract.programs.Program` is one)."""

    key: tuple[str, ...]  # what identifies an output row
    schema: pa.Schema
    row_key: tuple[str, ...]  # what identifies an input row
    rows_per_input: int  # output rows one input row makes


def shard_files(folder: Path) -> list[Path]:
    """The finished shards of a folder, oldest first (names start with a nanosecond clock)."""
    folder = as_path(folder)
    return sorted(folder.glob("part-*.parquet"), key=lambda f: f.name) if folder.is_dir() else []


def folder_digest(folder: Path) -> str:
    """What a folder holds, as its shard names (each carries its write time and writer's tag):
    readers fingerprint their inputs with it."""
    return fingerprint([f.name for f in shard_files(folder)])


def write_shard(folder: Path, records: list[dict[str, Any]], schema: pa.Schema, tag: str = "",
                constants: dict[str, Any] | None = None) -> Path:
    """Write one shard under a hidden name and rename it into place: whole or absent.
    `constants`: columns with one value for every record (a batch's model, prompt version, time)."""
    return _write_table(folder, records_table(records, schema, constants or {}), tag)


def _write_table(folder: Path, table: pa.Table, tag: str = "") -> Path:
    final = as_path(folder) / f"part-{time.time_ns():020d}-{tag or uuid.uuid4().hex[:8]}.parquet"
    replace_file(lambda target: pq.write_table(table, str(target)), final)
    return final


def records_table(records: list[dict[str, Any]], schema: pa.Schema, constants: dict[str, Any]) -> pa.Table:
    """Records as a table of `schema`, with the `constants` columns added. Columns are built with
    itemgetter and zip and converted one column per call, since a users job writes millions of
    rows; records that leave a column out (hand-made ones; a program's records have them all) go
    through from_pylist, which writes nulls."""
    fields = pa.schema([f for f in schema if f.name not in constants])
    names = fields.names
    values = itemgetter(*names) if len(names) > 1 else (lambda record: (record[names[0]],))
    try:
        columns = list(zip(*map(values, records))) or [()] * len(names)
        table = pa.Table.from_arrays([pa.array(column, f.type) for column, f in zip(columns, fields)], schema=fields)
    except KeyError:
        table = pa.Table.from_pylist(records, schema=fields)
    for column, value in constants.items():
        field = schema.field(column)
        table = table.append_column(field, pa.repeat(pa.scalar(value, field.type), len(table)))
    return table.select(schema.names)


def read_shards(folder: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """All rows of a folder's shards; taking the newest row per key is left to the caller."""
    files = shard_files(folder)
    if not files:
        return pd.DataFrame(columns=columns or [])
    return pa.concat_tables([pq.read_table(str(f), columns=columns) for f in files], promote_options="permissive").to_pandas()


def latest_rows(frame: pd.DataFrame, key: tuple[str, ...]) -> pd.DataFrame:
    """The newest row per key (by created_at)."""
    if frame.empty:
        return frame
    if "created_at" in frame.columns:  # a row without a time (written by hand) is the oldest
        frame = frame.sort_values("created_at", kind="stable", na_position="first")
    return frame.drop_duplicates(list(key), keep="last")


@dataclass(frozen=True)
class StoredIndex:
    """What a folder's shards hold, without their payload: every stored row's key, inputs' digest,
    status and time, with its shard (`_file`, an index into `files`) and place in it (`_row`)."""

    files: list[Path]
    rows: pd.DataFrame
    latest: pd.DataFrame  # the newest row per key


def read_index(folder: Path, program: Table) -> StoredIndex:
    """One read of the index columns of every shard: what compaction, the resume and a stage's
    closing counts all need (a shard written by hand may lack some; they read as missing)."""
    files = shard_files(folder)
    wanted = [*program.key, "source_digest", "status", "created_at"]
    parts = []
    for number, path in enumerate(files):
        present = set(pq.read_schema(str(path)).names)
        frame = pq.read_table(str(path), columns=[c for c in wanted if c in present]).to_pandas()
        parts.append(frame.assign(_file=number, _row=np.arange(len(frame))))
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*wanted, "_file", "_row"])
    for column in wanted:
        if column not in rows.columns:
            rows[column] = None
    return StoredIndex(files, rows, latest_rows(rows, program.key))


def compact(folder: Path, program: Table, index: StoredIndex | None = None) -> int:
    """Drop the rows a newer row of the same key superseded; returns how many.

    Only the index columns are read to find them (`index`, when the caller read it already), and
    only the shards holding one are rewritten (each as a new shard of its surviving rows), so a
    folder with nothing superseded costs a read of its keys and the driver never holds a folder's
    payload. The new shards are in place before the old ones go: a kill in between leaves
    duplicates that readers resolve and the next run compacts, never a lost row."""
    index = read_index(folder, program) if index is None else index
    files, kept = index.files, index.latest
    dropped = len(index.rows) - len(kept)
    if dropped == 0:
        return 0
    kept_rows = kept.groupby("_file")["_row"].apply(np.sort).to_dict()
    stored_rows = index.rows["_file"].value_counts().to_dict()
    dirty = [number for number, count in sorted(stored_rows.items()) if len(kept_rows.get(number, ())) < count]
    for number in dirty:
        survivors = kept_rows.get(number)
        if survivors is not None and len(survivors):
            table = pq.read_table(str(files[number])).take(pa.array(survivors))
            _write_table(folder, table, tag="compact")
    for number in dirty:
        files[number].unlink()
    return dropped


# -- resume ------------------------------------------------------------------------------------
def prepare_folder(folder: Path, settings: str, force: bool) -> None:
    """Keep a folder made with the same settings (to resume it); otherwise start it afresh."""
    manifest = folder / "manifest.json"
    if folder.exists():
        try:
            same = json.loads(manifest.read_text()).get("fingerprint") == settings
        except (OSError, ValueError):
            same = False
        if force or not same:
            if shard_files(folder):
                log(f"{folder}: {'--force' if force else 'made with other settings'}; starting afresh")
            remove_tree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    if not manifest.exists():
        write_json(manifest, {"fingerprint": settings})


def done_keys(folder: Path, program: Table, index: StoredIndex | None = None) -> pd.DataFrame:
    """Input keys (with their source_digest) whose every output row is stored, ok, from the same inputs."""
    key = list(program.row_key)
    frame = (read_index(folder, program) if index is None else index).latest
    if frame.empty:
        return pd.DataFrame(columns=[*key, "source_digest"])
    ok = frame[frame["status"] == "ok"]
    counts = ok.groupby([*key, "source_digest"]).size()
    return counts[counts == program.rows_per_input].reset_index()[[*key, "source_digest"]]


def pending_rows(rows: pd.DataFrame, folder: Path, program: Table, index: StoredIndex | None = None) -> pd.DataFrame:
    """The input rows still to run: not done, failed, or changed since they were done."""
    done = done_keys(folder, program, index)
    if done.empty:
        return rows
    merged = rows.merge(done.assign(_done=True), on=[*program.row_key, "source_digest"], how="left")
    return rows[merged["_done"].isna().to_numpy()]
