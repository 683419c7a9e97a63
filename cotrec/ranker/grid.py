"""`ranker grid`: every `ranker.grid` ranker on every `ranker.retrievers` variant (the paper's
Table 2), evaluations of one model scored in one pass; `reports/table2.md`, its export and the
rank-vs-position plot. `finished_table2` reads the rows already evaluated."""

from __future__ import annotations

import json
import time

import pandas as pd

from cotrec.config import Config, parse_ranker
from cotrec.ranker.evaluate import PendingEval, plan_eval, score_and_write, scoring_model
from cotrec.ranker.stage import list_inputs, ranker_folder
from cotrec.ranker.table2 import export_table2, read_table2, table2_figures
from cotrec.records import EvalResult, Table2Figures, Table2Header, Table2Summary
from cotrec.reporting.plots import RANK_PLOT, plot_rank_vs_position
from cotrec.reporting.tables import TABLE2, table2_markdown
from cotrec.rundir import RunDir, atomic_write_text


def ranker_grid(config: Config, run: RunDir, force: bool = False) -> Table2Summary:
    """Every ranker.grid ranker on every ranker.retrievers variant; reports/table2.md and a plot."""
    rc = config.ranker
    for variant in rc.retrievers.values():  # fail in one line before any work
        list_inputs(config, run, variant, "llm")
    started = time.perf_counter()
    # Same-model evaluations back to back and scored in one pass, so each engine starts once; a
    # pass ends before the next fine-tune, which then has the cores.
    jobs = [(label, variant, ranker) for label, variant in rc.retrievers.items() for ranker in rc.grid]
    jobs.sort(key=lambda j: (parse_ranker(j[2])[0] != "none", parse_ranker(j[2])[1], j[1], j[2]))
    rows: list[EvalResult] = []
    group: list[tuple[str, PendingEval]] = []

    def score_group() -> None:
        if group:
            results = score_and_write(config, run, [p for _, p in group])
            rows.extend({"label": label, **r} for (label, _), r in zip(group, results))
            group.clear()

    for label, variant, ranker in jobs:
        if group and scoring_model(config, run, variant, ranker) != group[0][1].model:
            score_group()
        planned = plan_eval(config, run, variant, ranker, force)
        if isinstance(planned, dict):
            rows.append({"label": label, **planned})
        else:
            group.append((label, planned))
    score_group()
    order = {(label, ranker): i for i, (label, ranker) in
             enumerate((label, ranker) for label in rc.retrievers for ranker in rc.grid)}
    rows.sort(key=lambda r: order[(r["label"], r["ranker"])])
    figures = write_table2_report(config, run, rows)
    summary = Table2Summary(skipped=all(r["skipped"] for r in rows), rows=figures["rows"],
                            comparisons=figures["comparisons"], report=str(run / TABLE2), plot=str(run / RANK_PLOT),
                            seconds=round(time.perf_counter() - started, 3))
    plot_rank_vs_position(run, rows)
    return summary


def finished_table2(config: Config, run: RunDir) -> list[EvalResult]:
    """The ranker grid's finished evaluations (their metrics.json), in Table 2 order (nothing is
    evaluated here)."""
    rows: list[EvalResult] = []
    for label, variant in config.ranker.retrievers.items():
        for ranker in config.ranker.grid:
            stage = f"{ranker_folder(variant, ranker)}/eval"
            if run.completion(stage) is not None:
                rows.append({"label": label, **json.loads((run / stage / "metrics.json").read_text())})
    return rows


def write_table2_report(config: Config, run: RunDir, rows: list[EvalResult]) -> Table2Figures:
    """`reports/table2.md` and what it is computed from (`reports/table2.json`, `reports/rankings/`):
    the rows' per-list outputs, exported, then every figure recomputed from the export alone (what
    `cotrec report --check` does again). Returns the figures."""
    rc = config.ranker
    header = Table2Header(dataset=config.data.source, model=config.llm.model, lora_r=rc.lora_r, epochs=rc.epochs,
                          seed=config.seed, sampled_users=rc.max_eval_users)
    folder = run / "reports"
    export_table2(folder, rows, header, lambda row: pd.read_parquet(
        str(run / ranker_folder(row["retriever"], row["ranker"]) / "eval" / "rankings.parquet")))
    figures = table2_figures(*read_table2(folder))
    atomic_write_text(run / TABLE2, table2_markdown(figures))
    return figures
