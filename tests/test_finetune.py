"""The fine-tuning loop learns what is learnable, and nothing from answers that carry no signal.

A synthetic ranking task the embedded model cannot solve zero-shot: every title names two items, the
history's last item is one of them, and the target is the candidate that carries the same title (the
nine others are other titles; all ten in a seeded random order). The real recipe (LoRA, the
letter-only loss, held-out selection), in process and in float32, must take the held-out accuracy
from about chance to at least 0.9; the same recipe on the same lists with the answers shuffled must
stay at chance: what it learns is the task, not the letters.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from cotrec.config import RankerConfig
from cotrec.extract.prompts import domain_of
from cotrec.llm import letters
from cotrec.llm.embedded import resolve_model
from cotrec.ranker.finetune import epoch_examples, fit, planned_shape, validation_prompts
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import CandidateList

WORDS = ["Amber", "Falcon", "River", "Stone", "Winter", "Harbor", "Crimson", "Lantern", "Silver", "Meadow",
         "Iron", "Willow", "Echo", "Summit", "Velvet", "Thunder", "Orchid", "Canyon", "Frost", "Ember"]


def copy_task(lists: int, seed: int) -> tuple[list[CandidateList], list[str]]:
    """`lists` lists over 2 x 160 items (items 2k and 2k + 1 share title k): three history items, the
    target the twin of the last one."""
    titles = [f"{a} {b}" for a in WORDS for b in WORDS if a != b]
    titles = [titles[i] for i in np.random.default_rng(0).permutation(len(titles))[:160]]
    labels = [title for title in titles for _ in range(2)]
    rng = np.random.default_rng(seed)
    out = []
    for user in range(lists):
        picked = rng.choice(len(titles), size=12, replace=False)  # 2 more history titles, the target's, 9 others
        history = [2 * int(k) for k in picked[:3]]
        target = 2 * int(picked[2]) + 1
        out.append(CandidateList(user, "valid", history, [target] + [2 * int(k) + 1 for k in picked[3:]], target,
                                 retriever_rank=0))
    return out, labels


def fine_tune(tmp_path, train: list[CandidateList], held_out: list[CandidateList], labels: list[str],
              shuffle_answers: bool) -> list[dict]:
    """The recipe in process, in float32: an optimiser step per list (a content rule takes the embedded
    model some 50 steps to learn)."""
    rc = RankerConfig(trainer="local", precision="fp32", epochs=1, lr=2e-3, batch_size=1, micro_batch=1,
                      cpus_per_worker=2)
    ranker = LetterRanker(None, domain_of("movie"), "llm", labels)
    examples = epoch_examples(train, ranker, rc.epochs, rc.shuffle_seed)
    if shuffle_answers:  # the same prompts, each answer a seeded random letter
        rng = np.random.default_rng(1)
        examples = [[{**e, "answer": letters(10)[int(rng.integers(10))]} for e in epoch] for epoch in examples]
    job = {"name": "copy task", "model_path": resolve_model("embedded"), "examples": examples,
           "validation": validation_prompts(held_out, ranker, rc.shuffle_seed), "candidates": 10, "seed": 0,
           "lora_r": rc.lora_r, "lora_alpha": rc.lora_alpha, "lora_dropout": rc.lora_dropout,
           "lora_targets": rc.lora_targets, "lr": rc.lr, "warmup_ratio": rc.warmup_ratio,
           "shape": asdict(planned_shape(examples, rc)), "zero_stage": rc.zero_stage, "max_tokens": 512}
    return fit(job, rc, tmp_path / ".ray", tmp_path / "adapter")["curve"]


@pytest.mark.slow
def test_the_loop_learns_a_learnable_ranking_and_nothing_from_shuffled_answers(tmp_path):
    lists, labels = copy_task(80, seed=0)
    train, held_out = lists[:60], lists[60:]
    curve = fine_tune(tmp_path / "real", train, held_out, labels, shuffle_answers=False)
    assert curve[0]["val_hit@1"] <= 0.3, curve[0]  # the base model: near chance (0.1) on the held-out lists
    assert curve[-1]["val_hit@1"] >= 0.9, [c["val_hit@1"] for c in curve]
    shuffled = fine_tune(tmp_path / "shuffled", train, held_out, labels, shuffle_answers=True)
    assert shuffled[-1]["val_hit@1"] <= 0.3, [c["val_hit@1"] for c in shuffled]


def marked_task(lists: int, seed: int, marked: bool) -> tuple[list[CandidateList], list[str]]:
    """Lists whose target is the one candidate titled "Gold ..." (`marked`), or a candidate drawn at
    random among ten plain titles (nothing in the text tells it)."""
    plain = [f"{a} {b}" for a in WORDS for b in WORDS if a != b]
    labels = plain + [f"Gold {w}" for w in WORDS]
    rng = np.random.default_rng(seed)
    out = []
    for user in range(lists):
        others = [int(i) for i in rng.choice(len(plain), size=12, replace=False)]
        target = len(plain) + int(rng.integers(len(WORDS))) if marked else others[3]
        candidates = [target] + others[4:] if marked else others[3:]
        out.append(CandidateList(user, "valid", others[:3], candidates, target, retriever_rank=0))
    return out, labels


@pytest.mark.slow
@pytest.mark.parametrize("marked", [True, False], ids=["target-in-the-text", "target-at-random"])
def test_the_probe_finds_what_the_frozen_model_encodes_and_says_nothing_it_cannot(marked):
    """The frozen-feature probe (`cotrec ranker probe`) against a zero-shot ranking that ranks by shown
    position: where the target is told by its text, a linear scorer over the model's states finds it
    and the reading is that the recipe is the limit; where nothing tells it, the probe does not beat
    the position ranking and the reading is that the model is."""
    from cotrec.ranker.lists import shown_order
    from cotrec.ranker.probe import run_probe

    lists, labels = marked_task(90, seed=0, marked=marked)
    train, test = lists[:45], lists[45:]
    ranker = LetterRanker(None, domain_of("movie"), "llm", labels)
    shown_at = np.array([int(np.flatnonzero(shown_order(lst, 0) == lst.candidates.index(lst.target))[0])
                         for lst in test])
    found = run_probe(resolve_model("embedded"), ranker, train, test, zero_shot_ranks=shown_at, seed=0)
    difference = found["probe_minus_zero_shot"]
    assert difference["interval"], difference  # 45 paired lists: enough for one
    if marked:
        assert found["probe_ndcg@10"] >= 0.9 and found["probe_beats_zero_shot"] and "recipe" in found["reading"]
    else:
        assert found["probe_ndcg@10"] < 0.6 and not found["probe_beats_zero_shot"]
        assert "the model is the limit" in found["reading"]
