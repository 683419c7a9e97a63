"""The main job (`cotrec run`): every stage of CoT-Rec in order, on one Ray session.

    prepare -> item descriptions -> preferences -> embed -> retriever grid (Table 1)
            -> perceptions -> ranker grid (Table 2) -> report

Each stage is the same function its own CLI command calls, and each skips the work whose outputs
are complete and current (same config, same inputs), so a rerun resumes where a run stopped and
an unchanged run costs seconds. A stage that none of the configured grids reads is left out. The wall time of every stage is recorded in
`<run>/reports/stages.json` for `cotrec report`; the job ends with a one-screen summary.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Generic, Optional, TypedDict, TypeVar, Union

import ray

from cotrec.cluster import ensure_ray
from cotrec.config import Config, parse_ranker
from cotrec.data.prepare import format_summary as format_prepare
from cotrec.data.prepare import PrepareSummary, prepare
from cotrec.embed import embed
from cotrec.embed.stage import EmbedSummary
from cotrec.embed import format_summary as format_embed
from cotrec.errors import CotrecError
from cotrec.extract import extract_items, extract_perceptions, extract_users
from cotrec.extract import format_summary as format_extract
from cotrec.extract.stage import ExtractionSummary
from cotrec.heap import return_freed_memory
from cotrec.progress import log
from cotrec.ranker.lists import candidate_pairs
from cotrec.ranker.prompts import uses_perceptions, uses_preference
from cotrec.ranker.grid import ranker_grid
from cotrec.records import Table2Summary
from cotrec.report import ReportSummary, write_reports
from cotrec.reporting.console import format_grid_summary, format_table2_summary
from cotrec.reporting.stages import StageTiming, record_stage
from cotrec.reporting.tables import Table1
from cotrec.retriever import retriever_grid, train_variant
from cotrec.retriever.variants import embedding_kinds, parse_variant
from cotrec.rundir import RunDir


# What a stage returns: its own summary, each with `skipped`.
StageSummary = Union[PrepareSummary, ExtractionSummary, EmbedSummary, Table1, Table2Summary, ReportSummary]
S = TypeVar("S", PrepareSummary, ExtractionSummary, EmbedSummary, Table1, Table2Summary, ReportSummary)


@dataclass(frozen=True)
class Stage(Generic[S]):
    name: str
    what: str  # one line for the progress log and the summary
    run: Callable[[Config, RunDir, bool], S]
    format: Callable[[S], str]
    # Why the config's grids do not need this stage (None: they do). A run with, say, only
    # `retriever.grid: [none/random]` and `ranker.grid: [none]` makes no LLM call at all.
    unneeded: Callable[[Config], Optional[str]] = lambda config: None


def _prompts(config: Config) -> set[str]:
    return {parse_ranker(ranker)[0] for ranker in config.ranker.grid}


def _variants(config: Config) -> set[tuple[str, str]]:
    return {parse_variant(v) for v in [*config.retriever.grid, *config.ranker.retrievers.values()]}


def _reads_perceptions(config: Config) -> bool:
    return any(uses_perceptions(p) for p in _prompts(config))


def _shows_preference(config: Config) -> bool:
    return any(uses_preference(p) for p in _prompts(config))


def _items_unneeded(config: Config) -> Optional[str]:
    if any(item == "description" for _, item in _variants(config)) or _reads_perceptions(config):
        return None
    return "no retriever variant starts from descriptions and no ranker reads perceptions"


def _preferences_unneeded(config: Config) -> Optional[str]:
    if any(user == "preference" for user, _ in _variants(config)) or _shows_preference(config):
        return None
    return "no retriever variant starts from preferences and no ranker prompt shows them"


def _embed_unneeded(config: Config) -> Optional[str]:
    return None if _embedding_kinds(config) else "every retriever variant starts from random embeddings"


def _perceptions_unneeded(config: Config) -> Optional[str]:
    return None if _reads_perceptions(config) else "no ranker in ranker.grid reads perceptions (llm++)"


class PipelineResult(TypedDict):
    """`run_pipeline`: each stage's summary by name, each stage's time in order, and the total."""

    stages: dict[str, StageSummary]
    timings: list[StageTiming]
    seconds: float


def _prepare(config: Config, run: RunDir, force: bool) -> PrepareSummary:
    return prepare(config, run, force=force)


def _extraction(summary: ExtractionSummary) -> ExtractionSummary:
    return {**summary, "skipped": summary["rows"] == 0}


def _items(config: Config, run: RunDir, force: bool) -> ExtractionSummary:
    return _extraction(extract_items(config, run, force=force))


def _preferences(config: Config, run: RunDir, force: bool) -> ExtractionSummary:
    return _extraction(extract_users(config, run, force=force))


def _perceptions(config: Config, run: RunDir, force: bool) -> ExtractionSummary:
    """The perceptions of exactly the lists the ranker will read."""
    pairs, source = candidate_pairs(run, config)
    return _extraction(extract_perceptions(config, run, pairs, source, force=force))


def _embedding_kinds(config: Config) -> list[str]:
    """What the retriever variants start from: captions, descriptions, preferences."""
    return sorted({kind for user, item in _variants(config) for kind in embedding_kinds(user, item)})


def _embed(config: Config, run: RunDir, force: bool) -> EmbedSummary:
    return embed(config, run, force=force, kinds=_embedding_kinds(config))


def _retriever(config: Config, run: RunDir, force: bool) -> Table1:
    """Table 1, plus any retriever the ranker re-ranks that the grid does not train."""
    summary = retriever_grid(config, run, force=force)
    for variant in dict.fromkeys(config.ranker.retrievers.values()):
        if variant not in config.retriever.grid:
            summary["skipped"] &= train_variant(config, run, variant, config.seed, force)["skipped"]
    return summary


def _ranker(config: Config, run: RunDir, force: bool) -> Table2Summary:
    return ranker_grid(config, run, force=force)


def _report(config: Config, run: RunDir, force: bool) -> ReportSummary:
    return {**write_reports(config, run, STAGE_NAMES), "skipped": False}


STAGES: list[Stage[Any]] = [
    Stage("prepare", "load, k-core filter, sample and split the dataset", _prepare,
          format_prepare),
    Stage("items", "LLM: an objective description of every item", _items,
          format_extract, _items_unneeded),
    Stage("preferences", "LLM: each user's preference recurrence over history windows", _preferences,
          format_extract, _preferences_unneeded),
    Stage("embed", "Encode & Map: captions, descriptions, preferences", _embed, format_embed,
          _embed_unneeded),
    Stage("retriever", "SASRec grid over user / item initialisations (Table 1)", _retriever,
          format_grid_summary),
    Stage("perceptions", "LLM: role-played review + key terms of each re-ranked candidate",
          _perceptions, format_extract, _perceptions_unneeded),
    Stage("ranker", "LoRA fine-tunes and the LLM ranker grid (Table 2)", _ranker,
          format_table2_summary),
    Stage("report", "reports/: tables, plots, time and tokens per stage", _report,
          lambda s: f"wrote {len(s['written'])} files to {s['run']}/reports"),
]
STAGE_NAMES = [s.name for s in STAGES]


def stages_until(last: str | None) -> list[Stage[Any]]:
    """The stages in order, up to and including `last` (every stage when None)."""
    if last is None:
        return list(STAGES)
    if last not in STAGE_NAMES:
        raise CotrecError(f"until: unknown stage {last!r} (stages: {', '.join(STAGE_NAMES)})")
    return STAGES[:STAGE_NAMES.index(last) + 1]


def run_pipeline(config: Config, run: RunDir, force: bool = False, echo: Callable[[str], None] = print,
                 measure: Callable[[str], ContextManager[Any]] = lambda stage: nullcontext(),
                 until: str | None = None) -> PipelineResult:
    """Run the stages in order (every one, or up to `until`) on one Ray session; returns per-stage
    summaries and timings. `measure(stage)`: a context each stage runs in (the scale bench samples
    CPU and memory there)."""
    stages = stages_until(until)
    started_ray = ensure_ray()  # one Ray session for all stages: no start-up per stage
    results: dict[str, StageSummary] = {}
    timings: list[StageTiming] = []
    started = time.perf_counter()
    try:
        for number, stage in enumerate(stages, 1):
            reason = stage.unneeded(config)
            echo(f"== {stage.name} ==")
            if reason is not None:
                log(f"== stage {number}/{len(STAGES)}: {stage.name}: not needed: {reason}")
                echo(f"not needed: {reason}")
                timings.append({"stage": stage.name, "seconds": 0.0, "skipped": True, "unneeded": reason})
                continue
            log(f"== stage {number}/{len(STAGES)}: {stage.name}: {stage.what}")
            timed = stage.name != "report"  # the report renders stages.json; its own time is not recorded
            t0 = time.perf_counter()
            try:
                with measure(stage.name):
                    summary = stage.run(config, run, force)
            except BaseException:  # killed or failed: keep the attempt's time for the one that finishes
                if timed:
                    record_stage(run, stage.name, time.perf_counter() - t0, skipped=False, interrupted=True)
                raise
            seconds = time.perf_counter() - t0
            results[stage.name] = summary
            timings.append({"stage": stage.name, "seconds": round(seconds, 3), "skipped": bool(summary.get("skipped"))})
            if timed:
                record_stage(run, stage.name, seconds, bool(summary.get("skipped")))
            echo(stage.format(summary))
            return_freed_memory()  # a later stage must not inherit this one's peak
    finally:
        if started_ray:
            ray.shutdown()
    return PipelineResult(stages=results, timings=timings, seconds=round(time.perf_counter() - started, 3))
