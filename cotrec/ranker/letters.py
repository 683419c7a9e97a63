"""The letter-scoring ranker and its evaluation (NDCG@K over all users, MAPB).

`LetterRanker` turns a candidate list, shown in a given order, into the ranking conversation
and reads the probabilities of the letters A, B, C, ... as the next token: one forward step per
list through the LLM interface (`score_choices`), no generation. Candidates are ranked by
those probabilities.

An evaluation plans its prompts (`plan_rankings`), has them scored (`evaluate_ranker` with a scorer
in this process; `cotrec.ranker.scoring` on a Ray Data actor pool for an LLM) and turns the scores
into ranks and metrics (`rankings_from_scores`); `score_plan` scores in this process. Lists whose target is not among the
candidates keep the retriever's rank (>= M, so they count as misses for K <= M, as in the
paper's Table 2); with no ranker at all every list keeps the retriever's rank, so "Ranker=None"
is the retriever's own NDCG. With MAPB on, each ranked list is scored with its target at each
of the M positions (all M prompts of a user in the same engine call); the prompt with the
target at its shown position is the one the NDCG uses, so the probe costs M-1 extra prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, TypedDict

import numpy as np
import pandas as pd

from cotrec.rundir import read_stats, read_table
from cotrec.extract.prompts import Domain, domain_of, item_labels
from cotrec.llm import letters
from cotrec.llm.base import Conversation, LLMEngine
from cotrec.metrics import ranking_metrics
from cotrec.progress import Progress
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


@dataclass
class RankingPlan:
    """What a split's evaluation asks of a ranker: per re-ranked list, the order it is shown in,
    where its target sits, and the orders of its prompts (all M positions with the MAPB probe)."""

    lists: list[CandidateList]
    with_mapb: bool
    ranked: list[int]  # indices of the lists whose target is among their candidates
    shown: list[tuple[np.ndarray, int, list[np.ndarray]]]  # per ranked list: order, target position, prompt orders

    @property
    def prompts_per_list(self) -> int:
        return len(self.lists[0].candidates) if self.with_mapb else 1

    def queries(self) -> list[Query]:
        """Every prompt to score, list by list, in the plan's order."""
        return [(self.lists[i], o) for i, (_, _, orders) in zip(self.ranked, self.shown) for o in orders]


def plan_rankings(lists: list[CandidateList], seed: int, with_mapb: bool, rerank: bool = True) -> RankingPlan:
    """The prompts an evaluation scores; `rerank` False plans none (every list keeps its rank)."""
    ranked = [i for i, lst in enumerate(lists) if lst.hit] if rerank else []
    shown = []
    for i in ranked:
        lst = lists[i]
        order = shown_order(lst, seed)
        target_index = lst.candidates.index(lst.target)
        position = int(np.flatnonzero(order == target_index)[0])
        # The probe's j-th order has the target at position j, so its order at the target's shown
        # position is the shown order itself.
        shown.append((order, position, probe_orders(order, target_index) if with_mapb else [order]))
    return RankingPlan(lists, with_mapb, ranked, shown)


# A ranker's test metrics: `metrics.ranking_metrics` at the default cut-offs, counts and times, and with
# the MAPB probe its MAPB; `scoring_actors` is the actor pool's size where one scored the prompts.
RankerMetrics = TypedDict("RankerMetrics", {
    "hit@1": float, "ndcg@1": float, "hit@5": float, "ndcg@5": float, "hit@10": float, "ndcg@10": float,
    "users": int, "ranked_users": int, "seconds": float, "lists_per_second": Optional[float], "mapb": float,
    "mean_rank_by_position": list[float], "scoring_actors": int}, total=False)


class RankingRow(TypedDict, total=False):
    """One list's row of `rankings.parquet`: what was shown, the scores, the target's ranks."""

    user_idx: int
    split: str
    target_item: int
    shown: list[int]
    probs: list[float]
    predicted: list[int]
    target_position: int
    target_rank: int
    retriever_rank: int
    ranks_by_position: list[int]
    bias: float


def rankings_from_scores(plan: RankingPlan, probs: np.ndarray, seconds: float,
                         ks: Sequence[int] = (1, 5, 10)) -> tuple[RankerMetrics, pd.DataFrame]:
    """Metrics and one rankings row per list, from the scores of `plan.queries()` in order."""
    lists, with_mapb = plan.lists, plan.with_mapb
    ranks = np.array([lst.retriever_rank for lst in lists], dtype=np.int64)
    per_user = plan.prompts_per_list if lists else 1
    rows: list[RankingRow] = []
    position_ranks: list[np.ndarray] = []
    for k, (i, (order, position, _)) in enumerate(zip(plan.ranked, plan.shown)):
        lst = lists[i]
        block = probs[k * per_user:(k + 1) * per_user]
        target_at = range(per_user) if with_mapb else [position]  # the target's position in each prompt
        target_ranks = np.array([predicted_ranks(p)[j] for p, j in zip(block, target_at)])
        shown_probs = block[position if with_mapb else 0]
        ranks[i] = target_ranks[position if with_mapb else 0]
        row: RankingRow = {"user_idx": lst.user_idx, "split": lst.split, "target_item": lst.target,
                           "shown": [lst.candidates[j] for j in order], "probs": shown_probs.astype(float).tolist(),
                           "predicted": [lst.candidates[order[j]] for j in ranked_order(shown_probs)],
                           "target_position": position, "target_rank": int(ranks[i]),
                           "retriever_rank": lst.retriever_rank}
        if with_mapb:
            row["ranks_by_position"] = target_ranks.tolist()
            row["bias"] = sample_bias(target_ranks)
            position_ranks.append(target_ranks)
        rows.append(row)
    ranked_set = set(plan.ranked)
    for i, lst in enumerate(lists):  # lists nobody re-ranks keep the retriever's rank
        if i not in ranked_set:
            rows.append({"user_idx": lst.user_idx, "split": lst.split, "target_item": lst.target,
                         "shown": list(lst.candidates), "probs": [], "predicted": list(lst.candidates),
                         "target_position": lst.candidates.index(lst.target) if lst.hit else -1,
                         "target_rank": int(ranks[i]), "retriever_rank": lst.retriever_rank})
    ranked = len(plan.ranked)
    metrics: RankerMetrics = {**ranking_metrics(ranks, ks), "users": len(lists), "ranked_users": ranked,
                              "seconds": round(seconds, 3),
                              "lists_per_second": (ranked * per_user / seconds) if ranked and seconds > 0 else None}
    if with_mapb and ranked:
        matrix = np.array(position_ranks, dtype=np.float64).reshape(-1, per_user)
        metrics["mapb"] = mapb(matrix)
        metrics["mean_rank_by_position"] = matrix.mean(axis=0).tolist()
    frame = pd.DataFrame(rows).sort_values("user_idx", kind="stable").reset_index(drop=True)
    return metrics, frame


def unranked(frame: pd.DataFrame, seconds: float, ks: Sequence[int] = (1, 5, 10)) -> tuple[RankerMetrics, pd.DataFrame]:
    """Metrics and rankings rows when no list is re-ranked (the `none` ranker), column-wise from
    candidates-table rows in user order: what `rankings_from_scores` gives for a plan without
    prompts, with no object per list, so the retriever-alone row costs little at any user count."""
    candidates = frame["candidates"].to_numpy()
    top = np.stack(candidates) if len(frame) else np.zeros((0, 0), dtype=np.int64)
    at_target = top == frame["target_item"].to_numpy()[:, None]
    ranks = frame["target_rank"].to_numpy(dtype=np.int64)
    rankings = pd.DataFrame({"user_idx": frame["user_idx"].to_numpy(), "split": frame["split"].to_numpy(),
                             "target_item": frame["target_item"].to_numpy(), "shown": candidates,
                             "probs": [[]] * len(frame), "predicted": candidates,
                             "target_position": np.where(at_target.any(axis=1), at_target.argmax(axis=1), -1),
                             "target_rank": ranks, "retriever_rank": ranks})
    metrics: RankerMetrics = {**ranking_metrics(ranks, ks), "users": len(frame), "ranked_users": 0,
                              "seconds": round(seconds, 3), "lists_per_second": None}
    return metrics, rankings


def score_plan(plan: RankingPlan, scorer: Optional[ListScorer], lists_per_call: int = 64,
               ks: Sequence[int] = (1, 5, 10), name: str = "ranker") -> tuple[RankerMetrics, pd.DataFrame]:
    """Score a plan's prompts with a scorer in this process, whole lists per call; returns (metrics,
    one rankings row per list). (`cotrec.ranker.scoring` scores an LLM ranker's plan on a Ray Data
    actor pool instead.)"""
    started = time.perf_counter()
    queries = plan.queries()
    per_list = plan.prompts_per_list if plan.lists else 1
    per_call = max(1, lists_per_call // per_list) * per_list
    blocks, progress = [], Progress(len(queries))
    for start in range(0, len(queries), per_call):
        blocks.append(scorer.score(queries[start:start + per_call]))  # type: ignore[union-attr]
        done = min(start + per_call, len(queries))
        progress.update(done, lambda rate: f"{name}: {done:,} of {len(queries):,} prompts scored ({rate:.1f} prompts/s)")
    probs = np.concatenate(blocks) if blocks else np.zeros((0, 0))
    return rankings_from_scores(plan, probs, time.perf_counter() - started, ks)


def evaluate_ranker(lists: list[CandidateList], scorer: Optional[ListScorer], seed: int, with_mapb: bool = True,
                    lists_per_call: int = 64, ks: Sequence[int] = (1, 5, 10),
                    name: str = "ranker") -> tuple[RankerMetrics, pd.DataFrame]:
    """Plan and rank every list with a scorer in this process (None: every list keeps its rank)."""
    return score_plan(plan_rankings(lists, seed, with_mapb, rerank=scorer is not None), scorer, lists_per_call, ks, name)
