"""SYNTHETIC interactions for scale runs and fault benchmarks: MovieLens-shaped, generated from a seed.

Never a stand-in for results: it exists so that a run of any size can be made without a download.
Items have a Zipf popularity and a genre; each user has a favourite genre, a history length drawn
log-uniformly between `min_history` and `max_history` (many short histories, a few long ones, as in
real logs), and draws most of their items from their genre, the rest from the whole catalogue, by
popularity. Repeats are left to `data.dedupe`, as in a real log.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cotrec.config import SyntheticConfig
from cotrec.data.raw import RawDataset

GENRES = ("Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi", "Horror", "Animation", "Documentary",
          "Western")
IN_GENRE = 0.7  # the share of a user's items drawn from their favourite genre


def load_synthetic(spec: SyntheticConfig) -> RawDataset:
    # 32-bit columns and no per-row temporary kept longer than its use: a million users are tens of
    # millions of rows, and the draws below are the same whatever width they are stored in.
    rng = np.random.default_rng(spec.seed)
    items = np.arange(spec.items)
    genre = rng.integers(len(GENRES), size=spec.items)
    popularity = 1.0 / np.power(rng.permutation(spec.items) + 1.0, spec.zipf)  # rank 1 = the most popular
    lengths = np.exp(rng.uniform(np.log(spec.min_history), np.log(spec.max_history + 1), size=spec.users)).astype(np.int64)
    lengths = np.clip(lengths, spec.min_history, spec.max_history).astype(np.int32)
    users = np.repeat(np.arange(spec.users, dtype=np.int32), lengths)
    favourite = rng.integers(len(GENRES), size=spec.users).astype(np.int8)[users]
    drawn = rng.choice(items, size=len(users), p=popularity / popularity.sum()).astype(np.int32)
    in_genre = rng.random(len(users)) < IN_GENRE
    for g in range(len(GENRES)):  # the in-genre draws, genre by genre, by popularity within the genre
        pool = items[genre == g]
        chosen = in_genre & (favourite == g)
        if len(pool) and chosen.any():
            weights = popularity[pool] / popularity[pool].sum()
            drawn[chosen] = rng.choice(pool, size=int(chosen.sum()), p=weights)
    del favourite, in_genre, chosen
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]).astype(np.int32)
    step = np.arange(len(users), dtype=np.int32)
    step -= np.repeat(starts, lengths)  # each row's index within its user's history
    timestamps = np.repeat(np.arange(spec.users, dtype=np.int64) * 7 + 1_000_000_000, lengths)
    timestamps += step.astype(np.int64) * 86_400
    del step
    # integer ids: the prepare stage names ids as text only once per distinct id
    interactions = pd.DataFrame({"user_id": users, "item_id": drawn, "timestamp": timestamps}, copy=False)
    catalogue = pd.DataFrame({"item_id": items.astype(str),
                              "caption": [f"Synthetic Movie {i}" for i in items],
                              "year": (1950 + items % 70).astype(str),
                              "genres": [GENRES[g] for g in genre]})
    return RawDataset(name="synthetic", domain="movie", interactions=interactions, items=catalogue,
                      files=[f"synthetic: {spec.model_dump()}"])
