"""A frozen-feature probe: is what it takes to rank the candidates in the base model at all?

When a fine-tuned ranker does not beat its zero-shot model, either the recipe (data, steps, LoRA)
is the limit, or the model is. The probe separates the two: one forward pass of the frozen base
model per list (the candidates in the order the evaluation shows them), the last layer's hidden
state at the end of each candidate's line, and a linear scorer over those M states (a softmax over
the candidates) trained on the fine-tune's training lists in seconds, its weight decay chosen by
cross-validation on them. Its NDCG@10 on the test lists the rankers are evaluated on, against the
zero-shot model's on the same lists in the same order (paired): if the probe beats zero-shot, the
content is in the model and the recipe is the limit; if not, the model is.

`cotrec ranker probe` runs it in the driver (a diagnostic on the embedded model's scale) and
writes `ranker/<retriever>--<prompt>-probe/probe.json` and, per test list, the target's shown
position and its rank by the probe and by the zero-shot model (`lists.parquet`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence, TypedDict

import numpy as np
import pandas as pd

from cotrec.llm import letters
from cotrec.metrics import PairedDifference, ndcg_gains, paired_difference
from cotrec.progress import Progress
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import CandidateList, shown_order


def line_ends(text: str, count: int) -> list[int]:
    """Character offsets of the last character of each of the `count` candidate lines (each ends with
    its letter: "- Title (C)")."""
    start = text.index("Candidates:\n") + len("Candidates:\n")
    ends = []
    for letter in letters(count):
        end = text.index(f" ({letter})\n", start) + len(f" ({letter})") - 1
        ends.append(end)
        start = end + 2
    return ends


def candidate_states(model: Any, tokenizer: Any, conversations: Sequence[Any], count: int,
                     name: str = "probe") -> np.ndarray:
    """(lists, count, hidden) last-layer states at the end of each candidate line, one pass per list."""
    import torch

    states, progress = [], Progress(len(conversations))
    with torch.no_grad():
        for done, conversation in enumerate(conversations, 1):
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = np.array(encoded["offset_mapping"])
            tokens = [int(np.flatnonzero((offsets[:, 0] <= end) & (offsets[:, 1] > end))[0])
                      for end in line_ends(text, count)]
            # the decoder alone: its last (normed) hidden state is all the probe reads, the LM head's
            # projection onto the whole vocabulary would be wasted
            hidden = model.base_model(torch.tensor([encoded["input_ids"]])).last_hidden_state[0]
            states.append(hidden[tokens].float().numpy())
            progress.update(done, lambda rate: f"{name}: {done:,} of {len(conversations):,} lists encoded "
                                               f"({rate:.1f} lists/s)")
    return np.stack(states)


def train_scorer(states: np.ndarray, targets: np.ndarray, weight_decay: float = 1e-3, steps: int = 300,
                 seed: int = 0) -> np.ndarray:
    """A linear scorer (hidden -> score, one weight vector and a bias) whose softmax over each list's
    candidates fits the targets' positions."""
    import torch

    torch.manual_seed(seed)
    features = torch.tensor(states, dtype=torch.float32)
    mean, scale = features.mean((0, 1)), features.std((0, 1)) + 1e-6
    x = (features - mean) / scale
    w = torch.zeros(x.shape[-1] + 1, requires_grad=True)
    optimiser = torch.optim.Adam([w], lr=0.05)
    y = torch.tensor(targets, dtype=torch.long)
    for _ in range(steps):
        optimiser.zero_grad()
        logits = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.cross_entropy(logits, y) + weight_decay * (w[:-1] ** 2).sum()
        loss.backward()
        optimiser.step()
    weights = w.detach()
    return np.concatenate([(weights[:-1] / scale).numpy(), [float(weights[-1] - (mean / scale) @ weights[:-1])]])


def probe_scores(states: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return states @ weights[:-1] + weights[-1]


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per list, how many candidates score above the target (0: ranked first)."""
    return np.array([int((s > s[t]).sum()) for s, t in zip(scores, targets)])


PROBE_VERSION = 2  # in the probe stage's fingerprint: a result of another method is redone
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 5


def choose_weight_decay(states: np.ndarray, targets: np.ndarray, seed: int) -> tuple[float, dict[str, float]]:
    """The weight decay whose scorer ranks held-out training lists best (NDCG@10 over `FOLDS` folds of
    the training lists): a fixed one either overfits a few hundred lists of 500+ features or
    underfits an easy rule, and the reading should not hinge on that choice."""
    folds = np.random.default_rng(seed).permutation(len(states)) % FOLDS
    scored = {}
    for decay in WEIGHT_DECAYS:
        gains = []
        for fold in range(FOLDS):
            held = folds == fold
            weights = train_scorer(states[~held], targets[~held], weight_decay=decay, seed=seed)
            gains.append(ndcg_gains(target_ranks(probe_scores(states[held], weights), targets[held]), 10))
        scored[f"{decay:g}"] = float(np.concatenate(gains).mean())
    best = max(WEIGHT_DECAYS, key=lambda d: scored[f"{d:g}"])
    return best, scored


class ProbeLists(TypedDict):
    """Per test list (columns): its user, the target's shown position, its rank by the probe and by the
    zero-shot model."""
    user_idx: list[int]
    shown_at: list[int]
    probe_rank: list[int]
    zero_shot_rank: list[int]


# `run_probe`'s result: the lists, the probe's and the zero-shot model's NDCG@10 on the same test lists,
# their paired difference and what it says.
ProbeResult = TypedDict("ProbeResult", {
    "train_lists": int, "test_lists": int, "hidden": int, "dtype": str, "seed": int, "probe_train_ndcg@10": float,
    "probe_ndcg@10": float, "zero_shot_ndcg@10": float, "probe_minus_zero_shot": PairedDifference,
    "weight_decay": float, "cross_validated_ndcg@10": dict[str, float], "probe_beats_zero_shot": bool,
    "reading": str, "lists": ProbeLists, "seconds": float})


def probe_figures(lists: pd.DataFrame, seed: int) -> dict[str, float | PairedDifference]:
    """The probe's and the zero-shot model's NDCG@10 and their paired difference, from the per-list
    ranks (`lists.parquet`) alone."""
    probe_gains = ndcg_gains(lists["probe_rank"].to_numpy(), 10)
    zero_gains = ndcg_gains(lists["zero_shot_rank"].to_numpy(), 10)
    return {"probe_ndcg@10": float(probe_gains.mean()), "zero_shot_ndcg@10": float(zero_gains.mean()),
            "probe_minus_zero_shot": paired_difference(probe_gains - zero_gains, seed=seed)}


def check_probe(record: Path, lists: Path) -> str | None:
    """None when a probe's JSON holds what its per-list ranks give; else the first figure that differs."""
    written = json.loads(record.read_text())
    for name, value in probe_figures(pd.read_parquet(lists), int(written["seed"])).items():
        if written[name] != value:
            return f"{name}: {written[name]!r} != recomputed {value!r}"
    return None


def probe_reading(difference: PairedDifference, beats: bool) -> str:
    """What the probe against the zero-shot model says, and only what its interval can carry."""
    if not difference.get("interval"):
        return (f"no reading: {difference['why']}; the probe needs more test lists before it can say whether "
                "the model or the recipe is the limit")
    if beats:
        return ("the probe beats the zero-shot model on the same lists: what ranks them is in the frozen model, "
                "so the fine-tuning recipe is the limit")
    return ("the probe does not beat the zero-shot model on the same lists (its interval holds 0 or lies below): "
            "the frozen model's states carry no more than its zero-shot ranking, so the model is the limit")


def run_probe(model_path: str, ranker: LetterRanker, train: list[CandidateList], test: list[CandidateList],
              zero_shot_ranks: np.ndarray, seed: int, dtype: str = "float32") -> ProbeResult:
    """Train the probe on `train` (each list in its shown order), rank `test` in the evaluation's shown
    order, and compare with the zero-shot model's ranks of the same targets in the same order. `dtype`:
    the one the zero-shot model was scored in, so that both read the same model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # this runs in the driver: the terminal is cotrec's
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    count = len(train[0].candidates)

    def encode(lists: list[CandidateList], name: str) -> tuple[np.ndarray, np.ndarray]:
        orders = [shown_order(lst, seed) for lst in lists]
        targets = np.array([int(np.flatnonzero(o == lst.candidates.index(lst.target))[0])
                            for lst, o in zip(lists, orders)])
        return candidate_states(model, tokenizer, [ranker.conversation(lst, o) for lst, o in zip(lists, orders)],
                                count, name), targets

    train_states, train_targets = encode(train, "probe: training lists")
    test_states, test_targets = encode(test, "probe: test lists")
    decay, cross_validated = choose_weight_decay(train_states, train_targets, seed)
    weights = train_scorer(train_states, train_targets, weight_decay=decay, seed=seed)
    ranks = target_ranks(probe_scores(test_states, weights), test_targets)
    train_ranks = target_ranks(probe_scores(train_states, weights), train_targets)
    # per test list, what the figures are computed from (and recomputed: `check_probe`)
    per_list: ProbeLists = {"user_idx": [lst.user_idx for lst in test], "shown_at": test_targets.tolist(),
                            "probe_rank": ranks.tolist(), "zero_shot_rank": np.asarray(zero_shot_ranks).tolist()}
    figures = probe_figures(pd.DataFrame(per_list), seed)
    difference = figures["probe_minus_zero_shot"]
    beats = bool(difference.get("interval") and difference["low"] > 0)
    return {"train_lists": len(train), "test_lists": len(test), "hidden": int(train_states.shape[-1]), "dtype": dtype,
            "seed": seed,
            "weight_decay": decay, "cross_validated_ndcg@10": cross_validated,
            "probe_train_ndcg@10": float(ndcg_gains(train_ranks, 10).mean()),
            "probe_ndcg@10": figures["probe_ndcg@10"], "zero_shot_ndcg@10": figures["zero_shot_ndcg@10"],
            "probe_minus_zero_shot": difference, "probe_beats_zero_shot": beats,
            "reading": probe_reading(difference, beats), "lists": per_list,
            "seconds": round(time.perf_counter() - started, 1)}
