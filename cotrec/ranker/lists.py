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

from cotrec.config import Config, parse_ranker
from cotrec.errors import DataError
from cotrec.extract.programs import output_folder, preferences_by_horizon, state_horizon, stored_outputs
from cotrec.extract.windows import history_digest
from cotrec.ranker.prompts import shorten, uses_perceptions, uses_preference
from cotrec.retriever.data import Sequences, history_queries
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.trained import load_retriever
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
    # Whose preference (and perceptions) the prompt shows: the split's own (valid, test), or for a
    # prefix list the train walk's state before its target (`state_horizon`; "" when none).
    horizon: str = ""

    def __post_init__(self) -> None:
        if not self.horizon and self.split != "prefix":
            self.horizon = self.split

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
               only_hits: bool = False, limit: Optional[int] = None) -> tuple[list[CandidateList], dict[str, int]]:
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
    notes.update(attach_prompt_inputs(run, lists, prompt, config))
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


def _attach_preferences(run: RunDir, lists: list[CandidateList], max_chars: int) -> dict[str, int]:
    """Each list's preference at its horizon (a list with no horizon, a prefix before the walk's first
    state, shows none)."""
    frame = preferences_by_horizon(run)
    if frame.empty:
        raise DataError(f"{output_folder(run, 'users')}: no extraction output, needed for the llm+ and llm++ "
                        f"prompts; run `cotrec extract users` first")
    texts = dict(zip(zip(frame["user_idx"], frame["horizon"]), frame["preference"]))
    stored = set(zip(*[stored_outputs(run, "users", ["horizon"])[c] for c in ("user_idx", "horizon")]))
    missing = [lst.user_idx for lst in lists if lst.horizon in SPLIT_CODES and (lst.user_idx, lst.horizon) not in stored]
    if missing:
        raise DataError(f"{output_folder(run, 'users')}: no preference for {len(missing)} of {len(lists)} lists' "
                        f"users (e.g. user_idx {missing[0]}); run `cotrec extract users`")
    empty = 0
    for lst in lists:
        lst.preference = shorten(str(texts.get((lst.user_idx, lst.horizon), "")), max_chars)
        empty += not lst.preference
    return {"lists_without_preference": empty}


def _attach_key_terms(run: RunDir, lists: list[CandidateList], per_item: int) -> dict[str, int]:
    terms = stored_key_terms(run, per_item)
    missing = [(lst.user_idx, lst.horizon, item) for lst in lists for item in lst.candidates
               if (lst.user_idx, lst.horizon, item) not in terms]
    if missing:
        user, horizon, item = missing[0]
        raise DataError(f"{output_folder(run, 'perceptions')}: no perception for {len(missing)} (user, horizon, "
                        f"candidate) triples (e.g. user_idx {user}, horizon {horizon}, item_idx {item}); run "
                        f"`cotrec extract perceptions` after training the retriever")
    empty = 0
    for lst in lists:
        lst.key_terms = [terms[(lst.user_idx, lst.horizon, item)] for item in lst.candidates]
        empty += sum(not t for t in lst.key_terms)
    return {"candidates_without_key_terms": empty}


def attach_prompt_inputs(run: RunDir, lists: list[CandidateList], prompt: str, config: Config) -> dict[str, int]:
    """What `prompt` shows besides titles, on the lists it will rank (those with their target among
    the candidates); counts of what is missing."""
    ranked = [lst for lst in lists if lst.hit]
    notes: dict[str, int] = {}
    if uses_preference(prompt) and ranked:
        notes.update(_attach_preferences(run, ranked, config.ranker.preference_chars))
    if uses_perceptions(prompt) and ranked:
        notes.update(_attach_key_terms(run, ranked, config.ranker.key_terms))
    return notes


def ranked_lists(config: Config, run: RunDir, variant: str, prompt: str) -> tuple[list[CandidateList], dict[str, int]]:
    """The `test` lists the ranker is evaluated on: every user's, or a seeded sample of
    `ranker.max_eval_users` (the same users for every retriever and ranker)."""
    return load_lists(config, run, variant, "test", prompt, limit=config.ranker.max_eval_users)


def sample_positions(count: int, limit: Optional[int], seed: int) -> Optional[np.ndarray]:
    """The sorted positions of a seeded sample of `limit` of `count` lists (None: keep them all)."""
    if limit is None or count <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def trained_on(config: Config, variant: str) -> str:
    """The retriever whose lists fine-tune the rankers that re-rank `variant`'s candidates: its own, or
    the one `ranker.train_on` names for all."""
    return config.ranker.retrievers[config.ranker.train_on] if config.ranker.train_on else variant


def fine_tunes_perceptions(config: Config) -> bool:
    return any(uses_perceptions(prompt) and tuned for prompt, tuned in map(parse_ranker, config.ranker.grid))


def candidate_pairs(run: RunDir, config: Config) -> tuple[pd.DataFrame, str]:
    """The (user, horizon, item) triples of the candidates the ranker will show with perceptions.

    The variants are `extract.perception_candidates` (default: every `ranker.retrievers` variant).
    `test`: the lists evaluation re-ranks (those whose target is among the candidates, sampled as the
    ranker samples them), or every list without `extract.perception_only_hits`. `valid`: the lists an
    `llm++` fine-tune trains and validates on (`training_lists`, each at its own horizon), when the
    grid fine-tunes `llm++`.
    """
    variants = config.extract.perception_candidates or list(dict.fromkeys(config.ranker.retrievers.values()))
    frames, paths = [], []

    def add(lists: list[CandidateList]) -> None:
        frames.append(pd.DataFrame({"user_idx": [lst.user_idx for lst in lists],
                                    "horizon": [lst.horizon for lst in lists],
                                    "item_idx": [lst.candidates for lst in lists]}))

    if "test" in config.extract.perception_horizons:
        for variant in variants:
            lists = ranked_lists(config, run, variant, "llm")[0]
            add([lst for lst in lists if lst.hit or not config.extract.perception_only_hits])
    if "valid" in config.extract.perception_horizons and fine_tunes_perceptions(config):
        for variant in dict.fromkeys(trained_on(config, v) for v in variants):
            add(training_lists(config, run, variant).every)
    paths = [str(candidates_path(config, run, variant)) for variant in variants]
    pairs = pd.concat(frames, ignore_index=True).explode("item_idx").dropna(subset=["item_idx"]) if frames else \
        pd.DataFrame(columns=["user_idx", "horizon", "item_idx"])
    pairs["item_idx"] = pairs["item_idx"].astype(np.int64)
    pairs = pairs[pairs["horizon"] != ""].drop_duplicates(["user_idx", "horizon", "item_idx"])
    return pairs.reset_index(drop=True), ", ".join(paths)


@dataclass
class TrainingLists:
    """A retriever's lists for fine-tuning: the training lists and the held-out ones selection
    validates on (all lists of a seeded set of users, so no user is on both sides), and counts."""

    train: list[CandidateList]
    held_out: list[CandidateList]
    notes: dict[str, int]

    @property
    def every(self) -> list[CandidateList]:
        return self.train + self.held_out


def known_items(seqs: Sequences, user: int) -> np.ndarray:
    """Every item the user is known to have interacted with (training items and both targets)."""
    return np.concatenate([seqs.train[user], [seqs.valid[user], seqs.test[user]]])


def _state_ends(run: RunDir) -> dict[int, np.ndarray]:
    """user_idx -> where the train walk's states end (its windows' ends, in training items)."""
    frame = stored_outputs(run, "users")
    if frame.empty or "trajectory_ends" not in frame.columns:
        return {}
    train = frame[(frame["horizon"] == "train") & (frame["status"].astype(str) == "ok")]
    return {int(u): np.asarray(ends, dtype=np.int64) for u, ends in zip(train["user_idx"], train["trajectory_ends"])
            if ends is not None and len(ends)}


def state_before(ends: Optional[np.ndarray], position: int) -> str:
    """The horizon of the walk's last state that saw nothing from training item `position` on ("" when
    no window had ended by then)."""
    if ends is None:
        return ""
    before = ends[ends <= position]
    return state_horizon(int(before.max())) if before.size else ""


def _scored(model: Any, config: Config, seqs: Sequences, asks: list[tuple[int, int, np.ndarray]],
            truthful: bool) -> dict[str, np.ndarray]:
    """The retriever's top-M for (user, target, history) queries, with every item the user is known to
    have interacted with but the target masked (`truthful`), or only the history (the evaluation's mask)."""
    rc = config.retriever
    masks = [np.setdiff1d(known_items(seqs, u), [t]) if truthful else history for u, t, history in asks]
    queries = history_queries([h for _, _, h in asks], np.array([u for u, _, _ in asks], dtype=np.int64),
                              np.array([t for _, t, _ in asks], dtype=np.int64), model.cfg.max_len, masks=masks)
    return score_queries(model, queries, np.arange(len(asks)), True, config.retriever.top_m,
                         batch_size=rc.eval_batch_size)


def _lists_of(config: Config, model: Any, seqs: Sequences, split: str,
              asks: list[tuple[int, int, np.ndarray, int]], ends: dict[int, np.ndarray]) -> tuple[
                  list[Optional[CandidateList]], int]:
    """A list per (user, target, history, position) ask: None where the retriever did not find the
    target (unless `ranker.insert_missed_targets`); and how many known positives were masked out of
    the candidates the evaluation's mask alone would have shown."""
    plain = [(u, t, h) for u, t, h, _ in asks]
    found = _scored(model, config, seqs, plain, truthful=True)
    shown = _scored(model, config, seqs, plain, truthful=False)
    keep, out, masked = config.ranker.history_items, [], 0
    for (user, target, history, position), top, rank, before in zip(asks, found["top_items"], found["ranks"],
                                                                     shown["top_items"]):
        known = set(known_items(seqs, user).tolist()) - {target}
        masked += sum(int(i) in known for i in before)
        candidates = [int(i) for i in top]
        if target not in candidates:
            if not config.ranker.insert_missed_targets:
                out.append(None)
                continue
            candidates[-1] = target
        horizon = state_before(ends.get(user), position) if split == "prefix" else split
        out.append(CandidateList(user, split, [int(i) for i in history[-keep:]], candidates, target, int(rank),
                                 position=position, horizon=horizon))
    return out, masked


def _prefix_positions(config: Config, seqs: Sequences, user: int, ends: dict[int, np.ndarray],
                      rng: np.random.Generator) -> np.ndarray:
    """A user's training positions a prefix list may take its target from, in a seeded order: after
    `MIN_PREFIX` items, and where a prompt shows the preference, after the walk's first state."""
    low = MIN_PREFIX
    if shows_preference_when_trained(config):
        if user not in ends:
            return np.zeros(0, dtype=np.int64)
        low = max(low, int(ends[user].min()))
    return rng.permutation(np.arange(low, len(seqs.train[user])))


def shows_preference_when_trained(config: Config) -> bool:
    """Whether a fine-tuned prompt of the grid shows the preference: then every training list (all
    prompts train on the same lists) comes from where the recurrence had a state before its target."""
    return any(uses_preference(prompt) for prompt, tuned in map(parse_ranker, config.ranker.grid) if tuned)


def training_lists(config: Config, run: RunDir, variant: str) -> TrainingLists:
    """The lists every prompt of a retriever fine-tunes on, the same for each prompt.

    The `valid` list of each sampled user (`ranker.max_train_users`) and `ranker.prefix_lists`
    LlamaRec-style lists per user from the training history (the target a training item, the history
    the items before it). A list's candidates are the retriever's top-M with every item its user is
    known to have interacted with masked but the target, so no list shows a real positive as a wrong
    answer; only lists where the retriever found its target are kept (prefix positions are drawn,
    seeded, until a user has its count or none are left), as only such lists exist at test time.
    Then the lists of a seeded set of users, `ranker.val_lists` or just more, are held out.
    """
    rc = config.ranker
    seqs = Sequences.from_interactions(read_table(run, "interactions"), num_items=len(read_table(run, "items")))
    sampled = sample_positions(seqs.num_users, rc.max_train_users, config.seed)
    users = list(range(seqs.num_users)) if sampled is None else sampled.tolist()
    model = load_retriever(config, run, variant)
    ends = _state_ends(run) if shows_preference_when_trained(config) else {}
    valid, masked = _lists_of(config, model, seqs, "valid",
                              [(u, int(seqs.valid[u]), seqs.train[u], -1) for u in users], ends)
    lists = [lst for lst in valid if lst is not None]
    # prefix lists: rounds of each short user's next positions, until every user has its count
    rng = np.random.default_rng([config.seed, SPLIT_CODES["prefix"]])
    queue = {u: _prefix_positions(config, seqs, u, ends, rng) for u in users} if rc.prefix_lists else {}
    have = {u: 0 for u in queue}
    drawn = prefix_missed = 0
    while True:
        asks = []
        for user, positions in queue.items():
            need = rc.prefix_lists - have[user]
            take, queue[user] = positions[:2 * need + 1], positions[2 * need + 1:]
            asks += [(user, int(seqs.train[user][j]), seqs.train[user][:j], int(j)) for j in take] if need > 0 else []
        if not asks:
            break
        drawn += len(asks)
        made, more_masked = _lists_of(config, model, seqs, "prefix", asks, ends)
        masked += more_masked
        for (user, *_), lst in zip(asks, made):
            if lst is None:
                prefix_missed += 1
            elif have[user] < rc.prefix_lists:
                have[user] += 1
                lists.append(lst)
    by_user: dict[int, list[CandidateList]] = {}
    for lst in lists:
        by_user.setdefault(lst.user_idx, []).append(lst)
    held_users: set[int] = set()
    held = 0
    for user in np.random.default_rng([config.seed, 23]).permutation(sorted(by_user)).tolist():
        if held >= rc.val_lists:
            break
        held_users.add(user)
        held += len(by_user[user])
    train = [lst for lst in lists if lst.user_idx not in held_users]
    held_out = [lst for lst in lists if lst.user_idx in held_users]
    prefixes = [lst for lst in lists if lst.split == "prefix"]
    notes = {"users": len(users), "valid_lists": sum(lst.split == "valid" for lst in lists),
             "valid_misses": sum(lst is None for lst in valid), "prefix_lists": len(prefixes),
             "prefix_positions_drawn": drawn, "prefix_misses": prefix_missed,
             "targets_inserted": sum(lst.retriever_rank >= config.retriever.top_m for lst in lists),
             "masked_positives": masked, "train_lists": len(train), "held_out_lists": len(held_out),
             "held_out_users": len(held_users)}
    return TrainingLists(train, held_out, notes)
