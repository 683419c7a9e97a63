"""Position bias of a list ranker: MAPB, the mean absolute position bias.

An LLM that reads a list tends to favour some positions (the first letter, the last one)
whatever sits there. MAPB measures how far the target's predicted rank moves when only its
position changes: for each user whose target is among the M candidates, the other candidates
stay in one fixed order and the target is inserted at each position j = 0 .. M-1; with r_j the
target's predicted rank (0 = first) for position j, the user's bias is mean_j |r_j - mean(r)|,
and MAPB is the mean over users. A ranker that judges items, not places, scores 0.
"""

from __future__ import annotations

import numpy as np


def ranked_order(probs: np.ndarray) -> np.ndarray:
    """The shown positions from best to worst: by probability, ties to the earlier position.

    The one ranking rule, shared by the offline evaluation and the Serve ranker.
    """
    return np.argsort(-np.asarray(probs), kind="stable")


def predicted_ranks(probs: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of every shown position, under `ranked_order`."""
    order = ranked_order(probs)
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def probe_orders(shown: np.ndarray, target_index: int) -> list[np.ndarray]:
    """The M orders of the probe: the others in their shown order, the target at each position."""
    others = [int(i) for i in shown if int(i) != target_index]
    return [np.array(others[:j] + [target_index] + others[j:]) for j in range(len(shown))]


def sample_bias(ranks_by_position: np.ndarray) -> float:
    """One user's bias: mean absolute deviation of the target's rank over the M positions."""
    ranks = np.asarray(ranks_by_position, dtype=np.float64)
    return float(np.abs(ranks - ranks.mean()).mean())


def mapb(rank_matrix: np.ndarray) -> float:
    """MAPB over users: rows are users, columns the M positions, entries the target's rank."""
    matrix = np.asarray(rank_matrix, dtype=np.float64)
    if matrix.size == 0:
        return 0.0
    return float(np.mean([sample_bias(row) for row in matrix]))


class ReferenceScorer:
    """A ranker that reads nothing: scores come at once, so the async path is the sync one."""

    def score(self, queries: list) -> np.ndarray:
        raise NotImplementedError

    async def ascore(self, queries: list) -> np.ndarray:
        return self.score(queries)


class PositionScorer(ReferenceScorer):
    """Ranks by the shown position alone (A first): MAPB 2.5 with 10 candidates, the most biased."""

    def score(self, queries: list) -> np.ndarray:
        return np.stack([np.linspace(1.0, 0.0, len(order)) for _, order in queries])


class RandomScorer(ReferenceScorer):
    """A random order for each prompt, whatever it shows: what "no signal" scores (MAPB about 2.33
    with 10 candidates). Seeded by the list's user, split and shown order, so a list gets the same
    scores offline and served."""

    def __init__(self, seed: int):
        self.seed = seed

    def score(self, queries: list) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, 29, max(lst.user_idx, 0), len(lst.split), *map(int, order)])
                         .random(len(order)) for lst, order in queries])
