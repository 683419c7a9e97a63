"""The candidate lists the ranker reads: a retriever's top-M per user, with what the prompts show.

One `CandidateList` per (user, split) of a retriever variant's `candidates.parquet`: the last
`ranker.history_items` items before the target, the candidates in the retriever's order, the
target and its full-ranking rank. For `llm+` / `llm++` it also carries the user's preference at
that horizon and, for `llm++`, the key terms of each candidate's perception
(`<run>/extract/preferences`, `<run>/extract/perceptions`). A row the extraction recorded as
failed shows as empty text and is counted; a row that was never extracted is an error naming the
command that makes it.

Candidates are shown to the LLM in a seeded random order (`shown_order`), never the retriever's:
LlamaRec-style rankers otherwise learn "the first letter is usually right".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from cotrec.config import Config
from cotrec.errors import DataError
from cotrec.extract.programs import output_folder, stored_outputs
from cotrec.extract.windows import history_digest
from cotrec.ranker.prompts import shorten, uses_perceptions, uses_preference
from cotrec.retriever.data import Sequences, history_queries
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.stage import load_retriever
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, read_table

SPLIT_CODES = {"valid": 1, "test": 2, "prefix": 3}
MIN_PREFIX = 3  # a prefix list's target has at least this many training items before it


ANONYMOUS = -1  # the user_idx of a list for a user the run has never seen (a served history)


@dataclass
class CandidateList:
    user_idx: int                 # ANONYMOUS for a user without an index
    split: str                    # valid | test: which target this list is for
    history: list[int]            # the last items before the target, oldest first
    candidates: list[int]         # the retriever's top-M, best first
    target: int
    retriever_rank: int           # the target's rank in the retriever's full ranking (0 = first)
    preference: str = ""
    key_terms: list[list[str]] = field(default_factory=list)  # per candidate, retriever order
    position: int = -1            # a prefix list's target: its index among the user's training items

    @property
    def hit(self) -> bool:
        """Whether the target is among the candidates: only such lists can be re-ranked."""
        return self.target in self.candidates


def shown_order(lst: CandidateList, seed: int, epoch: int = 0) -> np.ndarray:
    """The seeded order (indices into `lst.candidates`) in which the candidates are shown. A user
    without an index is keyed by its history instead, so the same request gets the same order."""
    user = lst.user_idx if lst.user_idx >= 0 else int(history_digest(list(lst.history)), 16)
    key = [seed, user, SPLIT_CODES[lst.split], epoch] + ([lst.position] if lst.position >= 0 else [])
    return np.random.default_rng(key).permutation(len(lst.candidates))


def candidates_path(config: Config, run: RunDir, variant: str) -> Path:
    user, item = parse_variant(variant)
    return run / variant_dir(config, user, item, config.seed) / "candidates.parquet"


def _extraction(run: RunDir, kind: str, need: Optional[str]) -> pd.DataFrame:
    """The newest row per key of an extraction folder; with `need` None, an empty folder is empty."""
    frame = stored_outputs(run, kind)
    if frame.empty and need is not None:
        raise DataError(f"{output_folder(run, kind)}: no extraction output, needed for {need}; run "
                        f"`cotrec extract {kind}` first")
    return frame


def candidate_rows(config: Config, run: RunDir, variant: str, split: str, only_hits: bool = False,
                   limit: Optional[int] = None) -> pd.DataFrame:
    """One split's rows of a retriever variant's candidates table, in user order (only those whose
    target is among the candidates, with `only_hits`), or a seeded sample of `limit` of them."""
    path = candidates_path(config, run, variant)
    if not path.is_file():
        user, item = parse_variant(variant)
        raise DataError(f"{path}: no retriever candidates; train that variant first "
                        f"(`cotrec retriever train --variant {user}/{item}`)")
    frame = pd.read_parquet(str(path), filters=[("split", "==", split)])  # the other split is never read whole
    frame = frame.sort_values("user_idx", kind="stable")
    if only_hits:
        frame = frame[frame["target_in_candidates"]]
    keep = sample_positions(len(frame), limit, config.seed)
    return (frame if keep is None else frame.iloc[keep]).reset_index(drop=True)


def load_lists(config: Config, run: RunDir, variant: str, split: str, prompt: str,
               only_hits: bool = False, limit: Optional[int] = None) -> tuple[list[CandidateList], dict[str, Any]]:
    """The candidate lists of one retriever variant and split, with what `prompt` shows.

    Returns the lists (every user in user order, or a seeded sample of `limit` of them) and
    counts of what the prompts lack. Sampling comes before the extraction is read, so only the
    sampled users need preferences and perceptions.
    """
    frame = candidate_rows(config, run, variant, split, only_hits, limit)
    seqs = Sequences.from_interactions(read_table(run, "interactions"), num_items=len(read_table(run, "items")))
    keep = config.ranker.history_items
    lists = [CandidateList(int(row.user_idx), split, [int(i) for i in seqs.history(split, int(row.user_idx))[-keep:]],
                           [int(i) for i in row.candidates], int(row.target_item), int(row.target_rank))
             for row in frame.itertuples(index=False)]
    notes = {"lists": len(lists), "hits": sum(lst.hit for lst in lists)}
    ranked = [lst for lst in lists if lst.hit]
    if uses_preference(prompt) and ranked:
        notes.update(_attach_preferences(run, ranked, split, config.ranker.preference_chars))
    if uses_perceptions(prompt) and ranked:
        notes.update(_attach_key_terms(run, ranked, split, config.ranker.key_terms))
    return lists, notes


def _ok_text(frame: pd.DataFrame, column: str) -> pd.Series:
    text = frame[column].astype("string").fillna("")
    if "status" in frame.columns:
        text = text.where(frame["status"].astype(str) == "ok", "")
    return text


def stored_preferences(run: RunDir, need: Optional[str] = "the llm+ and llm++ prompts") -> dict[tuple[int, str], str]:
    """(user_idx, horizon) -> the long-term preference ("" where extraction failed)."""
    frame = _extraction(run, "users", need)
    if frame.empty:
        return {}
    return {(int(u), str(h)): str(t)
            for u, h, t in zip(frame["user_idx"], frame["horizon"], _ok_text(frame, "preference"))}


def stored_key_terms(run: RunDir, per_item: int,
                     need: Optional[str] = "the llm++ prompt") -> dict[tuple[int, str, int], list[str]]:
    """(user_idx, horizon, item_idx) -> the perception's first key terms ([] where extraction failed)."""
    frame = _extraction(run, "perceptions", need)
    if frame.empty:
        return {}
    ok = frame["status"].astype(str) == "ok" if "status" in frame.columns else pd.Series(True, index=frame.index)
    return {(int(u), str(h), int(i)): ([str(t) for t in k][:per_item] if good and k is not None else [])
            for u, h, i, k, good in zip(frame["user_idx"], frame["horizon"], frame["item_idx"], frame["key_terms"], ok)}


def _attach_preferences(run: RunDir, lists: list[CandidateList], horizon: str, max_chars: int) -> dict[str, int]:
    texts = stored_preferences(run)
    missing = [lst.user_idx for lst in lists if (lst.user_idx, horizon) not in texts]
    if missing:
        raise DataError(f"{output_folder(run, 'users')}: no {horizon} preference for {len(missing)} of "
                        f"{len(lists)} users (e.g. user_idx {missing[0]}); run `cotrec extract users`")
    empty = 0
    for lst in lists:
        lst.preference = shorten(texts[(lst.user_idx, horizon)], max_chars)
        empty += not lst.preference
    return {"lists_without_preference": empty}


def _attach_key_terms(run: RunDir, lists: list[CandidateList], horizon: str, per_item: int) -> dict[str, int]:
    terms = stored_key_terms(run, per_item)
    missing = [(lst.user_idx, item) for lst in lists for item in lst.candidates
               if (lst.user_idx, horizon, item) not in terms]
    if missing:
        raise DataError(f"{output_folder(run, 'perceptions')}: no {horizon} perception for {len(missing)} "
                        f"(user, candidate) pairs (e.g. user_idx {missing[0][0]}, item_idx {missing[0][1]}); run "
                        f"`cotrec extract perceptions` after training the retriever")
    empty = 0
    for lst in lists:
        lst.key_terms = [terms[(lst.user_idx, horizon, item)] for item in lst.candidates]
        empty += sum(not t for t in lst.key_terms)
    return {"candidates_without_key_terms": empty}


def ranked_lists(config: Config, run: RunDir, variant: str, split: str, prompt: str) -> tuple[list[CandidateList],
                                                                                             dict[str, Any]]:
    """The lists the ranker reads: `valid` lists with their target among the candidates for
    fine-tuning (at most `ranker.max_train_users`), every `test` list for evaluation (at most
    `ranker.max_eval_users`). `extract perceptions` asks the same question, so it role-plays exactly
    the pairs the ranker will show."""
    if split == "valid":
        return load_lists(config, run, variant, split, prompt, only_hits=True, limit=config.ranker.max_train_users)
    return load_lists(config, run, variant, split, prompt, limit=config.ranker.max_eval_users)


def sample_positions(count: int, limit: Optional[int], seed: int) -> Optional[np.ndarray]:
    """The sorted positions of a seeded sample of `limit` of `count` lists (None: keep them all)."""
    if limit is None or count <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def candidate_pairs(run: RunDir, config: Config) -> tuple[pd.DataFrame, str]:
    """The (user, horizon, item) pairs of the retrievers' top-M candidates the ranker will read.

    The variants are `extract.perception_candidates` (default: every `ranker.retrievers` variant);
    their pairs are unioned. With `extract.perception_only_hits` only the lists the ranker re-ranks
    are kept: those whose target is among the candidates, sampled as the ranker samples them
    (`ranker.max_train_users`, `ranker.max_eval_users`); otherwise every list of each horizon.
    """
    variants = config.extract.perception_candidates or list(dict.fromkeys(config.ranker.retrievers.values()))
    frames, paths = [], []
    for variant in variants:
        path = candidates_path(config, run, variant)
        for horizon in config.extract.perception_horizons:
            if config.extract.perception_only_hits:
                lists = [lst for lst in ranked_lists(config, run, variant, horizon, "llm")[0] if lst.hit]
            else:
                lists = load_lists(config, run, variant, horizon, "llm")[0]
            frames.append(pd.DataFrame({"user_idx": [lst.user_idx for lst in lists], "horizon": horizon,
                                        "item_idx": [lst.candidates for lst in lists]}))
        paths.append(str(path))
    pairs = pd.concat(frames, ignore_index=True).explode("item_idx").dropna(subset=["item_idx"])
    pairs["item_idx"] = pairs["item_idx"].astype(np.int64)
    pairs = pairs.drop_duplicates(["user_idx", "horizon", "item_idx"])
    return pairs.reset_index(drop=True), ", ".join(paths)


def stored_trajectories(run: RunDir) -> dict[int, tuple[list[int], list[str]]]:
    """user_idx -> the `train` walk's trajectory: window ends and the preference after each."""
    frame = _extraction(run, "users", "prefix lists of the llm+ and llm++ prompts")
    if "trajectory" not in frame.columns:
        raise DataError(f"{output_folder(run, 'users')}: the preferences have no trajectory (written by an older "
                        f"version); run `cotrec extract users --force`")
    train = frame[(frame["horizon"] == "train") & (frame["status"].astype(str) == "ok")]
    return {int(u): ([int(e) for e in ends], [str(t) for t in states])
            for u, ends, states in zip(train["user_idx"], train["trajectory_ends"], train["trajectory"])
            if ends is not None and states is not None}


def preference_before(trajectory: tuple[list[int], list[str]] | None, position: int) -> str:
    """The preference after the last window that ended before item `position`: it has seen nothing
    from `position` on ("" when no window had ended yet)."""
    if trajectory is None:
        return ""
    ends, states = trajectory
    before = [state for end, state in zip(ends, states) if end <= position]
    return before[-1] if before else ""


def prefix_lists(config: Config, run: RunDir, variant: str, prompt: str) -> tuple[list[CandidateList], dict[str, Any]]:
    """LlamaRec-style training lists from the users' training histories: for `ranker.prefix_lists`
    seeded target positions per user, the history before the target and the retriever's top-M for it
    (the lists the ranker meets at test time: the retriever's hard negatives), with the target put in
    place of the weakest candidate when the retriever missed it, so every list can teach. `llm+`
    shows the preference as it stood before the target (the recurrence's trajectory)."""
    rc = config.ranker
    count = rc.prefix_lists if prompt in rc.prefix_prompts else 0
    if count == 0:
        return [], {"prefix_lists": 0}
    seqs = Sequences.from_interactions(read_table(run, "interactions"), num_items=len(read_table(run, "items")))
    sampled = sample_positions(seqs.num_users, rc.max_train_users, config.seed)
    users = range(seqs.num_users) if sampled is None else sampled.tolist()
    rng = np.random.default_rng([config.seed, SPLIT_CODES["prefix"]])
    picks = []
    for user in users:
        positions = np.arange(MIN_PREFIX, len(seqs.train[user]))
        if len(positions):
            picks += [(user, int(j)) for j in np.sort(rng.choice(positions, size=min(count, len(positions)), replace=False))]
    if not picks:
        return [], {"prefix_lists": 0}
    model = load_retriever(config, run, variant)
    queries = history_queries([seqs.train[u][:j] for u, j in picks], np.array([u for u, _ in picks]),
                              np.array([seqs.train[u][j] for u, j in picks]), model.cfg.max_len)
    found = score_queries(model, queries, np.arange(len(picks)), config.retriever.mask_history, config.retriever.top_m,
                          batch_size=config.retriever.eval_batch_size)
    trajectories = stored_trajectories(run) if uses_preference(prompt) else {}
    keep, lists, inserted = rc.history_items, [], 0
    for (user, j), top, rank in zip(picks, found["top_items"], found["ranks"]):
        target, candidates = int(seqs.train[user][j]), [int(i) for i in top]
        if target not in candidates:
            candidates[-1], inserted = target, inserted + 1
        lst = CandidateList(user, "prefix", [int(i) for i in seqs.train[user][:j][-keep:]], candidates, target,
                            int(rank), position=j)
        if trajectories:
            lst.preference = shorten(preference_before(trajectories.get(user), j), rc.preference_chars)
        lists.append(lst)
    return lists, {"prefix_lists": len(lists), "prefix_targets_inserted": inserted,
                   "prefix_users": len({lst.user_idx for lst in lists})}
