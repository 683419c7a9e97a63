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
    rng = np.random.default_rng(spec.seed)
    items = np.arange(spec.items)
    genre = rng.integers(len(GENRES), size=spec.items)
    popularity = 1.0 / np.power(rng.permutation(spec.items) + 1.0, spec.zipf)  # rank 1 = the most popular
    lengths = np.exp(rng.uniform(np.log(spec.min_history), np.log(spec.max_history + 1), size=spec.users)).astype(np.int64)
    lengths = np.clip(lengths, spec.min_history, spec.max_history)
    users = np.repeat(np.arange(spec.users), lengths)
    favourite = rng.integers(len(GENRES), size=spec.users)[users]
    drawn = rng.choice(items, size=len(users), p=popularity / popularity.sum())
    in_genre = rng.random(len(users)) < IN_GENRE
    for g in range(len(GENRES)):  # the in-genre draws, genre by genre, by popularity within the genre
        pool = items[genre == g]
        chosen = in_genre & (favourite == g)
        if len(pool) and chosen.any():
            weights = popularity[pool] / popularity[pool].sum()
            drawn[chosen] = rng.choice(pool, size=int(chosen.sum()), p=weights)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    step = np.arange(len(users)) - np.repeat(starts, lengths)
    # integer ids: the prepare stage names ids as text only once per distinct id
    interactions = pd.DataFrame({"user_id": users, "item_id": drawn,
                                 "timestamp": 1_000_000_000 + np.repeat(np.arange(spec.users) * 7, lengths) + step * 86_400})
    catalogue = pd.DataFrame({"item_id": items.astype(str),
                              "caption": [f"Synthetic Movie {i}" for i in items],
                              "year": (1950 + items % 70).astype(str),
                              "genres": [GENRES[g] for g in genre]})
    return RawDataset(name="synthetic", domain="movie", interactions=interactions, items=catalogue,
                      files=[f"synthetic: {spec.model_dump()}"])
