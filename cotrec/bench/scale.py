"""The main job at scale (`cotrec bench scale --users 10000,100000,1000000`): orchestration cost.

Each size is a fresh `cotrec run` on SYNTHETIC MovieLens-shaped data (`data.source: synthetic`)
with the zero-latency engine and the zero-cost encoder, so what is measured is the system's own
work per user (data movement, Ray Data, Ray Train, the driver), never a model's. Per stage: wall
time, users/s, CPU-seconds per user in the driver and in the Ray processes, the driver's peak RSS
and the largest Ray process's. The JSON is rewritten after every size, so a long run keeps what it
measured; the plot shows CPU-seconds per user against users, one line per stage: flat is linear.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cotrec.bench.common import load_average, machine, rate, stamp
from cotrec.bench.extract_scale import SCALE_SETTINGS
from cotrec.bench.memory import MemorySampler
from cotrec.config import Config, load_config
from cotrec.progress import log
from cotrec.rundir import RunDir, read_stats, write_json

# The main job cut to what scales with users (the issue's cut): Table 1's baseline and CRM++, one
# epoch each, trained at once, the retriever-only ranker row; whole histories (no window cap), 20k
# items. The retriever trains as a large catalogue would (sampled softmax, sparse user-table
# updates); disjoint windows and few negatives keep SASRec's own arithmetic, which is not what this
# bench measures, to a share a 2-core machine finishes at a million users.
SCALE_JOB = {
    "data.source": "synthetic", "data.synthetic.items": 20_000, "llm.backend": "zero-latency",
    "embed.model": "zero-cost", "extract.max_windows": None, **SCALE_SETTINGS,
    "retriever.grid": ["none/random", "preference/description"], "retriever.grid_seeds": 1,
    "retriever.max_epochs": 1, "retriever.concurrent_trainings": 2, "retriever.loss": "sampled",
    "retriever.negatives": 256, "retriever.train_stride": 32, "retriever.sparse_user_updates": True,
    "ranker.retrievers": {"CRM++": "preference/description"}, "ranker.grid": ["none"],
}


def scale_job_config(base: str, users: int, overrides: list[str]) -> Config:
    settings = {**SCALE_JOB, "data.synthetic.users": users}
    return load_config(base, [f"{k}={json.dumps(v)}" for k, v in settings.items()] + list(overrides))


@contextmanager
def _measured(stage: str, into: dict[str, Any]) -> Iterator[None]:
    started = time.perf_counter()
    with MemorySampler(interval=0.5) as sampler:
        yield
    cpu = sampler.cpu_seconds()
    into[stage] = {"wall_s": round(time.perf_counter() - started, 3),
                   "driver_cpu_s": cpu.get("driver", 0.0),
                   "workers_cpu_s": round(cpu["total"] - cpu.get("driver", 0.0), 2),
                   "driver_peak_rss_mb": sampler.peak["driver_rss_mb"],
                   "driver_peak_private_mb": sampler.peak["driver_private_mb"],
                   "largest_worker_peak_rss_mb": sampler.peak["largest_process_rss_mb"]}


def bench_scale(base: str, sizes: list[int], overrides: list[str], out: Path, run_root: Path,
                keep: bool = False, until: str | None = None) -> dict[str, Any]:
    """The job at each size (every stage, or up to `until`), measured per stage."""
    from cotrec.pipeline import run_pipeline, stages_until

    stages_until(until)  # an unknown stage fails here, before any size runs
    report: dict[str, Any] = {**stamp("scale", 1), "machine": machine(), "base_config": base, "job": SCALE_JOB,
                              "overrides": overrides, "until": until, "sizes": []}
    for users in sizes:
        config = scale_job_config(base, users, overrides)
        run = RunDir(run_root / f"users-{users}")
        shutil.rmtree(run.root, ignore_errors=True)
        run.write_config(config)
        log(f"bench scale: {users:,} users -> {run.root}")
        stages: dict[str, Any] = {}
        started, load = time.perf_counter(), load_average()
        result = run_pipeline(config, run, echo=lambda line: None,
                              measure=lambda stage: _measured(stage, stages), until=until)
        kept = read_stats(run)["users"]  # after the k-core filter
        for name, record in stages.items():
            record["users_per_s"] = rate(kept, record["wall_s"])
            record["driver_cpu_s_per_user"] = round(record["driver_cpu_s"] / kept, 9)
            record["workers_cpu_s_per_user"] = round(record["workers_cpu_s"] / kept, 9)
        report["sizes"].append({"users_generated": users, "users": kept, "stats": read_stats(run),
                                "wall_s": round(time.perf_counter() - started, 3), "load_average_before": load,
                                "load_average_after": load_average(), "stages": stages,
                                "skipped": [t["stage"] for t in result["timings"] if t.get("skipped")]})
        write_json(out, report)
        plot_scale(report, out.with_suffix(".png"))
        if not keep:
            shutil.rmtree(run.root, ignore_errors=True)
    return report


def plot_scale(report: dict[str, Any], path: Path) -> Path:
    from cotrec.reporting.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    names = list(dict.fromkeys(n for size in report["sizes"] for n in size["stages"]))
    for name in names:
        points = [(s["users"], s["stages"][name]) for s in report["sizes"] if name in s["stages"]]
        xs = [p[0] for p in points]
        axes[0].plot(xs, [1e3 * p[1]["driver_cpu_s_per_user"] for p in points], marker="o", label=name)
        axes[1].plot(xs, [1e3 * p[1]["workers_cpu_s_per_user"] for p in points], marker="o", label=name)
    for ax, title in zip(axes, ("driver", "Ray workers")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("users")
        ax.set_ylabel("CPU ms per user")
        ax.set_title(f"{title}: CPU per user (flat = linear cost)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"{'users':>9} {'stage':<12} {'wall s':>8} {'users/s':>10} {'driver ms/user':>15} "
             f"{'workers ms/user':>16} {'driver MB':>10} {'private MB':>10} {'worker MB':>10}"]
    for size in report["sizes"]:
        for name, r in size["stages"].items():
            lines.append(f"{size['users']:>9,} {name:<12} {r['wall_s']:>8.1f} {r['users_per_s']:>10,.0f} "
                         f"{1e3 * r['driver_cpu_s_per_user']:>15.3f} {1e3 * r['workers_cpu_s_per_user']:>16.3f} "
                         f"{r['driver_peak_rss_mb']:>10,.0f} {r.get('driver_peak_private_mb', float('nan')):>10,.0f} "
                         f"{r['largest_worker_peak_rss_mb']:>10,.0f}")
    return "\n".join(lines)
