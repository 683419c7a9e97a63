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
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from cotrec.config import Config, parse_ranker
from cotrec.errors import CotrecError, DataError
from cotrec.extract.programs import output_folder
from cotrec.extract.shards import folder_digest
from cotrec.fingerprint import fingerprint
from cotrec.llm.embedded import resolve_model
from cotrec.llm.pool import EnginePool
from cotrec.progress import log
from cotrec.ranker.finetune import fit, merge_adapter, resolve_precision, training_examples
from cotrec.ranker.letters import LetterRanker, evaluate_ranker
from cotrec.ranker.lists import ranked_lists
from cotrec.ranker.prompts import PROMPT_VERSION, uses_perceptions, uses_preference
from cotrec.reporting.plots import RANK_PLOT, plot_rank_vs_position
from cotrec.reporting.tables import TABLE2, ranker_label, write_table2
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, write_json
# What only evaluation reads; everything else in the ranker section shapes the fine-tuned model.
EVAL_KEYS = {"retrievers", "grid", "mapb", "max_eval_users", "lists_per_call"}


def ranker_folder(variant: str, ranker: str) -> str:
    user, item = parse_variant(variant)
    return f"ranker/{user}-{item}--{ranker.replace('/', '-')}"


def merged_model(run: RunDir, variant: str, prompt: str) -> Path:
    """Where `ranker train` leaves the fine-tuned checkpoint (adapter merged) of a prompt."""
    return Path(run / ranker_folder(variant, prompt) / "model" / "merged")


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
    ranker = config.ranker.model_dump(mode="json", exclude=EVAL_KEYS)
    return fingerprint({"data": config.fingerprint("data"), "model": config.llm.model, "ranker": ranker,
                    "seed": config.seed, "inputs": _inputs(config, run, variant, prompt)})


def ranker_train(config: Config, run: RunDir, variant: str, prompt: str, force: bool = False) -> dict[str, Any]:
    """Fine-tune a LoRA ranker on the valid lists of one retriever; merge it. Skipped when current."""
    parse_ranker(prompt)
    if prompt == "none":
        raise CotrecError("ranker 'none' has nothing to train")
    rc = config.ranker
    stage = f"{ranker_folder(variant, prompt)}/model"
    fp = train_fingerprint(config, run, variant, prompt)
    if not force and run.is_complete(stage, fp):
        log(f"ranker: {run / stage} is up to date; skipped")
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "train.json").read_text())}
    started = time.perf_counter()
    lists, notes = ranked_lists(config, run, variant, "valid", prompt)
    if not lists:
        raise DataError(f"{run / variant_dir(config, *parse_variant(variant), config.seed)}: no valid list has its "
                        f"target among the candidates; nothing to fine-tune on")
    examples = training_examples(lists, LetterRanker.for_run(run, prompt), rc.epochs, rc.shuffle_seed)
    base = resolve_model(config.llm.model)  # a local folder (the embedded model is materialised)
    job = {"name": f"{variant} {prompt}", "model_path": base, "examples": examples, "seed": config.seed,
           "lora_r": rc.lora_r, "lora_alpha": rc.lora_alpha, "lora_dropout": rc.lora_dropout,
           "lora_targets": rc.lora_targets, "lr": rc.lr, "batch_size": rc.batch_size, "zero_stage": rc.zero_stage,
           "max_tokens": config.llm.max_model_len}
    log(f"ranker: fine-tuning {prompt} on {len(lists):,} valid lists of {variant} for {rc.epochs} epoch(s) "
        f"({rc.trainer}, {rc.num_workers} worker(s), ZeRO-{rc.zero_stage}, "
        f"{resolve_precision(rc.precision, rc.gpus_per_worker > 0)})")
    with run.staged(stage, fp) as folder:
        result = fit(job, rc, folder / ".ray", folder / "adapter")
        merge_adapter(base, folder / "adapter", folder / "merged", result["precision"])
        summary = {"retriever": variant, "prompt": prompt, "prompt_version": PROMPT_VERSION, "base_model": config.llm.model,
                   "train_users": len(lists), "epochs": rc.epochs, "trainer": rc.trainer,
                   "num_workers": result["world_size"], "zero_stage": rc.zero_stage, "precision": result["precision"],
                   "accumulation": result["accumulation"], "history": result["history"],
                   "first_epoch_loss": result["history"][0]["loss"], "last_epoch_loss": result["history"][-1]["loss"],
                   "train_seconds": round(result["seconds"], 3),
                   "wall_seconds": round(time.perf_counter() - started, 3), **notes}
        write_json(folder / "train.json", summary)
        shutil.rmtree(folder / ".ray", ignore_errors=True)
    losses = " -> ".join(f"{epoch['loss']:.4f}" for epoch in summary["history"])
    log(f"ranker: {prompt} on {variant}: mean training loss per epoch {losses} ({summary['wall_seconds']:.0f} s)")
    return {"skipped": False, "folder": str(run / stage), **summary}


def ranker_eval(config: Config, run: RunDir, variant: str, ranker: str, force: bool = False,
                engines: Optional[EnginePool] = None) -> dict[str, Any]:
    """Rank the test lists of one retriever with one ranker: NDCG@K over all users, MAPB."""
    prompt, fine_tuned = parse_ranker(ranker)
    shows = "llm" if prompt == "none" else prompt  # what the lists carry (None needs only the candidates)
    rc = config.ranker
    model = None
    if fine_tuned:
        model = str(merged_model(run, variant, prompt))
        if engines is not None and engines.model != model:
            engines.close()  # an idle vLLM CPU engine keeps polling: free the cores for training
        trained = ranker_train(config, run, variant, prompt, force=False)
    elif prompt != "none":
        model = config.llm.model
    stage = f"{ranker_folder(variant, ranker)}/eval"
    fp = fingerprint({"data": config.fingerprint("data"), "llm": config.llm.model_dump(mode="json"),
                  "ranker": config.ranker.model_dump(mode="json", exclude={"retrievers", "grid", "lists_per_call"}),
                  "model": run.completion(f"{ranker_folder(variant, prompt)}/model") if fine_tuned else model,
                  "inputs": _inputs(config, run, variant, shows)})
    if not force and run.is_complete(stage, fp):
        log(f"ranker: {run / stage} is up to date; skipped")
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "metrics.json").read_text())}
    started = time.perf_counter()
    lists, notes = ranked_lists(config, run, variant, "test", shows)
    own = engines is None
    engines = engines or EnginePool(config.llm)
    try:
        scorer = None
        if model is not None:
            scorer = LetterRanker.for_run(run, prompt, engines.get(model))
        log(f"ranker: ranking {notes['hits']:,} of {len(lists):,} test lists of {variant} with {ranker}"
            + (" (MAPB probe: each target at all positions)" if rc.mapb and scorer else ""))
        metrics, rankings = evaluate_ranker(lists, scorer, rc.shuffle_seed, with_mapb=rc.mapb,
                                            lists_per_call=rc.lists_per_call, name=f"ranker {ranker}")
    finally:
        if own:
            engines.close()
    retriever_metrics = json.loads((Path(run / variant_dir(config, *parse_variant(variant), config.seed))
                                    / "metrics.json").read_text())
    result = {"retriever": variant, "ranker": ranker, "prompt": prompt, "fine_tuned": fine_tuned,
              "split": "test", **metrics, "retriever_ndcg@10": retriever_metrics["ndcg@10"],
              "model": model, "backend": config.llm.backend if model else None, "prompt_version": PROMPT_VERSION,
              "seed": config.seed, "shuffle_seed": rc.shuffle_seed, "sampled_users": rc.max_eval_users,
              "wall_seconds": round(time.perf_counter() - started, 3), **notes}
    if fine_tuned:
        result["train"] = {k: trained[k] for k in ("train_users", "epochs", "first_epoch_loss", "last_epoch_loss",
                                                   "num_workers", "zero_stage", "precision", "train_seconds")}
    with run.staged(stage, fp) as folder:
        write_json(folder / "metrics.json", result)
        rankings.to_parquet(folder / "rankings.parquet", index=False)
    mapb_text = f" mapb {result['mapb']:.3f}" if "mapb" in result else ""
    log(f"ranker: {ranker} on {variant}: test ndcg@10 {result['ndcg@10']:.4f}{mapb_text} "
        f"(retriever {result['retriever_ndcg@10']:.4f}; {result['wall_seconds']:.0f} s)")
    return {"skipped": False, "folder": str(run / stage), **result}


# --- Table 2 ---------------------------------------------------------------------------------

def ranker_grid(config: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
    """Every ranker.grid ranker on every ranker.retrievers variant; reports/table2.md and a plot."""
    rc = config.ranker
    for variant in rc.retrievers.values():  # fail in one line before any work
        _inputs(config, run, variant, "llm")
    started = time.perf_counter()
    engines = EnginePool(config.llm)
    rows = []
    # Same-model evaluations back to back, so each engine starts once.
    jobs = [(label, variant, ranker) for label, variant in rc.retrievers.items() for ranker in rc.grid]
    jobs.sort(key=lambda j: (parse_ranker(j[2])[0] != "none", parse_ranker(j[2])[1], j[1], j[2]))
    try:
        for label, variant, ranker in jobs:
            rows.append({"label": label, **ranker_eval(config, run, variant, ranker, force, engines)})
    finally:
        engines.close()
    order = {(label, ranker): i for i, (label, ranker) in
             enumerate((label, ranker) for label in rc.retrievers for ranker in rc.grid)}
    rows.sort(key=lambda r: order[(r["label"], r["ranker"])])
    summary = {"skipped": all(r["skipped"] for r in rows), "rows": rows, "report": str(run / TABLE2),
               "plot": str(run / RANK_PLOT), "seconds": round(time.perf_counter() - started, 3)}
    write_table2(run, config, summary)
    plot_rank_vs_position(run, rows)
    return summary


def finished_table2(config: Config, run: RunDir) -> list[dict[str, Any]]:
    """The ranker grid's finished evaluations, in Table 2 order (nothing is evaluated here)."""
    rows = []
    for label, variant in config.ranker.retrievers.items():
        for ranker in config.ranker.grid:
            stage = f"{ranker_folder(variant, ranker)}/eval"
            if run.completion(stage) is not None:
                rows.append({"label": label, **json.loads(Path(run / stage / "metrics.json").read_text())})
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'retriever':<28} {'ranker':<22} {'ndcg@10':>8} {'mapb':>6} {'ranked':>6}"]
    for row in summary["rows"]:
        mapb = f"{row['mapb']:.3f}" if row.get("mapb") is not None else "-"
        lines.append(f"{row['label'] + ' ' + row['retriever']:<28} {ranker_label(row['ranker']):<22} "
                     f"{row['ndcg@10']:>8.4f} {mapb:>6} {row['ranked_users']:>6}")
    lines.append(f"report {summary['report']}" + ("  [up to date, skipped]" if summary.get("skipped")
                                                  else f"; {summary['seconds']:.0f} s"))
    return "\n".join(lines)
