"""Online recommendation from a run directory: the retriever -> ranker chain for one request.

The Ray Serve deployments (`cotrec/serve_app.py`) wrap these two classes, and the offline evaluation
shares their code paths, which is why `cotrec evaluate --via-serve` reproduces the offline
metrics exactly:
- `RetrieverService` loads a trained SASRec variant and scores any batch of histories with the
  same function as the offline evaluation (`score_queries`: last `max_len` items in, the whole
  history masked, top-k out). A known user is served from the stored interactions at a horizon:
  `next` (the whole history), `test` or `valid` (the leave-one-out histories, for evaluation).
  An unknown user sends a history of raw item ids; with a user-token model it gets the mean
  user embedding (nothing is known about them).
- `RankerService` re-ranks the top-M with the letter-scoring LLM ranker in the same shown order as
  the offline evaluation, with the stored preference and perceptions when the prompt uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, TypedDict, Union

import numpy as np

from cotrec.config import REFERENCE_RANKERS, Config, load_config, parse_ranker
from cotrec.errors import CotrecError, DataError
from cotrec.llm import make_engine
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import ANONYMOUS, CandidateList, shown_order, stored_key_terms, stored_preferences
from cotrec.ranker.mapb import PositionScorer, RandomScorer, ranked_order
from cotrec.ranker.prompts import shorten, uses_perceptions, uses_preference
from cotrec.ranker.stage import merged_model
from cotrec.retriever.data import Sequences, history_queries
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.trained import load_retriever
from cotrec.rundir import RunDir, read_stats, read_table
from cotrec.storage import as_path, location

HORIZONS = ("next", "valid", "test")


class RequestError(CotrecError):
    """A request the service cannot answer: `status` is the HTTP status to return."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class Resolved(TypedDict):
    """A request resolved against the run: the user (None: unknown to it), the user row the model
    reads, the history as item_idx, and the horizon."""

    user_idx: Optional[int]
    model_user: int
    history: np.ndarray
    horizon: str


class TopItems(TypedDict):
    """One request's retrieved items (item_idx), best first, with their scores."""

    items: list[int]
    scores: list[float]


class ItemRow(TypedDict, total=False):
    """A recommended item as a reply shows it (`retriever_score` and `ranker_prob` added by the app)."""

    item_id: str
    item_idx: int
    caption: str
    score: float
    retriever_score: float
    ranker_prob: float


class Ranked(TypedDict):
    """A re-ranked list: the candidates' indices in ranked order and their letter probabilities."""

    order: list[int]
    probs: list[float]


class RecommendBody(TypedDict, total=False):
    """A `POST /recommend` body (the app's RecommendRequest, with `k` widened for a re-rank)."""

    user_id: Optional[Union[str, int]]
    history: Optional[list[Union[str, int]]]
    k: int
    rerank: bool
    horizon: str


def run_config(run: RunDir) -> Config:
    path = run / "config.yaml"
    if not path.is_file():
        raise DataError(f"{path}: not a run directory (no config.yaml)")
    return load_config(str(path))


class RetrieverService:
    """A trained SASRec variant and the run's users and items, ready to score histories."""

    def __init__(self, run_dir: str | Path, variant: Optional[str] = None, max_history: int = 2000):
        self.run = RunDir(run_dir)
        self.config = config = run_config(self.run)
        # default: the last of Table 2's retrievers (CRM++, the personalised one)
        self.variant = variant or config.ranker.default_retriever
        self.model = load_retriever(config, self.run, self.variant, unknown_user=True)
        cfg = self.model.cfg
        self.unknown_user = cfg.num_users - 1 if cfg.user_token else 0
        self.mask_history = config.retriever.mask_history
        self.max_len = cfg.max_len
        self.max_history = max_history
        items = read_table(self.run, "items").sort_values("item_idx")
        self.captions = items["caption"].astype(str).tolist()
        self.item_ids = items["item_id"].astype(str).tolist()
        self.item_index = {raw: i for i, raw in enumerate(self.item_ids)}
        users = read_table(self.run, "users").sort_values("user_idx")
        self.user_ids = users["user_id"].astype(str).tolist()
        self.user_index = {raw: i for i, raw in enumerate(self.user_ids)}
        self.seqs = Sequences.from_interactions(read_table(self.run, "interactions"), num_items=len(items))
        self.domain = read_stats(self.run).get("domain", "movie")

    # -- requests --------------------------------------------------------------------------
    def resolve(self, request: RecommendBody) -> Resolved:
        """A validated request -> (user_idx or the unknown user, history as item_idx, horizon)."""
        horizon = request.get("horizon", "next")
        if horizon not in HORIZONS:
            raise RequestError(f"horizon {horizon!r} is not one of {', '.join(HORIZONS)}")
        history = request.get("history")
        user_id = request.get("user_id")
        if history is not None:
            if len(history) > self.max_history:
                raise RequestError(f"history has {len(history)} items; at most {self.max_history} are accepted "
                                   f"(send the most recent ones)")
            unknown = [h for h in history if str(h) not in self.item_index]
            if unknown:
                raise RequestError(f"history item {unknown[0]!r} is not in the catalogue")
            items = np.array([self.item_index[str(h)] for h in history], dtype=np.int64)
            user = self.user_index.get(str(user_id)) if user_id is not None else None
            return {"user_idx": user, "model_user": self.unknown_user if user is None else user,
                    "history": items, "horizon": "next"}
        if user_id is None:
            raise RequestError("give a user_id, or a history (item ids, oldest first) for an unknown user")
        user = self.user_index.get(str(user_id))
        if user is None:
            raise RequestError(f"unknown user {user_id!r}; send their history to get recommendations", status=404)
        return {"user_idx": user, "model_user": user, "history": self.user_history(user, horizon), "horizon": horizon}

    def user_history(self, user: int, horizon: str) -> np.ndarray:
        if horizon == "next":
            return np.concatenate([self.seqs.history("test", user), [self.seqs.test[user]]]).astype(np.int64)
        return self.seqs.history(horizon, user)

    def retrieve(self, resolved: Sequence[Resolved], k: int) -> list[TopItems]:
        """Top-k items (item_idx, score) for each resolved request, in one batched forward pass."""
        if not resolved:
            return []
        queries = history_queries([r["history"] for r in resolved], np.array([r["model_user"] for r in resolved]),
                                  np.zeros(len(resolved), dtype=np.int64), self.max_len)
        out = score_queries(self.model, queries, np.arange(len(resolved)), self.mask_history, top_m=k,
                            batch_size=max(1, len(resolved)))
        return [{"items": [int(i) for i in items], "scores": [float(s) for s in scores]}
                for items, scores in zip(out["top_items"], out["top_scores"])]

    def preferences_of(self, user: int) -> dict[str, str]:
        """The user's stored long-term preference per horizon (empty when not extracted)."""
        if not hasattr(self, "_preferences"):
            table: dict[int, dict[str, str]] = {}
            for (user_idx, horizon), text in stored_preferences(self.run, need=None).items():
                if text:
                    table.setdefault(user_idx, {})[horizon] = text
            self._preferences = table
        return self._preferences.get(int(user), {})

    def describe(self, items: Sequence[int], scores: Sequence[float]) -> list[ItemRow]:
        return [{"item_id": self.item_ids[i], "item_idx": int(i), "caption": self.captions[i], "score": float(s)}
                for i, s in zip(items, scores)]


class RankerService:
    """The letter-scoring ranker of one (retriever, ranker) pair, for single candidate lists."""

    def __init__(self, run_dir: str | Path, variant: str, ranker: str, engine: Any = None):
        self.run = RunDir(run_dir)
        self.config = config = run_config(self.run)
        self.variant, self.ranker = variant, ranker
        self.prompt, fine_tuned = parse_ranker(ranker)
        if self.prompt == "none":
            raise CotrecError("ranker 'none' needs no ranker service")
        if self.prompt in REFERENCE_RANKERS:  # they read nothing: no engine
            self.engine, self.model = None, None
            self.scorer = RandomScorer(config.seed) if self.prompt == "random" else PositionScorer()
            self.preferences, self.key_terms = {}, {}
            return
        model = config.llm.model
        if fine_tuned:  # on disk or on a store (the engine's resolve_model downloads a URI)
            merged = as_path(merged_model(config, self.run, variant, self.prompt))
            if not merged.is_dir():
                raise DataError(f"{merged}: no fine-tuned ranker; run `cotrec ranker train --retriever {variant} "
                                f"--prompt {self.prompt}` first")
            model = location(merged)
        if engine is None:  # a fine-tuned model in the dtype it was merged in, as the offline evaluation serves it
            dtype = {"dtype": config.ranker.merged_dtype} if fine_tuned else {}
            engine = make_engine(config.llm.model_copy(update={"model": model, **dtype}))
        self.engine, self.model = engine, model
        self.scorer = LetterRanker.for_run(self.run, self.prompt, engine)
        self.preferences, self.key_terms = self._stored_extraction()

    def _stored_extraction(self) -> tuple[dict, dict]:
        """The stored preferences and perception key terms the prompt shows (empty when unused)."""
        # need=None: a served user may have no stored extraction (new users never do); their
        # prompts show empty text, as for a row whose extraction failed.
        preferences = stored_preferences(self.run, need=None) if uses_preference(self.prompt) else {}
        key_terms = (stored_key_terms(self.run, self.config.ranker.key_terms, need=None)
                     if uses_perceptions(self.prompt) else {})
        return preferences, key_terms

    def candidate_list(self, user_idx: Optional[int], horizon: str, history: np.ndarray, candidates: Sequence[int]) -> Any:
        split = "test" if horizon == "next" else horizon  # the latest stored state stands for "next"
        user = ANONYMOUS if user_idx is None else int(user_idx)
        lst = CandidateList(user, split, [int(i) for i in history[-self.config.ranker.history_items:]],
                            [int(c) for c in candidates], target=-1, retriever_rank=-1,
                            preference=shorten(self.preferences.get((user, split), ""), self.config.ranker.preference_chars))
        if self.key_terms:
            lst.key_terms = [self.key_terms.get((user, split, int(c)), []) for c in candidates]
        return lst

    async def rerank(self, lists: Sequence[Any]) -> list[Ranked]:
        """Per list, the candidates' indices in ranked order (the offline rule, `ranked_order`)
        and their letter probabilities."""
        orders = [shown_order(lst, self.config.ranker.shuffle_seed) for lst in lists]
        probs = await self.scorer.ascore(list(zip(lists, orders)))
        out: list[Ranked] = []
        for order, p in zip(orders, probs):
            best = ranked_order(p)
            out.append({"order": [int(i) for i in order[best]], "probs": [float(x) for x in p[best]]})
        return out

    def check_health(self) -> None:
        if self.engine is not None:
            self.engine.check_health()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
