"""The ranker's fine-tune stage (`ranker train`, and the frozen-feature `ranker probe`); `ranker eval`
is `evaluate.py` and `ranker grid` (the paper's Table 2) `grid.py`.

A ranker is named by its prompt and mode: `none` (the retriever's own order), `llm`, `llm+`,
`llm++` (fine-tuned), or `<prompt>/zero-shot` (the base model as it is). It re-ranks the test
candidates of one retriever variant. Folders, each staged (published whole, with a fingerprint):

  <run>/ranker/<user>-<item>--<ranker>/model/   adapter/ (peft LoRA), merged/ (a full checkpoint
                                                 the vLLM backend serves), train.json (losses)
  <run>/ranker/<user>-<item>--<ranker>/eval/    metrics.json (ndcg@10, hit@10, mapb, ...),
                                                 rankings.parquet (per user: shown order, letter
                                                 probabilities, predicted order, target ranks by
                                                 position)

Training reads the `valid` horizon (lists whose valid target is among the candidates) and
evaluation the `test` horizon, as LlamaRec does; neither ever sees the test target in training.
`ranker grid` evaluates every `ranker.grid` ranker on every `ranker.retrievers` variant and writes
`reports/table2.md` and `reports/rank_vs_position.png`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from cotrec.config import RANKER_PROMPTS, Config, parse_ranker
from cotrec.errors import CotrecError, DataError
from cotrec.extract.programs import output_folder
from cotrec.extract.shards import folder_digest
from cotrec.fingerprint import fingerprint
from cotrec.llm import letters
from cotrec.llm.embedded import resolve_model
from cotrec.progress import log
from cotrec.ranker.finetune import FinetuneJob, epoch_examples, fit, merge_and_measure, validation_prompts
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import (attach_prompt_inputs, ranked_lists, shows_preference_when_trained, trained_on,
                                 training_lists)
from cotrec.ranker.probe import ProbeResult
from cotrec.records import FinetuneSummary
from cotrec.ranker.prompts import PROMPT_VERSION, uses_perceptions, uses_preference
from cotrec.reporting.plots import plot_training_curve
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, write_json
from cotrec.storage import remove_tree


# What only evaluation reads; everything else in the ranker section shapes the fine-tuned model.
EVAL_KEYS = {"retrievers", "grid", "mapb", "max_eval_users", "lists_per_call"}
# Keys that change what a fine-tune holds in memory, or the nodes it runs on, not what it computes: no
# output depends on them.
MEMORY_KEYS = {"gradient_checkpointing", "resources"}


def ranker_folder(variant: str, ranker: str) -> str:
    user, item = parse_variant(variant)
    return f"ranker/{user}-{item}--{ranker.replace('/', '-')}"


def merged_model(config: Config, run: RunDir, variant: str, prompt: str) -> Path:
    """Where `ranker train` leaves the fine-tuned checkpoint (adapter merged) of a prompt that re-ranks
    `variant`'s candidates (trained on its lists, or on those of `ranker.train_on`)."""
    return run / ranker_folder(trained_on(config, variant), prompt) / "model" / "merged"


class ProbeSummary(ProbeResult, total=False):
    """`ranker probe`'s `probe.json` (the probe's result, on which lists), and whether it was current."""

    skipped: bool
    folder: str
    retriever: str
    prompt: str
    trained_on: str


def list_inputs(config: Config, run: RunDir, variant: str, prompt: str) -> dict[str, Optional[str]]:
    """What the lists depend on: the retriever's candidates and the extraction the prompt shows."""
    user, item = parse_variant(variant)
    record = run.completion(variant_dir(config, user, item, config.seed))
    if record is None:
        raise DataError(f"{run / variant_dir(config, user, item, config.seed)}: no trained retriever; run "
                        f"`cotrec retriever train --variant {user}/{item}` first")
    parts: dict[str, Optional[str]] = {"candidates": record.get("fingerprint"), "prompt": prompt, "prompt_version": PROMPT_VERSION}
    for kind, used in (("users", uses_preference(prompt)), ("perceptions", uses_perceptions(prompt))):
        if used:
            parts[kind] = folder_digest(output_folder(run, kind))
    return parts


def train_fingerprint(config: Config, run: RunDir, variant: str, prompt: str) -> str:
    ranker = config.ranker.model_dump(mode="json", exclude=EVAL_KEYS | MEMORY_KEYS)
    inputs = list_inputs(config, run, variant, prompt)
    if shows_preference_when_trained(config):  # the training lists' positions follow the walk's states
        inputs["users"] = folder_digest(output_folder(run, "users"))
    return fingerprint({"data": config.fingerprint("data"), "model": config.llm.model, "ranker": ranker,
                        "retriever": config.retriever.top_m, "seed": config.seed, "inputs": inputs})


def ranker_train(config: Config, run: RunDir, variant: str, prompt: str, force: bool = False) -> FinetuneSummary:
    """Fine-tune a LoRA ranker on one retriever's training lists (`training_lists`: the same for every
    prompt); keep the adapter of the best held-out epoch; merge it. Skipped when current; not trained,
    with a record that says why, when there are too few lists."""
    parse_ranker(prompt)
    if prompt not in RANKER_PROMPTS:
        raise CotrecError(f"ranker {prompt!r} has nothing to train")
    rc = config.ranker
    stage = f"{ranker_folder(variant, prompt)}/model"
    fp = train_fingerprint(config, run, variant, prompt)
    if not force and run.is_complete(stage, fp):
        log(f"ranker: {run / stage} is up to date; skipped")
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "train.json").read_text())}
    started = time.perf_counter()
    found = training_lists(config, run, variant)
    notes = {**attach_prompt_inputs(run, found.train, prompt, config),
             **{f"held_out_{k}": v for k, v in attach_prompt_inputs(run, found.held_out, prompt, config).items()}}
    counts: FinetuneSummary = {"retriever": variant, "prompt": prompt, **found.notes, **notes}
    if len(found.train) < rc.min_train_lists or not found.held_out:
        reason = (f"not fine-tuned: the retriever found the target of {len(found.train)} training and "
                  f"{len(found.held_out)} held-out list(s) (ranker.min_train_lists {rc.min_train_lists}, at least "
                  f"1 held out)")
        with run.staged(stage, fp) as folder:
            write_json(folder / "train.json", {**counts, "not_trained": reason})
        log(f"ranker: {prompt} on {variant}: {reason}")
        return {"skipped": False, "folder": str(run / stage), **counts, "not_trained": reason}
    ranker = LetterRanker.for_run(run, prompt)
    examples = epoch_examples(found.train, ranker, rc.epochs, rc.shuffle_seed)
    held_out = validation_prompts(found.held_out, ranker, rc.shuffle_seed)
    base = resolve_model(config.llm.model)  # a local folder (the embedded model is materialised)
    candidates = len(found.train[0].candidates)
    job = FinetuneJob.from_config(rc, name=f"{variant} {prompt}", model_path=base, examples=examples,
                                  validation=held_out, candidates=candidates, seed=config.seed,
                                  max_tokens=config.llm.max_model_len)
    shape = job.shape
    log(f"ranker: fine-tuning {prompt} on {len(found.train):,} lists of {variant} ({found.notes['valid_lists']:,} "
        f"valid and {found.notes['prefix_lists']:,} prefix lists in all, {found.notes['masked_positives']:,} known "
        f"positives masked) for {rc.epochs} epoch(s), validating on {len(found.held_out):,} held-out lists "
        f"({rc.trainer}, {shape.workers} worker(s), micro-batch {shape.micro_batch}, ZeRO-{rc.zero_stage}, "
        f"{job.precision})" + (f"; {shape.note}" if shape.note else ""))
    with run.staged(stage, fp) as folder:
        result = fit(job, folder / ".ray", folder / "adapter")
        shown = [v["conversation"] for v in held_out[:8]]
        kept = merge_and_measure(base, folder / "adapter", folder / "merged", shown, letters(candidates), rc)
        curve = result.curve
        best = curve[result.best_epoch]
        summary: FinetuneSummary = {
            **counts, "prompt_version": PROMPT_VERSION, "base_model": config.llm.model,
            "examples_per_epoch": len(examples[0]), "epochs": rc.epochs, "shape_note": shape.note,
            "optimiser_steps": result.steps_per_epoch * rc.epochs, "warmup_steps": result.warmup_steps,
            "micro_batch": result.micro_batch, "accumulation": result.accumulation,
            "trainer": rc.trainer, "num_workers": result.world_size, "zero_stage": rc.zero_stage,
            "precision": result.precision, "curve": curve, "best_epoch": result.best_epoch,
            "letter_loss_chance": math.log(candidates),
            "base_val_ndcg@10": curve[0]["val_ndcg@10"], "base_val_ndcg@10_se": curve[0]["val_ndcg@10_se"],
            "best_val_ndcg@10": best["val_ndcg@10"], "best_val_ndcg@10_se": best["val_ndcg@10_se"],
            "first_epoch_loss": curve[1]["loss"], "last_epoch_loss": curve[-1]["loss"],
            "examples_per_s": round(float(np.mean([c["examples_per_s"] for c in curve[1:]])), 3),
            "merged_dtype": rc.merged_dtype, "update_kept": kept,
            "resumed_after_epoch": result.resumed_after_epoch,
            "train_seconds": round(result.seconds, 3),
            "wall_seconds": round(time.perf_counter() - started, 3)}
        write_json(folder / "train.json", summary)
        plot_training_curve(folder / "curve.png", summary)
        remove_tree(folder / ".ray")
    log(f"ranker: {prompt} on {variant}: held-out NDCG@10 {summary['base_val_ndcg@10']:.4f} ± "
        f"{summary['base_val_ndcg@10_se']:.4f} -> {summary['best_val_ndcg@10']:.4f} ± "
        f"{summary['best_val_ndcg@10_se']:.4f} (best epoch {summary['best_epoch']} of {rc.epochs}; letter loss "
        f"{summary['first_epoch_loss']:.3f} -> {summary['last_epoch_loss']:.3f}, chance "
        f"{summary['letter_loss_chance']:.3f}; {summary['wall_seconds']:.0f} s)")
    return {"skipped": False, "folder": str(run / stage), **summary}


def ranker_probe(config: Config, run: RunDir, variant: str, prompt: str, force: bool = False,
                 train_lists: int | None = None) -> ProbeSummary:
    """The frozen-feature probe (`cotrec.ranker.probe`) of the base model on `prompt`'s lists: trained on
    the lists its fine-tune trains on (a seeded sample of `train_lists` of them when given: one forward
    pass per list is what it costs), compared on `variant`'s re-ranked test lists with the zero-shot
    evaluation's ranks (which it needs: `cotrec ranker eval --zero-shot`), in the dtype they were scored in."""
    from cotrec.llm.placement import pick_dtype
    from cotrec.ranker.probe import PROBE_VERSION, run_probe

    if train_lists is not None and train_lists < 2:
        raise CotrecError(f"--train-lists {train_lists}: the probe needs at least 2 training lists")
    zero_shot = f"{prompt}/zero-shot"
    evaluated = run.completion(f"{ranker_folder(variant, zero_shot)}/eval")
    if evaluated is None:
        raise DataError(f"{run / ranker_folder(variant, zero_shot)}: no zero-shot evaluation to compare with; run "
                        f"`cotrec ranker eval --retriever {variant} --prompt {prompt} --zero-shot` first")
    stage = f"{ranker_folder(variant, prompt)}-probe"
    fp = fingerprint({"zero_shot": evaluated, "train": train_fingerprint(config, run, trained_on(config, variant), prompt),
                      "shuffle_seed": config.ranker.shuffle_seed, "train_lists": train_lists,
                      "dtype": config.llm.dtype, "method": PROBE_VERSION})
    if not force and run.is_complete(stage, fp):
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "probe.json").read_text())}
    found = training_lists(config, run, trained_on(config, variant))
    train = found.train
    if train_lists is not None and train_lists < len(train):
        keep = np.random.default_rng(config.seed).choice(len(train), train_lists, replace=False)
        train = [train[i] for i in sorted(keep)]
    attach_prompt_inputs(run, train, prompt, config)
    test, _ = ranked_lists(config, run, variant, prompt)
    test = [lst for lst in test if lst.hit]
    rankings = pd.read_parquet(str(run / ranker_folder(variant, zero_shot) / "eval" / "rankings.parquet"),
                               columns=["user_idx", "target_rank"]).set_index("user_idx")["target_rank"]
    dtype = pick_dtype(config.llm.dtype, "cpu")
    log(f"ranker: probing the base model ({dtype}) on {len(train):,} of {len(found.train):,} training and "
        f"{len(test):,} test lists of {variant} ({prompt})")
    result = run_probe(resolve_model(config.llm.model), LetterRanker.for_run(run, prompt), train, test,
                       rankings.loc[[lst.user_idx for lst in test]].to_numpy(), config.ranker.shuffle_seed, dtype)
    record: ProbeSummary = {"retriever": variant, "prompt": prompt, "trained_on": trained_on(config, variant),
                            **result}
    lists = pd.DataFrame(record.pop("lists"))
    with run.staged(stage, fp) as folder:
        write_json(folder / "probe.json", record)
        lists.to_parquet(folder / "lists.parquet", index=False)
    log(f"ranker: probe {record['probe_ndcg@10']:.4f} vs zero-shot {record['zero_shot_ndcg@10']:.4f} NDCG@10: "
        f"{record['reading']}")
    return {"skipped": False, "folder": str(run / stage), **record}
