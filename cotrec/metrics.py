"""Ranking metrics over target ranks, named as in the paper (`hit@10`, `ndcg@10`).

Every function takes the 0-based rank of each user's target (0 = ranked first; a target that
could not be ranked at all, e.g. masked or missing from a candidate list, gets any rank >= K)
and returns the mean over users. Leave-one-out has one target per user, so NDCG@K is
1 / log2(rank + 2) when the target is in the top K and 0 otherwise (the ideal DCG is 1).
"""

from __future__ import annotations

from typing import Iterable, Optional, TypedDict

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


# The NDCG@10 of a target ranked at each of the 10 positions in turn, averaged: what any ranker that
# ranks by shown position alone scores on every list, averaged over the MAPB probe's positions.
POSITION_ONLY_NDCG = float(np.mean(1.0 / np.log2(np.arange(10) + 2.0)))


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


# Fewer paired lists than this and a difference is printed without an interval: a percentile
# bootstrap's 95% interval then holds a known zero effect too rarely to carry a 95% claim. Chosen
# by `bootstrap_coverage` (a null of NDCG@10 differences between two rankers that each place the
# target at random; 3 x 1,000 replicates): 0.84 at 7 lists, 0.88 at 10, 0.92 at 20, 0.93 at 30 and
# 40, 0.94 at 60, 0.95 from about 80.
MIN_PAIRED_LISTS = 40


class PairedDifference(TypedDict, total=False):
    """`paired_difference`: the mean, and its 95% interval (`interval: True`) or why it has none."""

    mean: float
    low: float
    high: float
    rounds: int
    seeds: int
    users: int
    lists: int
    interval: Optional[bool]
    why: str


def paired_difference(differences: np.ndarray, lists: Optional[int] = None, seed: int = 0) -> PairedDifference:
    """`paired_bootstrap`, or where the paired lists are too few for it (`MIN_PAIRED_LISTS`) the mean
    alone and why (`interval: None`). `lists`: how many of the pairs can differ at all (a ranker
    against its retriever: the re-ranked lists; default: the users of a (seeds, users) matrix)."""
    values = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    lists = values.shape[1] if lists is None else lists
    if lists >= MIN_PAIRED_LISTS:
        return {**paired_bootstrap(values, seed=seed), "lists": lists, "interval": True}
    return {"mean": float(values.mean()) if values.size else 0.0, "users": int(values.shape[1]),
            "seeds": int(values.shape[0]), "lists": lists, "interval": None,
            "why": f"{lists} paired lists, fewer than the {MIN_PAIRED_LISTS} a 95% interval needs"}


def bootstrap_coverage(lists: int, replicates: int = 400, rounds: int = 1000, seed: int = 0) -> float:
    """How often `paired_bootstrap`'s percentile interval over `lists` paired NDCG@10 differences holds
    0 when the true difference is 0 (two rankers that each put the target at a uniformly random rank
    of 10): the interval's real coverage at that size, which should be 0.95."""
    rng = np.random.default_rng(seed)
    gains = 1.0 / np.log2(np.arange(10) + 2.0)
    held = 0
    for _ in range(replicates):
        differences = gains[rng.integers(10, size=lists)] - gains[rng.integers(10, size=lists)]
        means = differences[rng.integers(lists, size=(rounds, lists))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        held += low <= 0.0 <= high
    return held / replicates
