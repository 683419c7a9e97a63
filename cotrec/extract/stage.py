"""The extraction stages: `extract items`, `extract users`, `extract perceptions`.

Each builds its input rows from the run directory, skips the rows already done (a rerun
resumes), runs the rest through the runner and reports rows, LLM calls, tokens, failures and
wall time. The CLI, the job drivers, the pipeline and the tests call these functions.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional, TypedDict

import numpy as np
import pandas as pd

from cotrec.config import Config
from cotrec.errors import DataError
from cotrec.extract.preference import planned_steps
from cotrec.extract.programs import PROGRAMS, Program, output_folder, preferences_by_horizon, stored_outputs
from cotrec.extract.prompts import PROMPT_VERSION, item_attributes, item_labels
from cotrec.extract.runner import run_programs
from cotrec.extract.shards import compact, latest_rows, pending_rows, prepare_folder, read_index, read_shards
from cotrec.extract.windows import history_digest
from cotrec.fingerprint import fingerprint
from cotrec.progress import log
from cotrec.rundir import COMPLETE_MARKER, RunDir, read_stats, read_table, write_json

# Settings that change what the LLM writes; the runner's sizes do not.
_OUTPUT_KEYS = ("window", "overlap", "max_windows", "interest_tokens", "preference_tokens", "description_tokens",
                "review_tokens", "key_terms_tokens", "max_key_terms", "repetition_penalty", "temperature")


def extraction_fingerprint(config: Config, kind: str) -> str:
    # the output columns too: a folder written with another schema starts afresh
    return fingerprint({"kind": kind, "prompt_version": PROMPT_VERSION, "model": config.llm.model,
                        "dtype": config.llm.dtype, "extract": {k: getattr(config.extract, k) for k in _OUTPUT_KEYS},
                        "columns": PROGRAMS[kind].schema.names})


def _text_digest(*parts: Any) -> str:
    """What a row's program reads (its texts): a rerun redoes the rows whose inputs changed."""
    return hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).hexdigest()


# -- input rows --------------------------------------------------------------------------------
def item_rows(items: pd.DataFrame) -> pd.DataFrame:
    ordered = items.sort_values("item_idx")
    attributes = [json.dumps(a, ensure_ascii=False) for a in item_attributes(ordered)]
    captions = ordered["caption"].astype("string").fillna("").astype(str).tolist()
    return pd.DataFrame({"item_idx": ordered["item_idx"].to_numpy(), "caption": captions, "attributes": attributes,
                         "source_digest": [_text_digest(c, a) for c, a in zip(captions, attributes)]})


# What `user_histories` reads of the interactions table.
HISTORY_COLUMNS = ["user_idx", "item_idx", "position"]


def user_histories(interactions: pd.DataFrame) -> pd.DataFrame:
    """One row per user: the chronological item sequence (users with fewer than 3 items are dropped)."""
    users, positions = interactions["user_idx"].to_numpy(), interactions["position"].to_numpy()
    # `prepare` writes the table in this order already: checking it costs far less than a sort.
    in_order = bool(np.all((users[1:] > users[:-1]) | ((users[1:] == users[:-1]) & (positions[1:] > positions[:-1]))))
    ordered = interactions if in_order else interactions.sort_values(["user_idx", "position"], kind="stable")
    users = ordered["user_idx"].to_numpy()
    items = ordered["item_idx"].to_numpy(dtype=np.int32)
    cuts = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], cuts])
    histories = np.split(items, cuts) if len(items) else []
    frame = pd.DataFrame({"user_idx": users[starts] if len(users) else [], "history": histories})
    return frame[frame["history"].map(len) >= 3].reset_index(drop=True)


def user_rows(histories: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Users with their history digest, longest walk first (the long tail starts early)."""
    rows = histories.copy()
    rows["source_digest"] = [history_digest(h) for h in rows["history"]]
    steps = planned_steps(rows["history"].map(len).to_numpy(), config.extract)
    return rows.iloc[np.argsort(-steps, kind="stable")].reset_index(drop=True)


_PRIOR_COLUMNS = ["history_start", "items_consumed", "windows", "preference", "short_term", "settled_windows",
                  "settled_preference", "trajectory_ends", "trajectory", "consumed_digest"]


def attach_prior_states(rows: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Add each user's stored `train` state (prior_* columns) for `--incremental` to continue."""
    stored = latest_rows(read_shards(folder), PROGRAMS["users"].key)
    if stored.empty:
        return rows
    train = stored[(stored["horizon"] == "train") & (stored["status"] == "ok")]
    columns = [c for c in _PRIOR_COLUMNS if c in train.columns]  # rows of an older schema lack some
    prior = train[["user_idx", *columns]].rename(columns={c: f"prior_{c}" for c in columns})
    return rows.merge(prior, on="user_idx", how="left")


def pair_rows(pairs: pd.DataFrame, run: RunDir, items: pd.DataFrame) -> pd.DataFrame:
    """(user, horizon, item) with the user's preference at that horizon (`train`, `valid`, `test`, or a
    state of the train walk, `train@N`), the item's label and description."""
    preferences = preferences_by_horizon(run)
    if preferences.empty:
        raise DataError(f"{output_folder(run, 'users')}: no preferences; run `cotrec extract users` first")
    descriptions = stored_outputs(run, "items")
    labels = pd.DataFrame({"item_idx": items.sort_values("item_idx")["item_idx"].to_numpy(),
                           "label": item_labels(items)})
    rows = pairs.merge(preferences, on=["user_idx", "horizon"], how="left").merge(labels, on="item_idx", how="left")
    if not descriptions.empty:
        described = descriptions[descriptions["status"] == "ok"][["item_idx", "description"]]
        rows = rows.merge(described, on="item_idx", how="left")
    else:
        rows["description"] = ""
    unknown = rows["label"].isna()
    if unknown.any():
        raise DataError(f"pairs: item_idx {int(rows.loc[unknown, 'item_idx'].iloc[0])} is not in the prepared items")
    rows["preference"] = rows["preference"].fillna("")
    rows["description"] = rows["description"].fillna("")
    rows["source_digest"] = [_text_digest(p, l, d) for p, l, d in
                             zip(rows["preference"], rows["label"], rows["description"])]
    return rows


def read_pairs(path: Path) -> pd.DataFrame:
    """A pairs table: parquet or CSV with user_idx, horizon, item_idx."""
    if not path.is_file():
        raise DataError(f"{path}: no such pairs file")
    try:
        frame = pd.read_csv(str(path)) if path.suffix == ".csv" else pd.read_parquet(str(path))
    except Exception as exc:  # noqa: BLE001 - the user's file
        raise DataError(f"{path}: cannot read: {exc}") from exc
    missing = [c for c in ("user_idx", "horizon", "item_idx") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (need user_idx, horizon, item_idx)")
    bad = ~frame["horizon"].astype(str).str.fullmatch(r"train|valid|test|train@\d+")
    if bad.any():
        raise DataError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 1}: horizon {frame['horizon'][bad].iloc[0]!r} "
                        "is not train, valid, test or train@N (the train walk's state after item N)")
    return frame[["user_idx", "horizon", "item_idx"]].drop_duplicates().reset_index(drop=True)


# -- the stages --------------------------------------------------------------------------------
class ExtractionSummary(TypedDict, total=False):
    """An extraction stage's result: this run's counts and times (`ExtractionRun`), and the folder's."""

    kind: str
    folder: str
    total_rows: int
    already_done: int
    incremental: bool
    rows: int
    records: int
    failed: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    engine_load_s: float
    seconds_after_load: float
    rows_seconds: float
    superseded_rows_dropped: int
    wall_seconds: float
    rows_in_folder: int
    failed_in_folder: int
    pairs_from: str
    skipped: bool  # set by the main job: no row was run


def _run(kind: str, rows: pd.DataFrame, run: RunDir, config: Config, force: bool, limit: Optional[int],
         incremental: bool = False, labels: list[str] | None = None) -> ExtractionSummary:
    program: Program = PROGRAMS[kind]
    folder = output_folder(run, kind)
    settings = extraction_fingerprint(config, kind)
    prepare_folder(folder, settings, force)
    if limit is not None:
        rows = rows.head(limit)
    total = len(rows)
    if incremental and kind == "users":
        rows = attach_prior_states(rows, folder)
    todo = pending_rows(rows, folder, program)
    started = time.perf_counter()
    summary: ExtractionSummary = {"kind": kind, "folder": str(folder), "total_rows": total,
                                  "already_done": total - len(todo), "incremental": incremental}
    if len(todo):
        log(f"extract {kind}: {len(todo):,} of {total:,} rows to do ({total - len(todo):,} already done) "
            f"with {config.llm.backend} / {config.llm.model}")
        summary.update(run_programs(program, todo, folder, config, domain=read_stats(run)["domain"],
                                    labels=labels, incremental=incremental))
    else:
        log(f"extract {kind}: all {total:,} rows already done; nothing to run")
        summary.update(rows=0, records=0, failed=0, calls=0, prompt_tokens=0, completion_tokens=0, seconds=0.0,
                       engine_load_s=0.0, seconds_after_load=0.0, rows_seconds=0.0)
    index = read_index(folder, program)  # one read for the compaction, the counts and the resume check
    summary["superseded_rows_dropped"] = compact(folder, program, index)
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    latest = index.latest
    summary["rows_in_folder"] = len(latest)
    summary["failed_in_folder"] = int((latest["status"] != "ok").sum()) if len(latest) else 0
    if limit is None and not pending_rows(rows, folder, program, index).shape[0]:
        write_json(folder / COMPLETE_MARKER, {"stage": program.folder, "fingerprint": settings,
                                              "finished_at": time.time(), "rows": len(latest)})
    return summary


def extract_items(config: Config, run: RunDir, force: bool = False, limit: Optional[int] = None) -> ExtractionSummary:
    """An objective description of every item."""
    return _run("items", item_rows(read_table(run, "items")), run, config, force, limit)


def extract_users(config: Config, run: RunDir, force: bool = False, limit: Optional[int] = None,
                  incremental: bool = False) -> ExtractionSummary:
    """Every user's preference recurrence, for the train / valid / test horizons."""
    rows = user_rows(user_histories(read_table(run, "interactions", HISTORY_COLUMNS)), config)
    if limit is not None:  # the first users by id, not the longest walks
        rows = rows.sort_values("user_idx").head(limit)
    return _run("users", rows, run, config, force, None if limit is None else len(rows), incremental=incremental,
                labels=item_labels(read_table(run, "items")))


def extract_perceptions(config: Config, run: RunDir, pairs: pd.DataFrame, source: str, force: bool = False,
                        limit: Optional[int] = None) -> ExtractionSummary:
    """The role-played review and its key terms for each (user, horizon, candidate item) of `pairs`
    (`read_pairs` of a user's file, or the lists the ranker reads: `ranker.lists.candidate_pairs`)."""
    log(f"extract perceptions: {len(pairs):,} pairs from {source}")
    summary = _run("perceptions", pair_rows(pairs, run, read_table(run, "items")), run, config, force, limit)
    summary["pairs_from"] = source
    return summary


def format_summary(summary: ExtractionSummary) -> str:
    seconds = max(summary.get("seconds_after_load", 0.0), 1e-9)
    lines = [
        f"extract {summary['kind']} -> {summary['folder']}",
        f"rows          {summary['rows']:,} run, {summary['already_done']:,} already done, "
        f"{summary['total_rows']:,} in all" + ("  (incremental)" if summary.get("incremental") else ""),
        f"LLM calls     {summary['calls']:,}",
        f"tokens        {summary['prompt_tokens']:,} prompt, {summary['completion_tokens']:,} generated "
        f"({summary['completion_tokens'] / seconds:,.1f} gen tok/s after the engine loaded, "
        f"{summary['completion_tokens'] / max(summary.get('rows_seconds', 0.0), 1e-9):,.1f} while rows ran)",
        f"failures      {summary['failed']:,} rows this run; {summary['failed_in_folder']:,} of "
        f"{summary['rows_in_folder']:,} rows in the folder",
        f"wall time     {summary['wall_seconds']:.1f} s (engine load {summary['engine_load_s']:.1f} s)",
    ]
    if summary.get("superseded_rows_dropped"):
        lines.append(f"compacted     {summary['superseded_rows_dropped']:,} superseded rows dropped")
    return "\n".join(lines)

