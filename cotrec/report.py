"""`cotrec report`: render `<run>/reports/` from what the run directory holds.

Nothing is trained or generated here; every figure is read back from the stages' own outputs:

  table1.md, table1.png            the retriever grid (finished variants, mean ± std over seeds)
  table2.md, rank_vs_position.png  the ranker grid (finished evaluations) and its MAPB curves
  stages.md, stages.png            wall time per stage (recorded by `cotrec run` in stages.json) and
                                   LLM calls / tokens per extraction stage (summed from its shards)
  summary.md                       the one-page view: dataset, Table 1, Table 2, stages
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, TypedDict

from cotrec.config import Config, parse_ranker
from cotrec.extract.programs import stored_outputs
from cotrec.ranker.grid import finished_table2, write_table2_report
from cotrec.ranker.stage import ranker_folder
from cotrec.records import Table2Row
from cotrec.ranker.table2 import MANIFEST
from cotrec.reporting.plots import plot_rank_vs_position, plot_table1
from cotrec.reporting.stages import StageRecord, StageTiming, finished_stage_seconds, stage_records, write_stages
from cotrec.reporting.tables import TABLE2, Table1, ranker_label, table2_console_cells, write_table1
from cotrec.retriever.grid import finished_grid
from cotrec.rundir import DatasetStats, RunDir, atomic_write_text, read_stats
from cotrec.storage import replace_file, run_path

# The extraction stages of the main job and the kind each runs (tokens are read from its shards).
EXTRACTION_STAGES = {"items": "items", "preferences": "users", "perceptions": "perceptions"}


def extraction_usage(run: RunDir) -> dict[str, dict[str, int]]:
    """LLM rows, calls and tokens of each extraction stage, from the newest row per key."""
    counters = ("calls", "prompt_tokens", "completion_tokens")
    usage = {}
    for stage, kind in EXTRACTION_STAGES.items():
        rows = stored_outputs(run, kind, ["status", *counters])
        if rows.empty:
            continue
        usage[stage] = {"rows": int(len(rows)), "failed": int((rows["status"] != "ok").sum()),
                        **{c: int(rows[c].fillna(0).sum()) if c in rows else 0 for c in counters}}
    return usage


def copy_training_curves(config: Config, run: RunDir) -> list[Path]:
    """Each fine-tuned ranker's learning curve, as `reports/finetune-<retriever>--<prompt>.png`."""
    copied = []
    for variant in config.ranker.retrievers.values():
        for ranker in config.ranker.grid:
            prompt, fine_tuned = parse_ranker(ranker)
            curve = run / ranker_folder(variant, prompt) / "model" / "curve.png"
            if fine_tuned and curve.is_file():
                target = run / "reports" / f"finetune-{Path(ranker_folder(variant, prompt)).name}.png"
                data = curve.read_bytes()
                replace_file(lambda out: out.write_bytes(data), target)
                copied.append(target)
    return copied


class ReportSummary(TypedDict, total=False):
    """What `write_reports` rendered from (and `format_report` shows): the run's dataset, tables and
    stage records, and which reports were written or are missing (`skipped`: as the main job's stage)."""

    config: str
    run: str
    stats: Optional[DatasetStats]
    table1: Table1
    table2: list[Table2Row]
    stages: dict[str, StageRecord]
    usage: dict[str, dict[str, int]]
    written: list[str]
    missing: list[str]
    skipped: bool


def write_reports(config: Config, run: RunDir, stage_names: Sequence[str]) -> ReportSummary:
    """Render every report the run's outputs allow; returns what was written and what is missing.
    `stage_names`: the main job's stages, in order (the stage table lists them)."""
    written, missing = [], []
    table1 = finished_grid(config, run)
    if table1["rows"]:
        written += [str(write_table1(run, config, table1)), str(plot_table1(run, table1["rows"]))]
    else:
        missing.append("Table 1 (no retriever variant finished: `cotrec retriever grid`)")
    table2_rows = finished_table2(config, run)
    table2 = None
    if table2_rows:
        table2 = write_table2_report(config, run, table2_rows)
        written += [str(run / TABLE2), str(run / "reports" / MANIFEST)]
        plot = plot_rank_vs_position(run, table2_rows)
        if plot is not None:
            written.append(str(plot))
        written += [str(path) for path in copy_training_curves(config, run)]
    else:
        missing.append("Table 2 (no ranker evaluation finished: `cotrec ranker grid`)")
    records, usage = stage_records(run), extraction_usage(run)
    written.append(str(write_stages(run, records, usage, [s for s in stage_names if s != "report"])))
    try:
        stats = read_stats(run)
    except OSError:  # a report of an unprepared run still renders what it can
        stats = None
    summary = ReportSummary(config=config.name, run=str(run.root), stats=stats, table1=table1,
                            table2=table2["rows"] if table2 else [],
                            stages=records, usage=usage, written=written, missing=missing)
    atomic_write_text(run / "reports/summary.md", summary_markdown(summary))
    written.append(str(run / "reports/summary.md"))
    return summary


def _dataset_line(stats: Optional[DatasetStats]) -> str:
    if not stats:
        return "dataset: not prepared"
    sample = stats.get("sample")
    return (f"dataset: {stats['dataset']}, {stats['users']:,} users, {stats['items']:,} items, "
            f"{stats['interactions']:,} interactions"
            + (f" (seeded sample of {sample['users']} users, seed {sample['seed']})" if sample else ""))


def summary_markdown(summary: ReportSummary) -> str:
    lines = [f"# Run `{summary['run']}` (config `{summary['config']}`)", "", _dataset_line(summary["stats"]), ""]
    for name in ("table1.md", "table2.md", "stages.md"):
        path = run_path(summary["run"]) / "reports" / name
        if path.exists():
            body = path.read_text().strip().splitlines()
            lines += ["#" + body[0], *body[1:], ""]  # one heading level down
    reports = run_path(summary["run"]) / "reports"
    curves = sorted(p.name for p in reports.glob("finetune-*.png"))
    for name in ("table1.png", "rank_vs_position.png", *curves, "stages.png"):
        if (reports / name).exists():
            lines.append(f"![{name}]({name})")
    if summary["missing"]:
        lines += ["", "Not yet available: " + "; ".join(summary["missing"]) + "."]
    return "\n".join(lines) + "\n"


def format_report(summary: ReportSummary, timings: Optional[list[StageTiming]] = None) -> str:
    """The one-screen view: Table 1, Table 2 and the stage times (this run's, when given)."""
    lines = [_dataset_line(summary["stats"]), ""]
    if summary["table1"]["rows"]:
        seeds = summary["table1"]["seeds"]
        lines.append(f"Table 1 (retriever, test, {len(seeds)} seed(s))   {'Hit@10':>16} {'NDCG@10':>16}")
        for row in summary["table1"]["rows"]:
            lines.append(f"  {row['variant']:<32} {row['hit@10']:.4f} ± {row['hit@10_std']:.4f} "
                         f"{row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f}")
        lines.append("")
    if summary["table2"]:
        lines.append(f"Table 2 (ranker on the retriever's top-10)        {'NDCG@10':>8} {'PF-NDCG':>8} {'MAPB':>6} "
                     f"{'ranked':>6}")
        for row in summary["table2"]:
            name = f"  {row['label'] + ' + ' + ranker_label(row['ranker']):<46}"
            lines.append(f"{name} {table2_console_cells(row)}")
        lines.append("")
    if timings is not None:
        usage = summary["usage"]
        lines.append("Stages, this run (generated tokens of the extraction stages)")
        for t in timings:
            state = "  not needed" if t.get("unneeded") else "  up to date, skipped" if t["skipped"] else ""
            tokens = f"  {usage[t['stage']]['completion_tokens']:,} gen tokens" if t["stage"] in usage else ""
            lines.append(f"  {t['stage']:<12} {t['seconds']:8.1f} s{tokens}{state}")
        total = sum(t["seconds"] for t in timings)
        lines.append(f"  {'total':<12} {total:8.1f} s ({total / 60:.1f} min)")
    elif summary["stages"]:
        usage = summary["usage"]
        finished = finished_stage_seconds(summary["stages"])
        lines.append("Stages (wall time of the work, interrupted attempts included; generated tokens)")
        for stage, record in summary["stages"].items():
            tokens = f"  {usage[stage]['completion_tokens']:,} gen tokens" if stage in usage else ""
            if stage in finished:
                lines.append(f"  {stage:<12} {finished[stage]:8.1f} s{tokens}")
            else:
                lines.append(f"  {stage:<12} {'-':>8}   interrupted after {record.get('interrupted_seconds', 0):.1f} s")
        total = sum(finished.values())
        lines.append(f"  {'total':<12} {total:8.1f} s ({total / 60:.1f} min)")
    for item in summary["missing"]:
        lines.append(f"missing: {item}")
    lines.append(f"reports: {run_path(summary['run']) / 'reports'}")
    return "\n".join(lines)
