"""The fine-tuning loop learns what is learnable, and nothing from answers that carry no signal.

A synthetic ranking task the embedded model cannot solve zero-shot: every title names two items, the
history's last item is one of them, and the target is the candidate that carries the same title (the
nine others are other titles; all ten in a seeded random order). The real recipe (LoRA, the
letter-only loss, held-out selection), in process and in float32, must take the held-out accuracy
from about chance to at least 0.9; the same recipe on the same lists with the answers shuffled must
stay at chance: what it learns is the task, not the letters.
"""

from __future__ import annotations

import numpy as np
import pytest

from cotrec.config import RankerConfig
from cotrec.extract.prompts import domain_of
from cotrec.llm import letters
from cotrec.llm.embedded import resolve_model
from cotrec.ranker.finetune import FinetuneJob, epoch_examples, fit, validation_prompts
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import CandidateList
from tiny_model import make_tiny_base, tiny_adapter

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
    job = FinetuneJob.from_config(rc, name="copy task", model_path=resolve_model("embedded"), examples=examples,
                                  validation=validation_prompts(held_out, ranker, rc.shuffle_seed), candidates=10,
                                  seed=0, max_tokens=512)
    return fit(job, tmp_path / ".ray", tmp_path / "adapter").curve


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
    from cotrec.metrics import ndcg_gains
    from cotrec.ranker.probe import WEIGHT_DECAYS, run_probe

    lists, labels = marked_task(90, seed=0, marked=marked)
    train, test = lists[:45], lists[45:]
    ranker = LetterRanker(None, domain_of("movie"), "llm", labels)
    shown_at = np.array([int(np.flatnonzero(shown_order(lst, 0) == lst.candidates.index(lst.target))[0])
                         for lst in test])
    found = run_probe(resolve_model("embedded"), ranker, train, test, zero_shot_ranks=shown_at, seed=0)
    difference = found["probe_minus_zero_shot"]
    assert difference["interval"], difference  # 45 paired lists: enough for one
    # the figures recompute from the per-list ranks the report keeps
    per_list = found["lists"]
    assert per_list["user_idx"] == [lst.user_idx for lst in test] and per_list["shown_at"] == shown_at.tolist()
    assert np.mean(ndcg_gains(np.array(per_list["probe_rank"]), 10)) == pytest.approx(found["probe_ndcg@10"])
    assert found["weight_decay"] in WEIGHT_DECAYS and len(found["cross_validated_ndcg@10"]) == len(WEIGHT_DECAYS)
    if marked:
        assert found["probe_ndcg@10"] >= 0.9 and found["probe_beats_zero_shot"] and "recipe" in found["reading"]
    else:
        assert found["probe_ndcg@10"] < 0.6 and not found["probe_beats_zero_shot"]
        assert "the model is the limit" in found["reading"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def letter_probs(model_path, conversations: list, dtype: str = "float32") -> np.ndarray:
    """The letter probabilities of a saved checkpoint, loaded afresh (what a backend serves)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cotrec.llm.base import single_token_ids
    from cotrec.ranker.finetune import _Batcher, _last_logits

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batcher = _Batcher(tokenizer, 4096, "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        logits = _last_logits(model, batcher.batch([batcher.encode(c) for c in conversations]))
    return torch.softmax(logits[:, single_token_ids(tokenizer, letters(10))], dim=-1).numpy()


def held_out_conversations(count: int) -> list:
    lists, labels = copy_task(count, seed=5)
    ranker = LetterRanker(None, domain_of("movie"), "llm", labels)
    return [v["conversation"] for v in validation_prompts(lists, ranker, 0)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_merge_loads_the_base_once_and_measures_what_a_reload_of_its_checkpoint_serves(tiny_base, tmp_path,
                                                                                           monkeypatch, dtype):
    """One load of the base model (a 7B one in float32 is 30 GB), and the figures it records in
    train.json (`update_kept`) are those of the checkpoint as a backend loads it."""
    import transformers
    from safetensors import safe_open

    from cotrec.ranker.finetune import merge_adapter

    adapter = tiny_adapter(tiny_base, tmp_path / "adapter")
    conversations = held_out_conversations(6)
    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    kept = merge_adapter(tiny_base, adapter, tmp_path / "merged", dtype, conversations, letters(10))
    monkeypatch.undo()
    assert loads == [tiny_base]

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{dtype}"}
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_base), adapter)
    reference_dir = tmp_path / "tuned"
    tuned.merge_and_unload().save_pretrained(reference_dir)  # the adapter's own outputs, in float32
    transformers.AutoTokenizer.from_pretrained(tiny_base).save_pretrained(reference_dir)
    adapter_probs = letter_probs(reference_dir, conversations)
    assert kept["adapter_vs_base"]["max_abs_dp"] == pytest.approx(
        float(np.abs(letter_probs(tiny_base, conversations) - adapter_probs).max()), abs=1e-5)
    assert kept["adapter_vs_base"]["max_abs_dp"] > 1e-3  # the adapter moved them: the figures below mean something
    reloaded = letter_probs(tmp_path / "merged", conversations)
    assert kept["merged_saved"]["max_abs_dp"] == pytest.approx(float(np.abs(reloaded - adapter_probs).max()), abs=1e-5)
    in_bf16 = letter_probs(tmp_path / "merged", conversations, "bfloat16")
    assert kept["merged_in_bfloat16"]["max_abs_dp"] == pytest.approx(float(np.abs(in_bf16 - adapter_probs).max()),
                                                                      abs=1e-5)


def test_the_merge_task_asks_ray_for_host_memory_sized_from_the_model(tiny_base, tmp_path, monkeypatch):
    """In a Ray job the merge runs in a task whose memory request is the model's float32 copy and the
    checkpoint it writes (from the weights' headers), plus 1 GiB; the merged checkpoint lands in the run."""
    import os

    import ray

    from cotrec.ranker.finetune import merge_and_measure
    from cotrec.ranker.memory import GIB, merge_request_bytes, safetensors_parameters

    from pathlib import Path

    parameters = safetensors_parameters(Path(tiny_base))
    assert merge_request_bytes(tiny_base, "bfloat16", on_gpu=False) == parameters * (4 + 2) + GIB
    assert merge_request_bytes(tiny_base, "float32", on_gpu=True) == parameters * 4 + GIB
    adapter = tiny_adapter(tiny_base, tmp_path / "adapter")
    asked = []
    real_remote = ray.remote

    def recording(**options):
        asked.append(options)
        return real_remote(**options)

    previous = os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        monkeypatch.setattr(ray, "remote", recording)
        kept = merge_and_measure(tiny_base, Path(adapter), tmp_path / "merged", held_out_conversations(2), letters(10),
                                 RankerConfig(merged_dtype="bfloat16", cpus_per_worker=1))
    finally:
        monkeypatch.undo()
        ray.shutdown()
        if previous is not None:
            os.environ["RAY_ADDRESS"] = previous
    assert asked == [{"num_cpus": 1.0, "num_gpus": 0.0, "memory": parameters * 6 + GIB}]
    assert kept["prompts"] == 2 and (tmp_path / "merged" / "config.json").is_file()


def test_gradient_checkpointing_recomputes_the_layers_and_learns_the_same(tiny_base, tmp_path, monkeypatch):
    """`ranker.gradient_checkpointing` runs each decoder layer again in the backward pass (what frees
    its activations) and leaves the curve as it was."""
    from transformers.models.llama import modeling_llama

    from cotrec.ranker.finetune import train_loop

    lists, labels = copy_task(6, seed=3)
    rc = RankerConfig(trainer="local", precision="fp32", epochs=1, batch_size=2, micro_batch=2, cpus_per_worker=1)
    ranker = LetterRanker(None, domain_of("movie"), "llm", labels)
    examples = epoch_examples(lists[:4], ranker, rc.epochs, rc.shuffle_seed)
    job = FinetuneJob.from_config(rc.model_copy(update={"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lr": 1e-2,
                                                         "warmup_ratio": 0.0}),
                                  name="tiny", model_path=tiny_base, examples=examples, candidates=10, seed=0,
                                  validation=validation_prompts(lists[4:], ranker, rc.shuffle_seed), max_tokens=512)
    real_forward = modeling_llama.LlamaDecoderLayer.forward
    runs = {}
    for checkpointing in (False, True):
        calls = []

        def counted(self, *args, **kwargs):
            calls.append(1)
            return real_forward(self, *args, **kwargs)

        monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counted)
        result = train_loop({**job.loop_config(str(tmp_path / f"adapter-{checkpointing}")),
                             "gradient_checkpointing": checkpointing})
        monkeypatch.undo()
        runs[checkpointing] = (len(calls), [c["loss"] for c in result["curve"][1:]],
                               [c["val_ndcg@10"] for c in result["curve"]])
    (plain_calls, plain_loss, plain_val), (gc_calls, gc_loss, gc_val) = runs[False], runs[True]
    training_passes = 2  # 4 lists in micro-batches of 2, 2 layers each: 4 more layer calls recomputed
    assert gc_calls - plain_calls == training_passes * 2
    assert gc_loss == pytest.approx(plain_loss, abs=1e-5) and gc_val == pytest.approx(plain_val, abs=1e-6)
