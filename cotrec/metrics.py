"""Ranking metrics over target ranks, named as in the paper (`hit@10`, `ndcg@10`).

Every function takes the 0-based rank of each user's target (0 = ranked first; a target that
could not be ranked at all, e.g. masked or missing from a candidate list, gets any rank >= K)
and returns the mean over users. Leave-one-out has one target per user, so NDCG@K is
1 / log2(rank + 2) when the target is in the top K and 0 otherwise (the ideal DCG is 1).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def hit_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of users whose target is among the top k."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks < k)) if ranks.size else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item per user."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    gains = np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
    return float(gains.mean())


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """`{"hit@K": ..., "ndcg@K": ...}` for every K, in the order given."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k (the mean of these is `ndcg_at_k`)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)


def paired_bootstrap(differences: np.ndarray, rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    """The mean of paired per-user differences (treatment - baseline on the same users) and its 95%
    bootstrap interval. `differences` is (users,) or (seeds, users): with seeds, each round resamples
    the seeds and the users, so the interval holds both sources of variation.

    A round's resample of users only decides how often each user is drawn, and users whose
    differences (across seeds) are equal are interchangeable: so a round draws how often each
    distinct column is drawn (a multinomial over their shares), the same distribution as drawing
    users one by one at a cost that grows with the distinct columns, not the users (a difference of
    NDCG@10 takes at most 121 values per seed, however many users there are)."""
    values = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    seeds, users = values.shape
    columns, counts = np.unique(values, axis=1, return_counts=True)
    shares = counts / users
    by_users = columns.shape[1] * 2 > users  # nearly every column distinct: drawing users is cheaper
    rng = np.random.default_rng(seed)
    means = np.empty(rounds)
    for r in range(rounds):
        chosen = rng.integers(seeds, size=seeds)
        if by_users:
            means[r] = values[chosen][:, rng.integers(users, size=users)].mean()
        else:
            means[r] = columns[chosen].mean(axis=0) @ rng.multinomial(users, shares) / users
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "rounds": rounds,
            "seeds": seeds, "users": users}
