"""From a raw dataset to the leave-one-out tables every later stage reads.

Steps, all vectorised over numpy arrays:
1. keep interactions with a known, captioned item (and a high enough rating, if asked);
2. drop repeats of a (user, item) pair, keeping the earliest;
3. k-core: drop users and items with fewer than k interactions, repeatedly, until nothing changes;
4. optionally keep a seeded sample of users, and k-core again within it;
5. dense ids (raw ids in natural order), chronological order per user with timestamp ties broken
   by source order (many MovieLens ratings share a second: without a stable rule the leave-one-out
   target would change between runs and tools), `position` 0..n-1, and the split of each row:
   the last interaction is the test target, the one before it the valid target, the rest train.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cotrec.config import DataConfig
from cotrec.data.raw import RawDataset
from cotrec.errors import DataError
from cotrec.rundir import DatasetStats

MIN_HISTORY = 3  # train history + valid target + test target
SPLITS = np.array(["train", "valid", "test"])


@dataclass
class Prepared:
    interactions: pd.DataFrame  # user_idx, item_idx, timestamp, position, split[, rating]
    items: pd.DataFrame  # item_idx, item_id, caption, attributes...
    users: pd.DataFrame  # user_idx, user_id, num_interactions, attributes...
    stats: DatasetStats


def _natural_order(ids: np.ndarray) -> np.ndarray:
    """Unique ids sorted numerically when they all are numbers, else as strings."""
    unique = pd.unique(ids)
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if not numeric.isna().any():
        return unique[np.argsort(numeric.to_numpy(), kind="stable")]
    return np.sort(unique.astype(str)).astype(object)


def _factorize_ids(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per-row codes (int32) into the column's distinct ids, and those ids as strings (an object array)."""
    codes, uniques = pd.factorize(column.to_numpy(), use_na_sentinel=False)
    codes = codes.astype(np.int32)
    as_text = pd.Index(uniques).astype(str).to_numpy(dtype=object)
    text_codes, text_uniques = pd.factorize(as_text)
    if len(text_uniques) < len(as_text):  # values that read the same (1 and "1") are one id
        return text_codes.astype(np.int32)[codes], np.asarray(text_uniques, dtype=object)
    return codes, as_text


def k_core(user_codes: np.ndarray, item_codes: np.ndarray, k_user: int, k_item: int,
           keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Mask of the kept interactions that survive the k-core filter, and the rounds it took."""
    n_users, n_items = user_codes.max(initial=-1) + 1, item_codes.max(initial=-1) + 1
    rounds = 0
    while True:
        rounds += 1
        user_counts = np.bincount(user_codes[keep], minlength=n_users)
        item_counts = np.bincount(item_codes[keep], minlength=n_items)
        survives = keep & (user_counts[user_codes] >= k_user) & (item_counts[item_codes] >= k_item)
        if survives.sum() == keep.sum():
            return survives, rounds
        keep = survives


def preprocess(raw: RawDataset, data: DataConfig) -> Prepared:
    inter = raw.interactions
    stats: DatasetStats = {"source": data.source, "dataset": raw.name, "domain": raw.domain,
                             "raw_interactions": int(len(inter)),
                             "raw_users": int(inter["user_id"].nunique()),
                             "raw_items": int(inter["item_id"].nunique())}

    items = raw.items.copy()
    items["item_id"] = items["item_id"].astype(str).str.strip()
    items["caption"] = items["caption"].fillna("").astype(str).str.strip()
    items = items[items["caption"] != ""].drop_duplicates("item_id", keep="first")

    # Each raw id column is factorised as it comes (ints stay ints) and only its distinct values
    # become strings: a per-row string copy of a large log costs gigabytes in the driver. Rows keep
    # their source order, and every sort below is stable: that order breaks timestamp ties.
    user_codes, user_uniques = _factorize_ids(inter["user_id"])
    item_codes, item_uniques = _factorize_ids(inter["item_id"])
    timestamps = np.asarray(inter["timestamp"].to_numpy(), dtype=np.int64)

    keep = (pd.Index(items["item_id"]).get_indexer(item_uniques) >= 0)[item_codes]
    stats["dropped_unknown_items"] = int((~keep).sum())
    if data.min_rating is not None:
        if "rating" not in inter.columns:
            raise DataError(f"{raw.name}: data.min_rating is set but the source has no ratings")
        rated = inter["rating"].to_numpy(dtype=np.float64) >= data.min_rating
        stats["dropped_low_rating"] = int((keep & ~rated).sum())
        keep &= rated

    if data.dedupe:
        # The earliest (timestamp, source order) kept interaction of each pair survives: one sort
        # by pair, kept rows first, then time; a pair's first row wins when it is kept.
        by_pair = np.lexsort((timestamps, ~keep, item_codes, user_codes))
        users_sorted, items_sorted = user_codes[by_pair], item_codes[by_pair]
        starts_pair = np.ones(len(by_pair), dtype=bool)
        starts_pair[1:] = (users_sorted[1:] != users_sorted[:-1]) | (items_sorted[1:] != items_sorted[:-1])
        del users_sorted, items_sorted
        first_of_pair = np.zeros(len(by_pair), dtype=bool)
        first_of_pair[by_pair[starts_pair]] = True
        del by_pair, starts_pair
        stats["dropped_repeats"] = int((keep & ~first_of_pair).sum())
        keep &= first_of_pair

    k_user = max(data.k_core, MIN_HISTORY)
    keep, rounds = k_core(user_codes, item_codes, k_user, data.k_core, keep)
    stats.update(k_core=data.k_core, k_core_user_minimum=k_user, k_core_rounds=rounds)
    if not keep.any():
        raise DataError(
            f"{raw.name}: nothing left after filtering ({data.k_core}-core, users need "
            f">= {k_user} interactions); lower data.k_core or check the input"
        )

    if data.sample_users is not None:
        remaining = _natural_order(user_uniques[pd.unique(user_codes[keep])])
        if data.sample_users < len(remaining):
            rng = np.random.default_rng(data.sample_seed)
            chosen = rng.choice(remaining, size=data.sample_users, replace=False)
            keep &= (pd.Index(chosen).get_indexer(user_uniques) >= 0)[user_codes]
        stats["sample"] = {"users": data.sample_users, "seed": data.sample_seed,
                           "from_users": int(len(remaining))}
        if data.sample_k_core is not None:
            keep, rounds = k_core(user_codes, item_codes, max(data.sample_k_core, MIN_HISTORY), data.sample_k_core,
                                  keep)
            stats["sample"].update(k_core=data.sample_k_core, k_core_rounds=rounds)
            if not keep.any():
                raise DataError(f"{raw.name}: nothing left of the {data.sample_users}-user sample after its "
                                f"{data.sample_k_core}-core; lower data.sample_k_core or sample more users")

    user_codes, item_codes, timestamps = user_codes[keep], item_codes[keep], timestamps[keep]
    user_index = pd.Index(_natural_order(user_uniques[pd.unique(user_codes)]))
    item_index = pd.Index(_natural_order(item_uniques[pd.unique(item_codes)]))
    user_idx = user_index.get_indexer(user_uniques)[user_codes].astype(np.int32)
    item_idx = item_index.get_indexer(item_uniques)[item_codes].astype(np.int32)

    del user_codes, item_codes
    chrono = np.lexsort((timestamps, user_idx))
    user_idx, item_idx, timestamps = user_idx[chrono], item_idx[chrono], timestamps[chrono]
    lengths = np.bincount(user_idx, minlength=len(user_index)).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
    position = (np.arange(len(user_idx), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
    from_end = np.repeat(lengths, lengths)
    from_end -= 1 + position  # 0 = last = test target
    split = np.zeros(len(from_end), dtype=np.int8)  # codes into SPLITS
    split[from_end == 1], split[from_end == 0] = 1, 2
    del from_end

    interactions = pd.DataFrame({"user_idx": user_idx, "item_idx": item_idx, "timestamp": timestamps,
                                 "position": position, "split": pd.Categorical.from_codes(split, categories=SPLITS)},
                                copy=False)  # the arrays are this table's own: no second copy of every row
    if "rating" in inter.columns:
        interactions["rating"] = inter["rating"].to_numpy(dtype=np.float32)[keep][chrono]

    items_out = items.set_index("item_id").loc[item_index].reset_index()
    items_out.insert(0, "item_idx", np.arange(len(item_index), dtype=np.int32))
    users_out = pd.DataFrame({"user_idx": np.arange(len(user_index), dtype=np.int32),
                              "user_id": user_index.to_numpy().astype(str),
                              "num_interactions": lengths.astype(np.int32)})
    if raw.users is not None and "user_id" in raw.users.columns:
        extra = raw.users.drop_duplicates("user_id").set_index("user_id")
        extra.index = extra.index.astype(str)
        users_out = users_out.join(extra, on="user_id")

    stats.update(
        users=int(len(user_index)), items=int(len(item_index)), interactions=int(len(interactions)),
        density=float(len(interactions) / (len(user_index) * len(item_index))),
        history_length={"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                        "min": int(lengths.min()), "max": int(lengths.max())},
        timestamps={"min": int(timestamps.min()), "max": int(timestamps.max())},
        split_rule="position n-1 = test target, n-2 = valid target, the rest train; "
                   "timestamp ties broken by source order",
    )
    return Prepared(interactions, items_out, users_out, stats)
