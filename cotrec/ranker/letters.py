"""The letter-scoring ranker and its evaluation (NDCG@K over all users, MAPB).

`LetterRanker` turns a candidate list, shown in a given order, into the ranking conversation
and reads the probabilities of the letters A, B, C, ... as the next token: one forward step per
list through the LLM interface (`score_choices`), no generation. Candidates are ranked by
those probabilities.

`evaluate_ranker` runs a ranker over every list of a split. Lists whose target is not among the
candidates keep the retriever's rank (>= M, so they count as misses for K <= M, as in the
paper's Table 2); with no ranker at all every list keeps the retriever's rank, so "Ranker=None"
is the retriever's own NDCG. With MAPB on, each ranked list is scored with its target at each
of the M positions (all M prompts of a user in the same engine call); the prompt with the
target at its shown position is the one the NDCG uses, so the probe costs M-1 extra prompts.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import pandas as pd

from cotrec.rundir import read_stats, read_table
from cotrec.extract.prompts import Domain, domain_of, item_labels
from cotrec.llm import letters
from cotrec.llm.base import Conversation, LLMEngine
from cotrec.metrics import ranking_metrics
from cotrec.progress import log
from cotrec.ranker.lists import CandidateList, shown_order
from cotrec.ranker.mapb import mapb, predicted_ranks, probe_orders, ranked_order, sample_bias
from cotrec.ranker.prompts import ranking_conversation
from cotrec.rundir import RunDir

Query = tuple[CandidateList, np.ndarray]  # a list and the order (indices) its candidates are shown in


class ListScorer(Protocol):
    def score(self, queries: Sequence[Query]) -> np.ndarray:
        """Per query, one score per shown position (higher is better)."""


class LetterRanker:
    """Scores lists by the probabilities of their index letters, through an LLM engine."""

    def __init__(self, engine: Optional[LLMEngine], domain: Domain, prompt: str, labels: Sequence[str]):
        self.engine, self.domain, self.prompt, self.labels = engine, domain, prompt, labels

    @classmethod
    def for_run(cls, run: RunDir, prompt: str, engine: Optional[LLMEngine] = None) -> "LetterRanker":
        """The ranker over a run's items (their labels) and domain; no engine builds prompts only."""
        return cls(engine, domain_of(read_stats(run).get("domain", "movie")), prompt, item_labels(read_table(run, "items")))

    def conversation(self, lst: CandidateList, order: np.ndarray) -> Conversation:
        shown = [lst.candidates[i] for i in order]
        terms = [lst.key_terms[i] for i in order] if lst.key_terms else None
        return ranking_conversation(self.domain, self.prompt, [self.labels[i] for i in lst.history],
                                    [self.labels[i] for i in shown], lst.preference, terms)

    def _request(self, queries: Sequence[Query]) -> tuple[list[Conversation], list[str]]:
        sizes = {len(order) for _, order in queries}
        if len(sizes) != 1:
            raise ValueError(f"all lists must have the same number of candidates, got sizes {sorted(sizes)}")
        return [self.conversation(lst, order) for lst, order in queries], letters(sizes.pop())

    def score(self, queries: Sequence[Query]) -> np.ndarray:
        if not queries:
            return np.zeros((0, 0))
        return np.stack([s.probs for s in self.engine.score_choices_sync(*self._request(queries))])

    async def ascore(self, queries: Sequence[Query]) -> np.ndarray:
        """`score` from an event loop (a Serve replica): the engine batches concurrent callers."""
        if not queries:
            return np.zeros((0, 0))
        return np.stack([s.probs for s in await self.engine.score_choices(*self._request(queries))])


def evaluate_ranker(lists: list[CandidateList], scorer: Optional[ListScorer], seed: int, with_mapb: bool = True,
                    lists_per_call: int = 64, ks: Sequence[int] = (1, 5, 10),
                    name: str = "ranker") -> tuple[dict[str, Any], pd.DataFrame]:
    """Rank every list; returns (metrics, one rankings row per list)."""
    started = time.perf_counter()
    ranks = np.array([lst.retriever_rank for lst in lists], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    ranked = [i for i, lst in enumerate(lists) if lst.hit] if scorer is not None else []
    m = len(lists[0].candidates) if lists else 0
    per_user = m if with_mapb else 1
    users_per_call = max(1, lists_per_call // per_user)
    position_ranks: list[np.ndarray] = []
    last_log = time.perf_counter()
    for start in range(0, len(ranked), users_per_call):
        chunk = ranked[start:start + users_per_call]
        # Per list: the shown order, where the target sits in it, and the prompts' orders. The
        # probe's j-th order has the target at position j, so its order at the target's shown
        # position is the shown order itself.
        plans = []
        for i in chunk:
            lst = lists[i]
            order = shown_order(lst, seed)
            target_index = lst.candidates.index(lst.target)
            position = int(np.flatnonzero(order == target_index)[0])
            orders = probe_orders(order, target_index) if with_mapb else [order]
            plans.append((i, order, position, orders))
        probs = scorer.score([(lists[i], o) for i, _, _, orders in plans for o in orders])
        for k, (i, order, position, orders) in enumerate(plans):
            lst = lists[i]
            block = probs[k * per_user:(k + 1) * per_user]
            target_at = range(per_user) if with_mapb else [position]  # the target's position in each prompt
            target_ranks = np.array([predicted_ranks(p)[j] for p, j in zip(block, target_at)])
            shown = position if with_mapb else 0
            shown_probs = block[shown]
            ranks[i] = target_ranks[shown]
            row = {"user_idx": lst.user_idx, "split": lst.split, "target_item": lst.target,
                   "shown": [lst.candidates[j] for j in order], "probs": shown_probs.astype(float).tolist(),
                   "predicted": [lst.candidates[order[j]] for j in ranked_order(shown_probs)],
                   "target_position": position, "target_rank": int(ranks[i]),
                   "retriever_rank": lst.retriever_rank}
            if with_mapb:
                row["ranks_by_position"] = target_ranks.tolist()
                row["bias"] = sample_bias(target_ranks)
                position_ranks.append(target_ranks)
            rows.append(row)
        if time.perf_counter() - last_log > 10:
            done = min(start + users_per_call, len(ranked))
            log(f"{name}: {done:,} of {len(ranked):,} lists ranked "
                f"({done / (time.perf_counter() - started):.1f} lists/s)")
            last_log = time.perf_counter()
    ranked_set = set(ranked)
    for i, lst in enumerate(lists):  # lists nobody re-ranks keep the retriever's rank
        if i not in ranked_set:
            rows.append({"user_idx": lst.user_idx, "split": lst.split, "target_item": lst.target,
                         "shown": list(lst.candidates), "probs": [], "predicted": list(lst.candidates),
                         "target_position": lst.candidates.index(lst.target) if lst.hit else -1,
                         "target_rank": int(ranks[i]), "retriever_rank": lst.retriever_rank})
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {**ranking_metrics(ranks, ks), "users": len(lists), "ranked_users": len(ranked),
                               "seconds": round(seconds, 3),
                               "lists_per_second": (len(ranked) * per_user / seconds) if ranked else None}
    if with_mapb and scorer is not None:
        matrix = np.array(position_ranks, dtype=np.float64).reshape(-1, m)
        metrics["mapb"] = mapb(matrix)
        metrics["mean_rank_by_position"] = matrix.mean(axis=0).tolist() if len(matrix) else []
    frame = pd.DataFrame(rows).sort_values("user_idx", kind="stable").reset_index(drop=True)
    return metrics, frame
