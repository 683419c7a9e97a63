"""The texts Encode & Map embeds: item caption, caption + description, user preference per horizon.

Descriptions and preferences come from the extraction stage (`<run>/extract/...`, parquet shards).
A row counts only when its `status` (if the column exists) is "ok" and its text is not empty:
an item without a usable description falls back to its caption alone; a user without a usable
preference is reported as missing (the retriever then starts that user's token at random).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from cotrec.errors import CotrecError
from cotrec.rundir import RunDir

DESCRIPTIONS_DIR = "extract/item_descriptions"
PREFERENCES_DIR = "extract/preferences"
HORIZONS = ("train", "valid", "test")
# Column holding the long-term preference text, in order of preference.
PREFERENCE_COLUMNS = ("preference", "long_term", "long_term_preference")


def _shards(run: RunDir, folder: str, need: str) -> list[Path]:
    path = Path(run / folder)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise CotrecError(f"{path}: no extraction output (*.parquet), needed for {need}: run the "
                          f"extraction first or choose a variant without it")
    return files


def shards_digest(run: RunDir, folder: str, need: str) -> str:
    """Content hash of an extraction folder's shards: the embedding is redone when they change."""
    digest = hashlib.sha256()
    for path in _shards(run, folder, need):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _read(run: RunDir, folder: str, need: str) -> pd.DataFrame:
    files = _shards(run, folder, need)
    try:
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    except Exception as exc:  # noqa: BLE001 - a broken shard is the user's file
        raise CotrecError(f"{run / folder}: cannot read the parquet shards: {exc}") from exc
    if "status" in frame.columns:
        frame = frame[frame["status"].astype(str) == "ok"]
    return frame


def caption_texts(items: pd.DataFrame) -> list[str]:
    return items.sort_values("item_idx")["caption"].fillna("").astype(str).tolist()


def description_texts(run: RunDir, items: pd.DataFrame) -> tuple[list[str], int]:
    """Caption followed by the LLM's description, per item; returns (texts, items with a description)."""
    frame = _read(run, DESCRIPTIONS_DIR, "item init 'description'")
    for column in ("item_idx", "description"):
        if column not in frame.columns:
            raise CotrecError(f"{run / DESCRIPTIONS_DIR}: the shards have no {column!r} column")
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
    frame = _read(run, PREFERENCES_DIR, "user init 'preference'")
    column = next((c for c in PREFERENCE_COLUMNS if c in frame.columns), None)
    for needed in ("user_idx", "horizon"):
        if needed not in frame.columns:
            raise CotrecError(f"{run / PREFERENCES_DIR}: the shards have no {needed!r} column")
    if column is None:
        raise CotrecError(f"{run / PREFERENCES_DIR}: the shards have none of the columns {PREFERENCE_COLUMNS}")
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
