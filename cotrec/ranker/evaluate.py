"""`ranker eval`: one ranker on one retriever's test lists. An evaluation is planned (its lists and
the prompts each shows, or a result when it is up to date or needs no engine), then its prompts are
scored on the Ray Data actor pool of its model's engine, several evaluations of one model in one
pass, and each is written to `<run>/ranker/<user>-<item>--<ranker>/eval/`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from cotrec.config import RANKER_PROMPTS, Config, parse_ranker
from cotrec.fingerprint import fingerprint
from cotrec.progress import log
from cotrec.ranker.letters import (LetterRanker, RankerMetrics, RankingPlan, plan_rankings, rankings_from_scores,
                                  score_plan, unranked)
from cotrec.ranker.lists import candidate_rows, ranked_lists, trained_on
from cotrec.ranker.mapb import PositionScorer, RandomScorer
from cotrec.ranker.prompts import PROMPT_VERSION
from cotrec.ranker.scoring import score_prompts
from cotrec.records import EvalResult, FinetuneSummary
from cotrec.ranker.stage import MEMORY_KEYS, list_inputs, merged_model, ranker_folder, ranker_train
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, write_json



def scoring_model(config: Config, run: RunDir, variant: str, ranker: str) -> Optional[tuple[str, Optional[str]]]:
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
    notes: dict[str, int]
    plan: Optional[RankingPlan]  # None: nothing is re-ranked
    trained: Optional[FinetuneSummary]
    started: float


def plan_eval(config: Config, run: RunDir, variant: str, ranker: str, force: bool) -> EvalResult | PendingEval:
    """An evaluation up to date (its result), one scored here without an engine (written, its
    result), or one whose prompts an engine must score (pending). Fine-tunes first when needed."""
    prompt, fine_tuned = parse_ranker(ranker)
    shows = prompt if prompt in RANKER_PROMPTS else "llm"  # the others read nothing but the candidates
    rc = config.ranker
    model = scoring_model(config, run, variant, ranker)
    trained = ranker_train(config, run, trained_on(config, variant), prompt, force=False) if fine_tuned else None
    stage = f"{ranker_folder(variant, ranker)}/eval"
    fp = fingerprint({"data": config.fingerprint("data"), "llm": config.llm.model_dump(mode="json"),
                  "ranker": config.ranker.model_dump(mode="json", exclude={"retrievers", "grid", "lists_per_call", *MEMORY_KEYS}),
                  "model": run.completion(f"{ranker_folder(trained_on(config, variant), prompt)}/model") if fine_tuned else
                  (model[0] if model else None),
                  "inputs": list_inputs(config, run, variant, shows)})
    if not force and run.is_complete(stage, fp):
        log(f"ranker: {run / stage} is up to date; skipped")
        return {"skipped": True, "folder": str(run / stage), **json.loads((run / stage / "metrics.json").read_text())}
    started = time.perf_counter()
    if trained is not None and "not_trained" in trained:  # too few lists to fine-tune on: a row that says so
        result: EvalResult = {"retriever": variant, "ranker": ranker, "prompt": prompt, "fine_tuned": True,
                              "split": "test", "not_run": trained["not_trained"], "seed": config.seed}
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


def score_and_write(config: Config, run: RunDir, pending: list[PendingEval]) -> list[EvalResult]:
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


def _write_eval(config: Config, run: RunDir, p: PendingEval, metrics: RankerMetrics,
                rankings: pd.DataFrame) -> EvalResult:
    prompt, fine_tuned = parse_ranker(p.ranker)
    rc = config.ranker
    model = p.model[0] if p.model else None
    retriever_metrics = json.loads(((run / variant_dir(config, *parse_variant(p.variant), config.seed))
                                    / "metrics.json").read_text())
    result: EvalResult = {"retriever": p.variant, "ranker": p.ranker, "prompt": prompt, "fine_tuned": fine_tuned,
                          "split": "test", **metrics, "retriever_ndcg@10": retriever_metrics["ndcg@10"],
                          "model": model, "backend": config.llm.backend if model else None,
                          "prompt_version": PROMPT_VERSION, "seed": config.seed, "shuffle_seed": rc.shuffle_seed,
                          "sampled_users": rc.max_eval_users, "wall_seconds": round(time.perf_counter() - p.started, 3),
                          **p.notes}
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


def ranker_eval(config: Config, run: RunDir, variant: str, ranker: str, force: bool = False) -> EvalResult:
    """Rank the test lists of one retriever with one ranker: NDCG@K over all users, MAPB."""
    planned = plan_eval(config, run, variant, ranker, force)
    return planned if isinstance(planned, dict) else score_and_write(config, run, [planned])[0]
