"""`cotrec bench extract`: the extraction runner against its ceiling and against the alternatives.

Each part is one benchmark in its own module, measured in one run on one machine, with every
setting written to the JSON (docs/benchmarks.md explains each figure):

- `users`, `ceiling`, `naive` (`extract_job`): the users job against the engine's batch ceiling
  and against one user at a time;
- `waves`, `stages` (`extract_designs`): the stage-per-step design against the per-row programs,
  in-process and on Ray Data;
- `scale` (`extract_scale`): a million synthetic users of orchestration on the zero-latency engine.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from cotrec.bench.common import machine, ratio, stamp
from cotrec.bench.extract_designs import measure_stages_on_ray_data, measure_waves_and_async
from cotrec.bench.extract_job import measure_ceiling, measure_naive, measure_users_job, temp_run
from cotrec.bench.extract_scale import measure_scale
from cotrec.config import Config, load_config
from cotrec.errors import CotrecError
from cotrec.extract.prompts import domain_of, short_term_interest
from cotrec.llm import make_engine
from cotrec.llm.base import SamplingSettings
from cotrec.rundir import RunDir, write_json

PARTS = ("users", "ceiling", "naive", "waves", "stages", "scale")
DEFAULT_OUT = "bench/extract.json"

# Sized so that every part together runs in about a quarter of an hour on a 2-core CPU with the
# embedded model. The user's --set overrides win.
BENCH_DEFAULTS = ["extract.max_windows=2"]  # the users job / ceiling / naive: 5 LLM calls per user
DEFAULT_USERS = 48  # the users job (and the ceiling's request count comes from it)
DEFAULT_NAIVE_USERS = 4
# waves / stages: every user of the run (None) over their whole history (0: no window cap), so the
# designs meet the real skew of history lengths.
DEFAULT_WAVES_USERS = None
DEFAULT_WAVES_MAX_WINDOWS = 0
DEFAULT_SCALE_USERS = 1_000_000


def bench_config(spec: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config the bench runs with: the bench's defaults, then the user's --set overrides."""
    return load_config(spec, [*BENCH_DEFAULTS, *overrides])


def bench_extract(config: Config, run: RunDir, out: str | Path = DEFAULT_OUT, parts: tuple[str, ...] = PARTS,
                  users: int = DEFAULT_USERS, naive_users: int = DEFAULT_NAIVE_USERS,
                  waves_users: int | None = DEFAULT_WAVES_USERS, waves_max_windows: int | None = DEFAULT_WAVES_MAX_WINDOWS,
                  scale_users: int = DEFAULT_SCALE_USERS, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise CotrecError(f"--parts: unknown part {unknown[0]!r} (parts: {', '.join(PARTS)})")
    if "ceiling" in parts and "users" not in parts:
        raise CotrecError("--parts: ceiling needs users in the same run (it mirrors the job's requests)")
    if naive_users > users and "users" in parts and "naive" in parts:
        raise CotrecError(f"--naive-users ({naive_users}) must not exceed --users ({users}): naive runs the job's first users")
    bench_started = time.perf_counter()
    waves_max_windows = waves_max_windows or None  # 0: no cap
    waves_config = config.model_copy(update={"extract": config.extract.model_copy(
        update={"max_windows": waves_max_windows})})
    report: dict[str, Any] = {
        **stamp("extract", 1), "machine": machine(), "parts": list(parts),
        "settings": {"config_overrides": [*BENCH_DEFAULTS, *overrides], "model": config.llm.model,
                     "llm": config.llm.model_dump(mode="json"), "extract": config.extract.model_dump(mode="json"),
                     "users": users, "naive_users": naive_users, "waves_users": waves_users,
                     "waves_max_windows": waves_max_windows, "scale_users": scale_users,
                     "run_dir": str(run.root)},
        "notes": [],
    }
    notes = report["notes"]
    needs_data = any(p in parts for p in ("users", "naive", "waves", "stages"))
    if "scale" in parts:  # first: before vLLM and torch load into this process (the driver's RSS is its own)
        report["scale"] = measure_scale(config, scale_users)
    tmp = temp_run(config, run) if needs_data else None
    try:
        if "users" in parts:
            report["users_job"] = measure_users_job(config, tmp, users)
        if "ceiling" in parts or "waves" in parts:
            llm = config.llm.model_copy(update={"backend": "vllm"})
            started = time.perf_counter()
            engine = make_engine(llm)
            report["bench_engine_load_s"] = round(time.perf_counter() - started, 2)
            try:
                engine.chat_sync([short_term_interest(domain_of("movie"), ["Toy Story (1995)"])],
                                 SamplingSettings(max_tokens=8))  # warm-up
                if "ceiling" in parts:
                    job = report["users_job"]
                    report["ceiling"] = measure_ceiling(
                        engine, config, job["calls"], round(job["mean_prompt_tokens"]),
                        max(1, round(job["mean_completion_tokens"])))
                    report["job_over_ceiling"] = ratio(job["generated_tokens_per_s"],
                                                        report["ceiling"]["generated_tokens_per_s"])
                    report["job_over_ceiling_while_rows_ran"] = ratio(
                        job["generated_tokens_per_s_while_rows_ran"], report["ceiling"]["generated_tokens_per_s"])
                if "waves" in parts:
                    report["waves"], report["async"] = measure_waves_and_async(engine, waves_config, tmp, waves_users)
                    report["async_over_waves"] = ratio(report["waves"]["seconds"], report["async"]["seconds"])
                    report["async_over_waves_tokens_per_s"] = ratio(
                        report["async"]["generated_tokens_per_s"], report["waves"]["generated_tokens_per_s"])
            finally:
                engine.close()
        if "naive" in parts:
            report["naive"] = measure_naive(config, tmp, naive_users)
            if "users_job" in report:
                job, naive = report["users_job"], report["naive"]
                report["job_over_naive_users_per_s"] = ratio(job["users_per_s"], naive["users_per_s"])
                report["job_over_naive_tokens_per_s"] = ratio(job["generated_tokens_per_s"],
                                                               naive["generated_tokens_per_s"])
            if "ceiling" in report:  # the most any scheduling on this engine could give over naive
                report["ceiling_over_naive_tokens_per_s"] = ratio(report["ceiling"]["generated_tokens_per_s"],
                                                                   report["naive"]["generated_tokens_per_s"])
        if "stages" in parts:  # last of the LLM parts: no other engine may be alive (one fits at a time)
            report["stages_ray_data"], report["async_ray_data"] = measure_stages_on_ray_data(waves_config, tmp,
                                                                                             waves_users)
            report["async_over_stages_ray_data"] = ratio(report["stages_ray_data"]["seconds"],
                                                         report["async_ray_data"]["seconds"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp.root, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - bench_started, 1)
    notes += bench_notes(report)
    write_json(Path(out), report)
    return report


def bench_notes(report: dict[str, Any]) -> list[str]:
    """What a reader needs to read the figures right (the rest is in docs/benchmarks.md)."""
    notes = []
    if (report.get("ceiling_over_naive_tokens_per_s") or 10) < 10:  # absent or None: nothing to explain
        notes.append(f"job / naive is bounded by the engines on this machine: even the ceiling (every request at once) "
                     f"generates only {report['ceiling_over_naive_tokens_per_s']:.1f}x the tokens/s of one-call-at-a-time "
                     "transformers, so no scheduling of these calls can reach 10x here.")
    cores = report["machine"]["cpus"] or 1
    loads = [v for part in ("users_job", "ceiling", "naive", "scale") for k, v in report.get(part, {}).items()
             if k.startswith("load_avg")]
    if any(load[0] > cores + 0.5 for load in loads):
        notes.append(f"the 1-minute load average exceeded {cores + 0.5:g} on this {cores}-core machine during some "
                     "part: other work shared the cores, so those figures are pessimistic.")
    return notes


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"{'part':<12}{'users':>9}{'seconds':>10}{'users/s':>11}{'gen tok/s':>11}  notes"]

    def cell(value: float | None) -> str:
        if value is None:
            return f"{'-':>11}"
        return f"{value:>11,.1f}" if value >= 10 else f"{value:>11.3f}"

    def row(name: str, part: dict[str, Any], seconds_key: str, extra: str = "") -> None:
        lines.append(f"{name:<12}{part.get('users', part.get('requests', 0)):>9,}{part[seconds_key]:>10.1f}"
                     f"{cell(part.get('users_per_s'))}{part.get('generated_tokens_per_s', 0):>11.1f}  {extra}")

    if "users_job" in report:
        job = report["users_job"]
        row("users job", job, "seconds_after_load", f"{job['calls']} calls, engine load {job['engine_load_s']:.0f} s")
    if "ceiling" in report:
        c = report["ceiling"]
        row("ceiling", c, "seconds", f"{c['requests']} requests x {c['prompt_tokens_each']}+{c['completion_tokens_each']} tokens")
    if "naive" in report:
        row("naive", report["naive"], "seconds", "transformers, one call at a time")
    if "waves" in report:
        row("waves", report["waves"], "seconds", f"{report['waves']['barriers']} barriers")
        row("async", report["async"], "seconds", f"in_flight {report['async']['in_flight']}")
    if "stages_ray_data" in report:
        st = report["stages_ray_data"]
        row("stages", st, "seconds", f"Ray Data: {st['stages']} stages, engine loads {st['engine_load_s']:.0f} s")
        row("async job", report["async_ray_data"], "seconds", "Ray Data: the users job, engine load "
                                                              f"{report['async_ray_data']['engine_load_s']:.0f} s")
    if "scale" in report:
        s = report["scale"]
        row("scale", s, "runner_seconds", f"zero-latency; steady {s.get('steady_users_per_s', 0):,.0f} users/s; "
                                          f"peak RSS {s['peak_memory_mb']['total_rss_mb']:,.0f} MB")
    for key, label in (("job_over_ceiling", "users job / ceiling gen tok/s"),
                       ("job_over_ceiling_while_rows_ran", "  the same, while rows ran"),
                       ("job_over_naive_users_per_s", "users job / naive users/s"),
                       ("job_over_naive_tokens_per_s", "users job / naive gen tok/s"),
                       ("ceiling_over_naive_tokens_per_s", "ceiling / naive gen tok/s"),
                       ("async_over_waves", "async / waves (wall time)"),
                       ("async_over_stages_ray_data", "async job / stages (wall time)")):
        if report.get(key) is not None:
            lines.append(f"{label:<32}{report[key]:.2f}x")
    lines.append(f"bench wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)
