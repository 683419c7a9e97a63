"""The main job's orchestration and `cotrec report` (the real stages are tested in their own files;
`make demo` runs them all together)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cotrec import pipeline
from cotrec.config import load_config
from cotrec.extract.programs import PROGRAMS
from cotrec.extract.shards import write_shard
from cotrec.heap import return_freed_memory
from cotrec.pipeline import STAGE_NAMES, Stage, run_pipeline
from cotrec.reporting.stages import record_stage, stage_records, write_stages
from cotrec.retriever import retriever_grid
from retriever_data import FAST_RETRIEVER, fake_extraction, synthetic_run

DEMO = load_config("demo")


class FakeClock:
    """pipeline's time.perf_counter, moved on only by the stages: recorded times are exact."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_the_main_job_runs_every_stage_of_the_paper_in_order(tmp_path, monkeypatch):
    """`cotrec run` calls each stage's function once, in the paper's order (each reads what the
    ones before it wrote), and `until` stops after the named stage."""
    import dataclasses

    from cotrec.rundir import RunDir

    monkeypatch.setattr(pipeline, "ensure_ray", lambda **kw: False)
    calls = []

    def recorder(name):
        return lambda config, run, force: calls.append(name) or {"skipped": False}

    monkeypatch.setattr(pipeline, "STAGES", [dataclasses.replace(s, run=recorder(s.name), format=lambda s: "")
                                             for s in pipeline.STAGES])
    run_pipeline(DEMO, RunDir(tmp_path), echo=lambda s: None)  # the demo needs every stage
    paper = ["prepare", "items", "preferences", "embed", "retriever", "perceptions", "ranker", "report"]
    assert calls == paper
    calls.clear()
    run_pipeline(DEMO, RunDir(tmp_path), echo=lambda s: None, until="embed")
    assert calls == paper[:4]


def test_llm_stages_that_no_grid_reads_are_left_out():
    def unneeded(*overrides):
        config = load_config("demo", list(overrides))
        return {s.name for s in pipeline.STAGES if s.unneeded(config) is not None}

    llm_free = ("retriever.grid=[none/random,random/caption]", "ranker.retrievers={CRM: none/random}")
    assert unneeded(*llm_free, "ranker.grid=[none]") == {"items", "preferences", "perceptions"}
    assert unneeded(*llm_free, "ranker.grid=[none,llm+/zero-shot]") == {"items", "perceptions"}
    assert unneeded("retriever.grid=[none/description]", "ranker.retrievers={CRM: none/random}",
                    "ranker.grid=[llm]") == {"preferences", "perceptions"}
    assert unneeded(*llm_free, "ranker.grid=[llm++]") == set()
    assert unneeded("retriever.grid=[none/random]", "ranker.retrievers={CRM: none/random}",
                    "ranker.grid=[none]") == {"items", "preferences", "embed", "perceptions"}
    assert unneeded() == set()  # the demo runs every stage


def test_pipeline_orchestration_with_fake_stages_skips_and_keeps_the_working_time(tmp_path, monkeypatch):
    """FAKE stages (this test is about orchestration): order, recorded times, skipped reruns."""
    from cotrec.rundir import RunDir

    monkeypatch.setattr(pipeline, "ensure_ray", lambda **kw: False)
    calls = []

    def fake(name):
        def stage(config, run, force):
            calls.append(name)
            done = (run / f"{name}.done").exists() and not force
            (run / f"{name}.done").touch()
            return {"skipped": done, "name": name}
        return stage

    stages = [Stage(name, name, fake(name), lambda s: f"{s['name']} skipped={s['skipped']}") for name in ("a", "b")]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    lines: list[str] = []
    first = run_pipeline(DEMO, run, echo=lines.append)
    assert calls == ["a", "b"] and [t["stage"] for t in first["timings"]] == ["a", "b"]
    assert lines == ["== a ==", "a skipped=False", "== b ==", "b skipped=False"]
    recorded = stage_records(run)
    second = run_pipeline(DEMO, run, echo=lines.append)
    assert all(t["skipped"] for t in second["timings"])
    # a skipped rerun keeps the time of the run that did the work
    assert stage_records(run)["a"]["seconds"] == recorded["a"]["seconds"]
    assert "last_checked_at" in stage_records(run)["a"]
    run_pipeline(DEMO, run, force=True, echo=lines.append)
    assert "last_checked_at" not in stage_records(run)["a"]

    from contextlib import contextmanager

    around = []

    @contextmanager
    def measure(stage):  # what the scale bench samples CPU and memory in: each stage's own run
        around.append(("enter", stage, len(calls)))
        yield
        around.append(("exit", stage, len(calls)))

    run_pipeline(DEMO, run, echo=lines.append, measure=measure)
    n = len(calls)
    assert around == [("enter", "a", n - 2), ("exit", "a", n - 1), ("enter", "b", n - 1), ("exit", "b", n)]


def test_a_failing_stage_stops_the_job_and_later_stages_do_not_run(tmp_path, monkeypatch):
    """FAKE stages (orchestration): an error propagates, nothing after it runs."""
    from cotrec.errors import DataError
    from cotrec.rundir import RunDir

    monkeypatch.setattr(pipeline, "ensure_ray", lambda **kw: False)
    monkeypatch.setattr(pipeline, "time", clock := FakeClock())
    ran = []

    def broken(config, run, force):
        clock.now += 2.5  # the attempt's working time before it fails
        raise DataError("x.parquet: broken")

    stages = [Stage("a", "a", broken, str), Stage("b", "b", lambda c, r, f: ran.append("b") or {}, str)]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    with pytest.raises(DataError, match="x.parquet"):
        run_pipeline(DEMO, RunDir(tmp_path), echo=lambda s: None)
    assert ran == []
    # the failed attempt is kept as interrupted time, not as a finished stage
    assert "seconds" not in stage_records(RunDir(tmp_path))["a"]
    assert stage_records(RunDir(tmp_path))["a"]["interrupted_seconds"] == 2.5


def test_a_stage_killed_and_resumed_records_the_time_of_both_attempts(tmp_path, monkeypatch):
    """FAKE stages (orchestration): the time before a kill counts towards the stage that resumes."""
    from cotrec.rundir import RunDir

    monkeypatch.setattr(pipeline, "ensure_ray", lambda **kw: False)
    monkeypatch.setattr(pipeline, "time", clock := FakeClock())
    run = RunDir(tmp_path)

    def killed(config, run, force):
        clock.now += 0.2
        raise KeyboardInterrupt

    def resumed(config, run, force):
        clock.now += 0.1
        return {"skipped": False}

    monkeypatch.setattr(pipeline, "STAGES", [Stage("items", "items", killed, str)])
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(DEMO, run, echo=lambda s: None)
    assert "(interrupted after 0.2" in write_stages(run, stage_records(run), {}, STAGE_NAMES).read_text()
    monkeypatch.setattr(pipeline, "STAGES", [Stage("items", "items", resumed, str)])
    run_pipeline(DEMO, run, echo=lambda s: None)
    record = stage_records(run)["items"]
    assert (record["seconds"], record["of_which_interrupted_seconds"]) == (0.3, 0.2)
    assert "interrupted_seconds" not in record
    assert "interrupted)" in write_stages(run, stage_records(run), {}, STAGE_NAMES).read_text()


def test_report_renders_table1_stage_times_and_tokens_from_the_run(tmp_path, cli):
    config, run = synthetic_run(tmp_path / "run", config_overrides=FAST_RETRIEVER + (
        "retriever.grid=[none/random,preference/caption]", "retriever.grid_seeds=2"))
    fake_extraction(run)
    # perceptions shards as the runner writes them (with their LLM usage)
    records = [{"user_idx": u, "horizon": "test", "item_idx": i, "review": "r", "key_terms": ["k"], "status": "ok",
                "calls": 2, "prompt_tokens": 100, "completion_tokens": 30, "created_at": 1.0}
               for u in range(5) for i in range(4)]
    records.append({**records[0], "status": "failed", "created_at": 2.0})  # a newer row of the same key wins
    (run / PROGRAMS["perceptions"].folder).mkdir(parents=True)
    write_shard(run / PROGRAMS["perceptions"].folder, records, PROGRAMS["perceptions"].schema)
    grid = retriever_grid(config, run)
    record_stage(run, "retriever", grid["seconds"], False)
    out = cli("report", "--config", str(run / "config.yaml"), "--run-dir", str(run.root))
    assert out.returncode == 0, out.stderr
    assert "none/random" in out.stdout and "preference/caption" in out.stdout and "missing: Table 2" in out.stdout
    reports = run.root / "reports"
    table1 = (reports / "table1.md").read_text()
    assert "| None | Random |" in table1 and "| Preference | Caption |" in table1 and "2 seed(s)" in table1
    assert (reports / "table1.png").is_file() and (reports / "stages.png").is_file()  # drawn: the test below
    stages = (reports / "stages.md").read_text()
    assert "| perceptions | - | 20 | 40 | 2,000 | 600 | 1 |" in stages, stages
    assert f"| retriever | {grid['seconds']:.1f} |" in stages
    summary = (reports / "summary.md").read_text()
    assert "## Table 1" in summary and "![table1.png](table1.png)" in summary and "Not yet available" in summary
    assert json.loads((reports / "stages.json").read_text())["retriever"]["skipped"] is False


def test_the_report_plots_draw_table1_and_the_stage_times(tmp_path, monkeypatch):
    """The figures carry the table's numbers: a bar per variant and metric, a bar per stage with its
    generated tokens."""
    from cotrec.reporting import plots
    from cotrec.rundir import RunDir

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.setdefault(path.name, fig) and path)
    rows = [{"variant": "none/random", "hit@10": 0.20, "hit@10_std": 0.01, "ndcg@10": 0.10, "ndcg@10_std": 0.02},
            {"variant": "preference/caption", "hit@10": 0.30, "hit@10_std": 0.0, "ndcg@10": 0.15, "ndcg@10_std": 0.0}]
    plots.plot_table1(RunDir(tmp_path), rows)
    (ax,) = drawn["table1.png"].axes
    assert [round(bar.get_height(), 6) for bar in ax.patches] == [0.20, 0.30, 0.10, 0.15]  # Hit@10, then NDCG@10
    assert [label.get_text() for label in ax.get_xticklabels()] == ["none/random", "preference/caption"]
    plots.plot_stages(RunDir(tmp_path), {"prepare": 2.0, "items": 40.0}, {"items": 1234})
    (ax,) = drawn["stages.png"].axes
    assert {label.get_text(): bar.get_width() for label, bar in zip(ax.get_yticklabels(), ax.patches)} == \
        {"prepare": 2.0, "items": 40.0}
    assert [text.get_text() for text in ax.texts] == ["1,234 gen tok"]


def test_report_of_an_unprepared_run_is_a_one_line_error(tmp_path, cli):
    out = cli("report", "--run-dir", str(tmp_path / "nothing"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no data/" in out.stderr


def _private_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))


def test_the_memory_a_large_parquet_read_freed_goes_back_to_the_system(tmp_path):
    # The driver reads the interactions between stages and then runs for hours: what Arrow's pool
    # and glibc's heap keep free after the read must not stay in its RSS.
    path = tmp_path / "big.parquet"
    pd.DataFrame({"a": np.arange(20_000_000), "b": np.arange(20_000_000)}).to_parquet(path)
    return_freed_memory()
    kept = pd.read_parquet(path, columns=["a"])["a"].to_numpy()[:10].copy()
    before = _private_mb()
    return_freed_memory()
    assert before - _private_mb() > 50
    assert kept.tolist() == list(range(10))
