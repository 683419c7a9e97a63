"""The texts Encode & Map embeds: item caption, caption + description, user preference per horizon.

Descriptions and preferences come from the extraction stages (`extract.programs.stored_outputs`:
the newest row per key). A row counts only when its `status` is "ok" and its text is not empty:
an item without a usable description falls back to its caption alone; a user without a usable
preference is reported as missing (the retriever then starts that user's token at random).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cotrec.errors import CotrecError
from cotrec.extract.programs import output_folder, stored_outputs
from cotrec.extract.shards import folder_digest, shard_files
from cotrec.rundir import RunDir

HORIZONS = ("train", "valid", "test")
# What each kind is made from: the extraction kind whose output it reads.
SOURCES = {"description": "items", "preference": "users"}


def _require(run: RunDir, kind: str, need: str) -> None:
    folder = output_folder(run, SOURCES[kind])
    if not shard_files(folder):
        raise CotrecError(f"{folder}: no extraction output (*.parquet), needed for {need}: run the "
                          f"extraction first or choose a variant without it")


def source_digest(run: RunDir, kind: str, need: str) -> str:
    """What the extraction folder a kind reads holds: the embedding is redone when it changes."""
    _require(run, kind, need)
    return folder_digest(output_folder(run, SOURCES[kind]))


def _read(run: RunDir, kind: str, need: str, text: str) -> pd.DataFrame:
    """The newest ok row per key of a kind's source, with its `text` column only (a preference row
    also carries the recurrence's trajectory, many times its size)."""
    _require(run, kind, need)
    try:
        frame = stored_outputs(run, SOURCES[kind], [text, "status"])
    except Exception as exc:  # noqa: BLE001 - a broken shard is the user's file
        raise CotrecError(f"{output_folder(run, SOURCES[kind])}: cannot read the parquet shards: {exc}") from exc
    if "status" in frame.columns:
        frame = frame[frame["status"].astype(str) == "ok"]
    return frame


def caption_texts(items: pd.DataFrame) -> list[str]:
    return items.sort_values("item_idx")["caption"].fillna("").astype(str).tolist()


def description_texts(run: RunDir, items: pd.DataFrame) -> tuple[list[str], int]:
    """Caption followed by the LLM's description, per item; returns (texts, items with a description)."""
    frame = _read(run, "description", "item init 'description'", "description")
    for column in ("item_idx", "description"):
        if column not in frame.columns:
            raise CotrecError(f"{output_folder(run, 'items')}: the shards have no {column!r} column")
    frame = frame[frame["description"].fillna("").astype(str).str.strip() != ""]
    described = frame.drop_duplicates("item_idx", keep="last").set_index("item_idx")["description"]
    texts, found = [], 0
    for idx, caption in zip(items.sort_values("item_idx")["item_idx"], caption_texts(items)):
        text = described.get(idx)
        if text is None:
            texts.append(caption)
        else:
            found += 1
            texts.append(f"{caption}. {str(text).strip()}")
    return texts, found


def preference_texts(run: RunDir, num_users: int) -> tuple[list[str], np.ndarray]:
    """One text per (horizon, user), horizons in HORIZONS order; and a (3, users) mask of found rows."""
    frame = _read(run, "preference", "user init 'preference'", "preference")
    for needed in ("user_idx", "horizon", "preference"):
        if needed not in frame.columns:
            raise CotrecError(f"{output_folder(run, 'users')}: the shards have no {needed!r} column")
    column = "preference"
    frame = frame[frame[column].fillna("").astype(str).str.strip() != ""]
    texts = [""] * (len(HORIZONS) * num_users)
    found = np.zeros((len(HORIZONS), num_users), dtype=bool)
    for row in frame.drop_duplicates(["user_idx", "horizon"], keep="last").itertuples(index=False):
        horizon = str(getattr(row, "horizon"))
        user = int(getattr(row, "user_idx"))
        if horizon in HORIZONS and 0 <= user < num_users:
            h = HORIZONS.index(horizon)
            texts[h * num_users + user] = _as_text(getattr(row, column))
            found[h, user] = True
    return texts, found


def _as_text(value) -> str:
    """Preferences may be a string or a list of keywords (the retriever wants comma-separated keywords)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v).strip() for v in value if str(v).strip())
    return str(value).strip()
