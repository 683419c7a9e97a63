"""`cotrec report`: render `<run>/reports/` from what the run directory holds.

Nothing is trained or generated here; every figure is read back from the stages' own outputs:

  table1.md, table1.png          the retriever grid (finished variants, mean ± std over seeds)
  table2.md, rank_vs_position.png  the ranker grid (finished evaluations) and its MAPB curves
  stages.md, stages.png          wall time per stage (recorded by `cotrec run` in stages.json) and
                                 LLM calls / tokens per extraction stage (summed from its shards)
  summary.md                     the one-page view: dataset, Table 1, Table 2, stages
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cotrec.config import Config
from cotrec.rundir import RunDir, atomic_write_text, write_json

STAGES_JSON = "reports/stages.json"
# The extraction stages and the folder each writes (tokens are read from its shards).
_EXTRACTION = {"items": "items", "preferences": "users", "perceptions": "perceptions"}


def record_stage(run: RunDir, stage: str, seconds: float, skipped: bool, interrupted: bool = False) -> None:
    """Remember a stage's wall time.

    A skipped stage keeps the time of the run that did the work. An interrupted attempt (killed,
    failed) keeps its time as `interrupted_seconds`: the stages resume where they stopped, so the
    attempt that finishes the stage records its own time plus the interrupted ones.
    """
    records = stage_records(run)
    previous = records.get(stage, {})
    earlier = previous.get("interrupted_seconds", 0.0)
    if interrupted:
        records[stage] = {**previous, "interrupted_seconds": round(earlier + seconds, 3)}
    elif skipped and "seconds" in previous:
        records[stage] = {**previous, "last_checked_at": time.time(), "last_check_seconds": round(seconds, 3)}
    else:
        records[stage] = {"seconds": round(seconds + earlier, 3), "skipped": skipped, "finished_at": time.time()}
        if earlier:
            records[stage]["of_which_interrupted_seconds"] = round(earlier, 3)
    write_json(Path(run / STAGES_JSON), records)


def stage_records(run: RunDir) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(Path(run / STAGES_JSON).read_text())
    except (OSError, ValueError):
        return {}


def finished_stage_seconds(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Wall time of each stage that has finished (a stage only interrupted so far has none)."""
    return {stage: record["seconds"] for stage, record in records.items() if "seconds" in record}


def extraction_usage(run: RunDir) -> dict[str, dict[str, int]]:
    """LLM rows, calls and tokens of each extraction stage, from the newest row per key."""
    import pyarrow.parquet as pq

    from cotrec.extract.runner import PROGRAMS, latest_rows, read_shards, shard_files

    counters = ("calls", "prompt_tokens", "completion_tokens")
    usage = {}
    for stage, kind in _EXTRACTION.items():
        program = PROGRAMS[kind]
        files = shard_files(Path(run / program.folder))
        if not files:
            continue
        present = set(pq.read_schema(files[0]).names)  # shards from outside the runner may lack counters
        wanted = [c for c in (*program.key, "status", *counters, "created_at") if c in present]
        rows = latest_rows(read_shards(Path(run / program.folder), wanted), program.key)
        usage[stage] = {"rows": int(len(rows)), "failed": int((rows["status"] != "ok").sum()),
                        **{c: int(rows[c].fillna(0).sum()) if c in rows else 0 for c in counters}}
    return usage


def finished_table2(config: Config, run: RunDir) -> list[dict[str, Any]]:
    """The ranker grid's finished evaluations, in Table 2 order."""
    from cotrec.ranker.stage import ranker_folder

    rows = []
    for label, variant in config.ranker.retrievers.items():
        for ranker in config.ranker.grid:
            stage = f"{ranker_folder(variant, ranker)}/eval"
            if run.completion(stage) is not None:
                rows.append({"label": label, **json.loads(Path(run / stage / "metrics.json").read_text())})
    return rows


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure under a temporary name and rename it into place (never half a PNG)."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display on servers and in Ray workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table1(run: RunDir, rows: list[dict[str, Any]]) -> Optional[Path]:
    """Hit@10 and NDCG@10 per retriever variant, with the seeds' std as error bars."""
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    x = np.arange(len(rows))
    for offset, metric in ((-0.2, "hit@10"), (0.2, "ndcg@10")):
        ax.bar(x + offset, [r[metric] for r in rows], 0.4, yerr=[r[f"{metric}_std"] for r in rows], capsize=3,
               label=metric.replace("hit", "Hit").replace("ndcg", "NDCG"))
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("user init / item init")
    ax.set_title("Table 1: SASRec retriever by initialisation (test, full ranking)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, Path(run / "reports/table1.png"))


def write_stages(run: RunDir, records: dict[str, dict[str, Any]], usage: dict[str, dict[str, int]]) -> Path:
    from cotrec.pipeline import STAGE_NAMES

    finished = finished_stage_seconds(records)
    lines = ["# Time and tokens per stage", "",
             "Wall time is that of the run that did the stage's work (`cotrec run` records it), with the time of "
             "attempts interrupted before it added (the stages resume where they stopped); LLM figures are summed "
             "over the newest row per key of the stage's shards.", "",
             "| Stage | Wall time (s) | Rows | LLM calls | Prompt tokens | Generated tokens | Failed rows |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGE_NAMES:
        if stage == "report":
            continue
        record = records.get(stage, {})
        seconds = f"{finished[stage]:.1f}" if stage in finished else "-"
        if record.get("of_which_interrupted_seconds"):
            seconds += f" (of which {record['of_which_interrupted_seconds']:.1f} interrupted)"
        elif stage not in finished and record.get("interrupted_seconds"):
            seconds += f" (interrupted after {record['interrupted_seconds']:.1f})"
        u = usage.get(stage)
        llm = (f"{u['rows']:,} | {u['calls']:,} | {u['prompt_tokens']:,} | {u['completion_tokens']:,} | {u['failed']:,}"
               if u else "- | - | - | - | -")
        lines.append(f"| {stage} | {seconds} | {llm} |")
    total = sum(finished.values())
    lines += ["", f"Total recorded wall time of the finished stages: {total:.1f} s ({total / 60:.1f} min)."]
    path = Path(run / "reports/stages.md")
    atomic_write_text(path, "\n".join(lines) + "\n")
    if finished:
        plt = pyplot()
        names = [s for s in STAGE_NAMES if s in finished]
        fig, ax = plt.subplots(figsize=(7.2, 3.6))
        ax.barh(names[::-1], [finished[s] for s in names[::-1]])
        for i, stage in enumerate(names[::-1]):
            if stage in usage:
                ax.annotate(f"{usage[stage]['completion_tokens']:,} gen tok", (finished[stage], i),
                            xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel("wall time (s)")
        ax.set_title("Time per stage")
        fig.tight_layout()
        save_figure(fig, Path(run / "reports/stages.png"))
    return path


def write_reports(config: Config, run: RunDir) -> dict[str, Any]:
    """Render every report the run's outputs allow; returns what was written and what is missing."""
    from cotrec.data.prepare import read_stats
    from cotrec.ranker.stage import plot_rank_vs_position, write_table2
    from cotrec.retriever.stage import finished_grid, write_table1

    written, missing = [], []
    table1 = finished_grid(config, run)
    if table1["rows"]:
        written += [str(write_table1(run, config, table1)), str(plot_table1(run, table1["rows"]))]
    else:
        missing.append("Table 1 (no retriever variant finished: `cotrec retriever grid`)")
    table2_rows = finished_table2(config, run)
    if table2_rows:
        written.append(str(write_table2(run, config, {"rows": table2_rows})))
        plot = plot_rank_vs_position(run, table2_rows)
        if plot is not None:
            written.append(str(plot))
    else:
        missing.append("Table 2 (no ranker evaluation finished: `cotrec ranker grid`)")
    records, usage = stage_records(run), extraction_usage(run)
    written.append(str(write_stages(run, records, usage)))
    try:
        stats = read_stats(run)
    except Exception:  # noqa: BLE001 - a report of an unprepared run still renders what it can
        stats = None
    summary = {"config": config.name, "run": str(run.root), "stats": stats, "table1": table1, "table2": table2_rows,
               "stages": records, "usage": usage, "written": written, "missing": missing}
    atomic_write_text(Path(run / "reports/summary.md"), summary_markdown(summary))
    written.append(str(run / "reports/summary.md"))
    return summary


def _dataset_line(stats: Optional[dict[str, Any]]) -> str:
    if not stats:
        return "dataset: not prepared"
    sample = stats.get("sample")
    return (f"dataset: {stats['dataset']}, {stats['users']:,} users, {stats['items']:,} items, "
            f"{stats['interactions']:,} interactions"
            + (f" (seeded sample of {sample['users']} users, seed {sample['seed']})" if sample else ""))


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Run `{summary['run']}` (config `{summary['config']}`)", "", _dataset_line(summary["stats"]), ""]
    for name in ("table1.md", "table2.md", "stages.md"):
        path = Path(summary["run"]) / "reports" / name
        if path.exists():
            body = path.read_text().strip().splitlines()
            lines += ["#" + body[0], *body[1:], ""]  # one heading level down
    for name in ("table1.png", "rank_vs_position.png", "stages.png"):
        if (Path(summary["run"]) / "reports" / name).exists():
            lines.append(f"![{name}]({name})")
    if summary["missing"]:
        lines += ["", "Not yet available: " + "; ".join(summary["missing"]) + "."]
    return "\n".join(lines) + "\n"


def format_report(summary: dict[str, Any], timings: Optional[list[dict[str, Any]]] = None) -> str:
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
        from cotrec.ranker.stage import ranker_label

        lines.append(f"Table 2 (ranker on the retriever's top-10)        {'NDCG@10':>8} {'MAPB':>6} {'ranked':>6}")
        for row in summary["table2"]:
            mapb = f"{row['mapb']:.3f}" if row.get("mapb") is not None else "-"
            lines.append(f"  {row['label'] + ' + ' + ranker_label(row['ranker']):<46} {row['ndcg@10']:>8.4f} "
                         f"{mapb:>6} {row['ranked_users']:>6}")
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
    lines.append(f"reports: {Path(summary['run']) / 'reports'}")
    return "\n".join(lines)
