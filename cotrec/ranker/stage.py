"""The ranker stages: `ranker train`, `ranker eval` and `ranker grid` (the paper's Table 2).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

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
from cotrec.ranker.finetune import (epoch_examples, fit, merge_and_measure, planned_shape, resolve_precision,
                                    validation_prompts)
from cotrec.ranker.letters import (LetterRanker, RankingPlan, plan_rankings, rankings_from_scores, score_plan,
                                   unranked)
from cotrec.ranker.lists import (attach_prompt_inputs, candidate_rows, ranked_lists, shows_preference_when_trained,
                                 trained_on, training_lists)
from cotrec.ranker.mapb import PositionScorer, RandomScorer
from cotrec.ranker.prompts import PROMPT_VERSION, uses_perceptions, uses_preference
from cotrec.ranker.scoring import score_prompts
from cotrec.ranker.table2 import export_table2, read_table2, table2_figures
from cotrec.reporting.plots import RANK_PLOT, plot_rank_vs_position, plot_training_curve
from cotrec.reporting.tables import TABLE2, estimate, ranker_label, table2_console_cells, table2_markdown
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, atomic_write_text, write_json
from cotrec.storage import remove_tree

# What only evaluation reads; everything else in the ranker section shapes the fine-tuned model.
EVAL_KEYS = {"retrievers", "grid", "mapb", "max_eval_users", "lists_per_call"}
# Keys that change what a fine-tune holds in memory, not what it computes: no output depends on them.
MEMORY_KEYS = {"gradient_checkpointing"}


def ranker_folder(variant: str, ranker: str) -> str:
    user, item = parse_variant(variant)
    return f"ranker/{user}-{item}--{ranker.replace('/', '-')}"


def merged_model(config: Config, run: RunDir, variant: str, prompt: str) -> Path:
    """Where `ranker train` leaves the fine-tuned checkpoint (adapter merged) of a prompt that re-ranks
    `variant`'s candidates (trained on its lists, or on those of `ranker.train_on`)."""
    return run / ranker_folder(trained_on(config, variant), prompt) / "model" / "merged"


def _inputs(config: Config, run: RunDir, variant: str, prompt: str) -> dict[str, Any]:
    """What the lists depend on: the retriever's candidates and the extraction the prompt shows."""
    user, item = parse_variant(variant)
    record = run.completion(variant_dir(config, user, item, config.seed))
    if record is None:
        raise DataError(f"{run / variant_dir(config, user, item, config.seed)}: no trained retriever; run "
                        f"`cotrec retriever train --variant {user}/{item}` first")
    parts: dict[str, Any] = {"candidates": record.get("fingerprint"), "prompt": prompt, "prompt_version": PROMPT_VERSION}
    for kind, used in (("users", uses_preference(prompt)), ("perceptions", uses_perceptions(prompt))):
        if used:
            parts[kind] = folder_digest(output_folder(run, kind))
    return parts


def train_fingerprint(config: Config, run: RunDir, variant: str, prompt: str) -> str:
    ranker = config.ranker.model_dump(mode="json", exclude=EVAL_KEYS | MEMORY_KEYS)
    inputs = _inputs(config, run, variant, prompt)
    if shows_preference_when_trained(config):  # the training lists' positions follow the walk's states
        inputs["users"] = folder_digest(output_folder(run, "users"))
    return fingerprint({"data": config.fingerprint("data"), "model": config.llm.model, "ranker": ranker,
                        "retriever": config.retriever.top_m, "seed": config.seed, "inputs": inputs})


def ranker_train(config: Config, run: RunDir, variant: str, prompt: str, force: bool = False) -> dict[str, Any]:
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
    counts = {"retriever": variant, "prompt": prompt, **found.notes, **notes}
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
    shape = planned_shape(examples, rc)
    held_out = validation_prompts(found.held_out, ranker, rc.shuffle_seed)
    base = resolve_model(config.llm.model)  # a local folder (the embedded model is materialised)
    candidates = len(found.train[0].candidates)
    job = {"name": f"{variant} {prompt}", "model_path": base, "examples": examples, "validation": held_out,
           "candidates": candidates, "seed": config.seed, "lora_r": rc.lora_r,
           "lora_alpha": rc.lora_alpha, "lora_dropout": rc.lora_dropout, "lora_targets": rc.lora_targets, "lr": rc.lr,
           "warmup_ratio": rc.warmup_ratio, "shape": asdict(shape), "zero_stage": rc.zero_stage,
           "max_tokens": config.llm.max_model_len, "gradient_checkpointing": rc.gradient_checkpointing}
    log(f"ranker: fine-tuning {prompt} on {len(found.train):,} lists of {variant} ({found.notes['valid_lists']:,} "
        f"valid and {found.notes['prefix_lists']:,} prefix lists in all, {found.notes['masked_positives']:,} known "
        f"positives masked) for {rc.epochs} epoch(s), validating on {len(found.held_out):,} held-out lists "
        f"({rc.trainer}, {shape.workers} worker(s), micro-batch {shape.micro_batch}, ZeRO-{rc.zero_stage}, "
        f"{resolve_precision(rc.precision, rc.gpus_per_worker > 0)})" + (f"; {shape.note}" if shape.note else ""))
    with run.staged(stage, fp) as folder:
        result = fit(job, rc, folder / ".ray", folder / "adapter")
        shown = [v["conversation"] for v in held_out[:8]]
        kept = merge_and_measure(base, folder / "adapter", folder / "merged", shown, letters(candidates), rc)
        curve = result["curve"]
        best = curve[result["best_epoch"]]
        summary = {**counts, "prompt_version": PROMPT_VERSION, "base_model": config.llm.model,
                   "examples_per_epoch": len(examples[0]), "epochs": rc.epochs, "shape_note": shape.note,
                   "optimiser_steps": result["steps_per_epoch"] * rc.epochs, "warmup_steps": result["warmup_steps"],
                   "micro_batch": result["micro_batch"], "accumulation": result["accumulation"],
                   "trainer": rc.trainer, "num_workers": result["world_size"], "zero_stage": rc.zero_stage,
                   "precision": result["precision"], "curve": curve, "best_epoch": result["best_epoch"],
                   "letter_loss_chance": math.log(candidates),
                   "base_val_ndcg@10": curve[0]["val_ndcg@10"], "base_val_ndcg@10_se": curve[0]["val_ndcg@10_se"],
                   "best_val_ndcg@10": best["val_ndcg@10"], "best_val_ndcg@10_se": best["val_ndcg@10_se"],
                   "first_epoch_loss": curve[1]["loss"], "last_epoch_loss": curve[-1]["loss"],
                   "examples_per_s": round(float(np.mean([c["examples_per_s"] for c in curve[1:]])), 3),
                   "merged_dtype": rc.merged_dtype, "update_kept": kept,
                   "resumed_after_epoch": result["resumed_after_epoch"],
                   "train_seconds": round(result["seconds"], 3),
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


def ranker_probe(config: Config, run: RunDir, variant: str, prompt: str, force: bool = False) -> dict[str, Any]:
    """The frozen-feature probe (`cotrec.ranker.probe`) of the base model on `prompt`'s lists: trained on
    the lists its fine-tune trains on, compared on `variant`'s re-ranked test lists with the zero-shot
    evaluation's ranks (which it needs: `cotrec ranker eval --zero-shot`)."""
    from cotrec.ranker.probe import run_probe

    zero_shot = f"{prompt}/zero-shot"
    evaluated = run.completion(f"{ranker_folder(variant, zero_shot)}/eval")
    if evaluated is None:
        raise DataError(f"{run / ranker_folder(variant, zero_shot)}: no zero-shot evaluation to compare with; run "
                        f"`cotrec ranker eval --retriever {variant} --prompt {prompt} --zero-shot` first")
    stage = f"{ranker_folder(variant, prompt)}-probe"
    fp = fingerprint({"zero_shot": evaluated, "train": train_fingerprint(config, run, trained_on(config, variant), prompt),
                      "shuffle_seed": config.ranker.shuffle_seed})
    if not force and run.is_complete(stage, fp):
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "probe.json").read_text())}
    found = training_lists(config, run, trained_on(config, variant))
    attach_prompt_inputs(run, found.train, prompt, config)
    test, _ = ranked_lists(config, run, variant, prompt)
    test = [lst for lst in test if lst.hit]
    rankings = pd.read_parquet(str(run / ranker_folder(variant, zero_shot) / "eval" / "rankings.parquet"),
                               columns=["user_idx", "target_rank"]).set_index("user_idx")["target_rank"]
    log(f"ranker: probing the base model on {len(found.train):,} training and {len(test):,} test lists of {variant} "
        f"({prompt})")
    result = run_probe(resolve_model(config.llm.model), LetterRanker.for_run(run, prompt), found.train, test,
                       rankings.loc[[lst.user_idx for lst in test]].to_numpy(), config.ranker.shuffle_seed)
    result = {"retriever": variant, "prompt": prompt, "trained_on": trained_on(config, variant), **result}
    with run.staged(stage, fp) as folder:
        write_json(folder / "probe.json", result)
    log(f"ranker: probe {result['probe_ndcg@10']:.4f} vs zero-shot {result['zero_shot_ndcg@10']:.4f} NDCG@10: "
        f"{result['reading']}")
    return {"skipped": False, "folder": str(run / stage), **result}


def _scoring_model(config: Config, run: RunDir, variant: str, ranker: str) -> Optional[tuple[str, Optional[str]]]:
    """The (model, dtype) whose engine scores a ranker's prompts; None for a ranker without one.
    A fine-tuned model is served in the dtype it was merged in."""
    prompt, fine_tuned = parse_ranker(ranker)
    if fine_tuned:
        return str(merged_model(config, run, variant, prompt)), config.ranker.merged_dtype
    return (config.llm.model, None) if prompt in RANKER_PROMPTS else None


@dataclass
class PendingEval:
    """An evaluation whose prompts are planned and wait for an engine's scores."""

    variant: str
    ranker: str
    shows: str  # the prompt its lists are built for
    model: Optional[tuple[str, Optional[str]]]  # (model, dtype) of the engine; None: a reference ranker
    stage: str
    fp: str
    notes: dict[str, Any]
    plan: Optional[RankingPlan]  # None: nothing is re-ranked
    trained: Optional[dict[str, Any]]
    started: float


def _plan_eval(config: Config, run: RunDir, variant: str, ranker: str, force: bool) -> dict[str, Any] | PendingEval:
    """An evaluation up to date (its result), one scored here without an engine (written, its
    result), or one whose prompts an engine must score (pending). Fine-tunes first when needed."""
    prompt, fine_tuned = parse_ranker(ranker)
    shows = prompt if prompt in RANKER_PROMPTS else "llm"  # the others read nothing but the candidates
    rc = config.ranker
    model = _scoring_model(config, run, variant, ranker)
    trained = ranker_train(config, run, trained_on(config, variant), prompt, force=False) if fine_tuned else None
    stage = f"{ranker_folder(variant, ranker)}/eval"
    fp = fingerprint({"data": config.fingerprint("data"), "llm": config.llm.model_dump(mode="json"),
                  "ranker": config.ranker.model_dump(mode="json", exclude={"retrievers", "grid", "lists_per_call", *MEMORY_KEYS}),
                  "model": run.completion(f"{ranker_folder(trained_on(config, variant), prompt)}/model") if fine_tuned else
                  (model[0] if model else None),
                  "inputs": _inputs(config, run, variant, shows)})
    if not force and run.is_complete(stage, fp):
        log(f"ranker: {run / stage} is up to date; skipped")
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "metrics.json").read_text())}
    started = time.perf_counter()
    if trained is not None and "not_trained" in trained:  # too few lists to fine-tune on: a row that says so
        result = {"retriever": variant, "ranker": ranker, "prompt": prompt, "fine_tuned": True, "split": "test",
                  "not_run": trained["not_trained"], "seed": config.seed}
        with run.staged(stage, fp) as folder:
            write_json(folder / "metrics.json", result)
        log(f"ranker: {ranker} on {variant}: {trained['not_trained']}")
        return {"skipped": False, "folder": str(run / stage), **result}
    if prompt == "none":  # nothing to re-rank: the candidates are read column-wise, whatever the user count
        frame = candidate_rows(config, run, variant, "test", limit=rc.max_eval_users)
        metrics, rankings = unranked(frame, time.perf_counter() - started)
        notes = {"lists": len(frame), "hits": int(frame["target_in_candidates"].sum())}
        return _write_eval(config, run, PendingEval(variant, ranker, shows, None, stage, fp, notes, None, None, started),
                           metrics, rankings)
    lists, notes = ranked_lists(config, run, variant, shows)
    pending = PendingEval(variant, ranker, shows, model, stage, fp, notes,
                          plan_rankings(lists, rc.shuffle_seed, rc.mapb), trained, started)
    if model is not None:
        return pending
    scorer = {"random": RandomScorer(config.seed), "position": PositionScorer()}.get(prompt)
    metrics, rankings = score_plan(pending.plan, scorer, rc.lists_per_call, name=f"ranker {ranker}")
    return _write_eval(config, run, pending, metrics, rankings)


def _score_and_write(config: Config, run: RunDir, pending: list[PendingEval]) -> list[dict[str, Any]]:
    """Score the prompts of evaluations of one model in one pass on the actor pool; write each.
    Each is credited with the pass's time in proportion to its prompts."""
    prompts: list[tuple[Any, int]] = []
    spans = []
    for p in pending:
        letter_ranker = LetterRanker.for_run(run, p.shows)
        first = len(prompts)
        prompts += [(letter_ranker.conversation(lst, order), len(order)) for lst, order in p.plan.queries()]
        spans.append((first, len(prompts)))
        log(f"ranker: ranking {p.notes['hits']:,} of {len(p.plan.lists):,} test lists of {p.variant} with {p.ranker}"
            + (" (MAPB probe: each target at all positions)" if p.plan.with_mapb else ""))
    started = time.perf_counter()
    model, dtype = pending[0].model  # type: ignore[misc]
    probs, actors = score_prompts(config, model, dtype, prompts, name=f"ranker {' '.join(p.ranker for p in pending)}")
    seconds = time.perf_counter() - started
    results = []
    for p, (first, last) in zip(pending, spans):
        block = np.stack(probs[first:last]) if last > first else np.zeros((0, 0))
        metrics, rankings = rankings_from_scores(p.plan, block, seconds * (last - first) / max(len(prompts), 1))
        metrics["scoring_actors"] = actors
        results.append(_write_eval(config, run, p, metrics, rankings))
    return results


def _write_eval(config: Config, run: RunDir, p: PendingEval, metrics: dict[str, Any],
                rankings: pd.DataFrame) -> dict[str, Any]:
    prompt, fine_tuned = parse_ranker(p.ranker)
    rc = config.ranker
    model = p.model[0] if p.model else None
    retriever_metrics = json.loads(((run / variant_dir(config, *parse_variant(p.variant), config.seed))
                                    / "metrics.json").read_text())
    result = {"retriever": p.variant, "ranker": p.ranker, "prompt": prompt, "fine_tuned": fine_tuned,
              "split": "test", **metrics, "retriever_ndcg@10": retriever_metrics["ndcg@10"],
              "model": model, "backend": config.llm.backend if model else None, "prompt_version": PROMPT_VERSION,
              "seed": config.seed, "shuffle_seed": rc.shuffle_seed, "sampled_users": rc.max_eval_users,
              "wall_seconds": round(time.perf_counter() - p.started, 3), **p.notes}
    if p.trained is not None:
        result["train"] = {k: p.trained[k] for k in ("retriever", "train_lists", "held_out_lists", "valid_lists",
                                                     "prefix_lists", "masked_positives", "epochs", "best_epoch",
                                                     "base_val_ndcg@10", "best_val_ndcg@10", "best_val_ndcg@10_se",
                                                     "first_epoch_loss", "last_epoch_loss", "letter_loss_chance",
                                                     "num_workers", "micro_batch", "shape_note", "zero_stage",
                                                     "precision", "train_seconds")}
    with run.staged(p.stage, p.fp) as folder:
        write_json(folder / "metrics.json", result)
        rankings.to_parquet(str(folder / "rankings.parquet"), index=False)
    mapb_text = f" mapb {result['mapb']:.3f}" if "mapb" in result else ""
    log(f"ranker: {p.ranker} on {p.variant}: test ndcg@10 {result['ndcg@10']:.4f}{mapb_text} "
        f"(retriever {result['retriever_ndcg@10']:.4f}; {result['wall_seconds']:.0f} s)")
    return {"skipped": False, "folder": str(run / p.stage), **result}


def ranker_eval(config: Config, run: RunDir, variant: str, ranker: str, force: bool = False) -> dict[str, Any]:
    """Rank the test lists of one retriever with one ranker: NDCG@K over all users, MAPB."""
    planned = _plan_eval(config, run, variant, ranker, force)
    return planned if isinstance(planned, dict) else _score_and_write(config, run, [planned])[0]


# --- Table 2 ---------------------------------------------------------------------------------

def ranker_grid(config: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Every ranker.grid ranker on every ranker.retrievers variant; reports/table2.md and a plot."""
    rc = config.ranker
    for variant in rc.retrievers.values():  # fail in one line before any work
        _inputs(config, run, variant, "llm")
    started = time.perf_counter()
    # Same-model evaluations back to back and scored in one pass, so each engine starts once; a
    # pass ends before the next fine-tune, which then has the cores.
    jobs = [(label, variant, ranker) for label, variant in rc.retrievers.items() for ranker in rc.grid]
    jobs.sort(key=lambda j: (parse_ranker(j[2])[0] != "none", parse_ranker(j[2])[1], j[1], j[2]))
    rows: list[dict[str, Any]] = []
    group: list[tuple[str, PendingEval]] = []

    def score_group() -> None:
        if group:
            results = _score_and_write(config, run, [p for _, p in group])
            rows.extend({"label": label, **r} for (label, _), r in zip(group, results))
            group.clear()

    for label, variant, ranker in jobs:
        if group and _scoring_model(config, run, variant, ranker) != group[0][1].model:
            score_group()
        planned = _plan_eval(config, run, variant, ranker, force)
        if isinstance(planned, dict):
            rows.append({"label": label, **planned})
        else:
            group.append((label, planned))
    score_group()
    order = {(label, ranker): i for i, (label, ranker) in
             enumerate((label, ranker) for label in rc.retrievers for ranker in rc.grid)}
    rows.sort(key=lambda r: order[(r["label"], r["ranker"])])
    figures = write_table2_report(config, run, rows)
    summary = {"skipped": all(r["skipped"] for r in rows), "rows": figures["rows"],
               "comparisons": figures["comparisons"], "report": str(run / TABLE2), "plot": str(run / RANK_PLOT),
               "seconds": round(time.perf_counter() - started, 3)}
    plot_rank_vs_position(run, rows)
    return summary


def finished_table2(config: Config, run: RunDir) -> list[dict[str, Any]]:
    """The ranker grid's finished evaluations (their metrics.json), in Table 2 order (nothing is
    evaluated here)."""
    rows = []
    for label, variant in config.ranker.retrievers.items():
        for ranker in config.ranker.grid:
            stage = f"{ranker_folder(variant, ranker)}/eval"
            if run.completion(stage) is not None:
                rows.append({"label": label, **json.loads((run / stage / "metrics.json").read_text())})
    return rows


def write_table2_report(config: Config, run: RunDir, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`reports/table2.md` and what it is computed from (`reports/table2.json`, `reports/rankings/`):
    the rows' per-list outputs, exported, then every figure recomputed from the export alone (what
    `cotrec report --check` does again). Returns the figures."""
    rc = config.ranker
    header = {"dataset": config.data.source, "model": config.llm.model, "lora_r": rc.lora_r, "epochs": rc.epochs,
              "seed": config.seed, "sampled_users": rc.max_eval_users}
    folder = run / "reports"
    export_table2(folder, rows, header, lambda row: pd.read_parquet(
        str(run / ranker_folder(row["retriever"], row["ranker"]) / "eval" / "rankings.parquet")))
    figures = table2_figures(*read_table2(folder))
    atomic_write_text(run / TABLE2, table2_markdown(figures))
    return figures


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'retriever':<28} {'ranker':<22} {'ndcg@10':>8} {'pf-ndcg':>8} {'mapb':>6} {'ranked':>6}"]
    for row in summary["rows"]:
        name = f"{row['label'] + ' ' + row['retriever']:<28} {ranker_label(row['ranker']):<22}"
        lines.append(f"{name} {table2_console_cells(row)}")
    for pair in summary.get("comparisons", []):
        parts = [f"{name} {estimate(pair[key])}" for key, name in (("ndcg@10", "ndcg@10"), ("pf_ndcg@10", "pf-ndcg"),
                                                                   ("mapb", "mapb")) if key in pair]
        lines.append(f"{pair['label']}: {ranker_label(pair['a'])} - {ranker_label(pair['b'])}: " + ", ".join(parts))
    lines.append(f"report {summary['report']}" + ("  [up to date, skipped]" if summary.get("skipped")
                                                  else f"; {summary['seconds']:.0f} s"))
    return "\n".join(lines)
