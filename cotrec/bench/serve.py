"""`cotrec bench serve`: latency, throughput and autoscaling of the Ray Serve app under load.

The app of `serve/app.py` (Retriever -> Ranker behind the FastAPI Ingress) is deployed locally
with `cotrec.serving.start_app` on a free port, warmed up (a few requests of each kind, not
counted), then loaded level by level: for each concurrency, (a) retrieval only (`rerank: false`)
and (b) retrieval + LLM re-ranking (`rerank: true`), `POST /recommend` for seeded random known
users (`horizon: next`, k = 10) with exactly that many requests in flight (asyncio + aiohttp, a
semaphore). Each request's latency is taken at the client; the server's own per-stage figures
(`latency.retrieve_ms`, `rerank_ms`, `total_ms`) come from the replies.

Autoscaling: while the load runs, a thread samples `serve.status()` every 0.5 s and records the
RUNNING replicas of each deployment. Serve upscales only after a deployment's averaged ongoing
requests stay above its `target_ongoing_requests` for `upscale_delay_s` (`serve/app.py`'s
DEPLOYMENTS), so the retrieval-only level at the highest concurrency keeps sending
requests for at least `--sustain` seconds (default: the longest upscale delay of the deployments
that can scale, plus 15 s). When no replica count rose, the notes say so with the measured length.

The load generator runs on the same machine as the app: on a small machine it takes CPU from the
replicas, and the figures are those of the pair.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd
import ray
from ray import serve

from cotrec.bench.common import load_average, machine, rate
from cotrec.cluster import ensure_ray
from cotrec.config import Config, parse_ranker
from cotrec.errors import CotrecError, DataError
from cotrec.progress import log
from cotrec.ranker.stage import merged_model, ranker_folder
from cotrec.recommend import run_config
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, write_json
from cotrec.serving import APP_NAME, free_port, start_app, stop_app

DEFAULT_OUT = "bench/serve.json"
DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_REQUESTS = 200
DEFAULT_RERANK_REQUESTS = 40
DEPLOYMENTS = ("Retriever", "Ranker", "Ingress")
K = 10
SEED = 0
SAMPLE_INTERVAL_S = 0.5
WARMUP = {"retrieve": 4, "rerank": 2}  # requests of each kind before timing, 2 in flight
SUSTAIN_MARGIN_S = 15.0  # beyond the upscale delay: the averaged load must first exceed the target
MIN_SUSTAIN_S = 15.0
REQUEST_TIMEOUT_S = 600.0
RAY_DEFAULT_UPSCALE_DELAY_S = 30.0


# -- inputs ------------------------------------------------------------------------------------
def check_run(run: RunDir, variant: str, ranker: str) -> tuple[Config, list[str]]:
    """The run's config and raw user ids, after checking what the app will load (one-line errors,
    before Ray starts)."""
    if not run.root.is_dir():
        raise DataError(f"{run.root}: no such run directory")
    config = run_config(run)
    user, item = parse_variant(variant)
    folder = Path(run / variant_dir(config, user, item, config.seed))
    if not (folder / "model.pt").is_file():
        raise DataError(f"{folder}: no trained retriever (model.pt); run `cotrec retriever train "
                        f"--variant {user}/{item}` first")
    try:
        prompt, fine_tuned = parse_ranker(ranker)
    except ValueError as exc:
        raise CotrecError(str(exc)) from None
    if fine_tuned and not merged_model(config, run, variant, prompt).is_dir():
        raise DataError(f"{run / ranker_folder(variant, prompt)}: no fine-tuned ranker; run `cotrec ranker train "
                        f"--retriever {variant} --prompt {prompt}` first, or use --ranker {prompt}/zero-shot")
    users = Path(run / "data" / "users.parquet")
    if not users.is_file():
        raise DataError(f"{users}: no prepared users; run `cotrec prepare` first")
    ids = pd.read_parquet(users, columns=["user_id"])["user_id"].astype(str).tolist()
    if not ids:
        raise DataError(f"{users}: no users")
    return config, ids


def user_stream(user_ids: list[str], seed: tuple[int, ...]) -> Iterator[str]:
    """Seeded uniform draws of known users, without end."""
    rng = np.random.default_rng(list(seed))
    while True:
        for i in rng.integers(len(user_ids), size=256):
            yield user_ids[int(i)]


# -- Serve's view ------------------------------------------------------------------------------
def deployed_autoscaling() -> dict[str, dict[str, Any]]:
    """Each deployment's autoscaling and load settings as the app deploys them (serve/app.py)."""
    from serve.app import DEPLOYMENTS  # importable once start_app has put the repository on the path

    keys = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
    return {name: {**{k: d["autoscaling_config"].get(k) for k in keys},
                   "max_ongoing_requests": d["max_ongoing_requests"], "max_queued_requests": d["max_queued_requests"]}
            for name, d in DEPLOYMENTS.items()}


class ReplicaSampler:
    """RUNNING replicas per deployment from `serve.status()` every `interval` seconds, in a thread
    (not on the event loop that sends the load). Times are seconds since `t0` (perf_counter)."""

    def __init__(self, t0: float, interval: float = SAMPLE_INTERVAL_S):
        self.t0, self.interval = t0, interval
        self.timeline: list[list[Any]] = []  # [t, {"Retriever": n, "Ranker": n, "Ingress": n}]
        self.other_states: list[list[Any]] = []  # [t, deployment, {state: n}] when a replica is not RUNNING
        self.errors = 0
        self.last_error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replica-sampler", daemon=True)

    def sample(self) -> None:
        t = time.perf_counter() - self.t0
        try:
            app = serve.status().applications[APP_NAME]
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            return
        counts = {}
        for name in DEPLOYMENTS:
            deployment = app.deployments.get(name)
            states = {str(getattr(s, "value", s)): int(n) for s, n in (deployment.replica_states if deployment else {}).items()}
            counts[name] = states.get("RUNNING", 0)
            others = {s: n for s, n in states.items() if s != "RUNNING" and n}
            if others:
                self.other_states.append([round(t, 2), name, others])
        self.timeline.append([round(t, 2), counts])

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - started)))

    def __enter__(self) -> "ReplicaSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def window(self, start: float, end: float) -> dict[str, dict[str, int]]:
        """Min and max RUNNING replicas of each deployment over the samples in [start, end]."""
        samples = [c for t, c in self.timeline if start <= t <= end]
        if not samples:  # a level shorter than the interval: the nearest sample
            before = [c for t, c in self.timeline if t <= end]
            samples = before[-1:] or self.timeline[:1]
        return {"min": {n: min(s[n] for s in samples) for n in DEPLOYMENTS} if samples else {},
                "max": {n: max(s[n] for s in samples) for n in DEPLOYMENTS} if samples else {}}


# -- the load ----------------------------------------------------------------------------------
async def send_level(client: Any, users: Iterator[str], rerank: bool, concurrency: int, count: int,
                     min_seconds: float = 0.0) -> tuple[list[dict[str, Any]], float, float]:
    """`count` requests (and, with `min_seconds`, more until that long has passed) with `concurrency`
    in flight; returns one record per request and the level's start and end (perf_counter)."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    records: list[dict[str, Any]] = []
    tasks: set[asyncio.Task] = set()

    async def one(user: str) -> None:
        record: dict[str, Any] = {"user_id": user}
        started = time.perf_counter()
        try:
            async with client.post("/recommend", json={"user_id": user, "k": K, "rerank": rerank,
                                                       "horizon": "next"}) as reply:
                body = await reply.read()
            record["latency_ms"] = (time.perf_counter() - started) * 1e3
            record["status"] = reply.status
            if reply.status == 200:
                record.update({k: float(v) for k, v in json.loads(body).get("latency", {}).items()})
            else:
                record["detail"] = body[:200].decode(errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # transport errors, timeouts, not JSON
            record["latency_ms"] = (time.perf_counter() - started) * 1e3
            record["exception"] = type(exc).__name__
            record["detail"] = str(exc)[:200]
        finally:
            gate.release()
        records.append(record)

    started = time.perf_counter()
    sent = 0
    while sent < count or time.perf_counter() - started < min_seconds:
        await gate.acquire()
        task = asyncio.create_task(one(next(users)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.gather(*tasks)
    return records, started, time.perf_counter()


def _percentiles(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, Optional[float]]:
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in qs}


def summarize(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == 200]
    codes = Counter(str(r["status"]) for r in records if "status" in r)
    exceptions = Counter(r["exception"] for r in records if "exception" in r)
    latency = [r["latency_ms"] for r in ok]
    server = {}
    for key in ("retrieve_ms", "rerank_ms", "total_ms"):
        values = [r[key] for r in ok if key in r]
        if values:
            server[key] = {**_percentiles(values, (50, 95)), "mean": round(float(np.mean(values)), 2)}
    summary = {
        "requests": len(records), "ok": len(ok), "seconds": round(seconds, 3),
        "requests_per_s": rate(len(records), seconds), "ok_per_s": rate(len(ok), seconds),
        "latency_ms": {**_percentiles(latency), "mean": round(float(np.mean(latency)), 2) if latency else None,
                       "max": round(float(np.max(latency)), 2) if latency else None},
        "server_ms": server,
        "errors": {"4xx": sum(n for c, n in codes.items() if c.startswith("4")),
                   "5xx": sum(n for c, n in codes.items() if c.startswith("5")),
                   "exceptions": sum(exceptions.values())},
        "status_codes": dict(sorted(codes.items())),
    }
    if exceptions:
        summary["exception_types"] = dict(exceptions)
    failed = next((r for r in records if r.get("status") != 200), None)
    if failed is not None:
        summary["first_error"] = {k: failed.get(k) for k in ("user_id", "status", "exception", "detail") if k in failed}
    return summary


async def warm_up(client: Any, user_ids: list[str], rerank: bool) -> dict[str, Any]:
    users = user_stream(user_ids, (SEED, 99))
    figures = {}
    for mode, count in WARMUP.items():
        if mode == "rerank" and not rerank:
            continue
        records, started, ended = await send_level(client, users, mode == "rerank", 2, count)
        bad = [r for r in records if r.get("status") != 200]
        if bad:
            r = bad[0]
            raise CotrecError(f"bench serve: warm-up {mode} request for user {r['user_id']} failed: "
                              f"{r.get('status') or r.get('exception')} {r.get('detail', '')}")
        figures[mode] = {"requests": count, "seconds": round(ended - started, 3)}
    return figures


async def run_load(url: str, user_ids: list[str], levels: list[dict[str, Any]],
                   rerank: bool) -> tuple[dict[str, Any], list[dict[str, Any]], ReplicaSampler]:
    """Warm-up, then every level in order; the sampler's clock starts when the first level does."""
    import aiohttp  # Serve's own HTTP client library: as load generator it leaves the replicas more of the cores than httpx

    top = max(level["concurrency"] for level in levels)
    connector = aiohttp.TCPConnector(limit=top + 8)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as client:
        log("bench serve: warm-up")
        warmup = await warm_up(client, user_ids, rerank)
        results = []
        sampler_t0 = time.perf_counter()
        with ReplicaSampler(sampler_t0) as sampler:
            for i, level in enumerate(levels):
                mode, c = level["mode"], level["concurrency"]
                users = user_stream(user_ids, (SEED, i, c, int(mode == "rerank")))
                log(f"bench serve: {mode} at concurrency {c}: {level['count']} requests"
                    + (f", at least {level['min_seconds']:.0f} s" if level["min_seconds"] else ""))
                load_before = load_average()
                records, started, ended = await send_level(client, users, mode == "rerank", c, level["count"],
                                                           level["min_seconds"])
                row = {"mode": mode, "concurrency": c, **summarize(records, ended - started),
                       "window_s": [round(started - sampler_t0, 2), round(ended - sampler_t0, 2)],
                       "sustained_s": level["min_seconds"] or None,
                       "load_avg_before": load_before, "load_avg_after": load_average()}
                results.append(row)
                log(f"bench serve: {mode} c={c}: {row['requests_per_s']:.1f} req/s, p50 "
                    f"{row['latency_ms']['p50']} ms, errors {row['errors']}")
            sampler.sample()  # the state at the end of the load
        for row in results:
            seen = sampler.window(*row["window_s"])
            row["replicas_min"], row["replicas_max"] = seen["min"], seen["max"]
    return warmup, results, sampler


# -- the report --------------------------------------------------------------------------------
def autoscaling_report(sampler: ReplicaSampler, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    per = {}
    for name in DEPLOYMENTS:
        counts = [c[name] for _, c in sampler.timeline]
        cfg = settings.get(name, {})
        lowest = cfg.get("min_replicas")
        observed_max = max(counts) if counts else None
        rose_at = next((t for t, c in sampler.timeline if lowest is not None and c[name] > lowest), None)
        per[name] = {"min_replicas": lowest, "max_replicas": cfg.get("max_replicas"),
                     "target_ongoing_requests": cfg.get("target_ongoing_requests"),
                     "upscale_delay_s": cfg.get("upscale_delay_s"), "look_back_period_s": cfg.get("look_back_period_s"),
                     "observed_min": min(counts) if counts else None, "observed_max": observed_max,
                     "rose_above_min": bool(lowest is not None and observed_max is not None and observed_max > lowest),
                     "first_above_min_at_s": rose_at}
    return {"sample_interval_s": sampler.interval, "samples": len(sampler.timeline), "sample_errors": sampler.errors,
            **({"last_sample_error": sampler.last_error} if sampler.last_error else {}),
            "per_deployment": per, "any_rose_above_min": any(p["rose_above_min"] for p in per.values()),
            "not_running_states_seen": sampler.other_states, "timeline": sampler.timeline}


def sustain_default(settings: dict[str, dict[str, Any]]) -> float:
    """The longest upscale delay among the deployments that can scale, plus a margin."""
    delays = [cfg.get("upscale_delay_s") if cfg.get("upscale_delay_s") is not None else RAY_DEFAULT_UPSCALE_DELAY_S
              for cfg in settings.values() if (cfg.get("max_replicas") or 0) > (cfg.get("min_replicas") or 0)]
    return max(MIN_SUSTAIN_S, (max(delays) if delays else RAY_DEFAULT_UPSCALE_DELAY_S) + SUSTAIN_MARGIN_S)


def bench_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    auto = report["autoscaling"]
    per = auto["per_deployment"]
    levels = report["levels"]
    longest = max(levels, key=lambda r: r["seconds"]) if levels else None
    fixed = [n for n, p in per.items() if p["min_replicas"] is not None and p["min_replicas"] == p["max_replicas"]]
    if fixed:
        notes.append(f"{', '.join(fixed)}: min_replicas == max_replicas ({', '.join(str(per[n]['max_replicas']) for n in fixed)}) "
                     "in serve/app.py, so it cannot scale here.")
    if not auto["any_rose_above_min"] and longest is not None:
        top = max(r["concurrency"] for r in levels)
        why = []
        for n in (n for n in per if n not in fixed):
            p = per[n]
            target, delay = p["target_ongoing_requests"], p["upscale_delay_s"]
            if target is not None and p["min_replicas"] and top <= target * p["min_replicas"]:
                # every client request is at most one request in flight at each deployment
                why.append(f"{n}: the highest concurrency ({top}) cannot exceed its target_ongoing_requests "
                           f"({target:g} per replica) at any duration")
            elif delay is not None and longest["seconds"] < delay:
                why.append(f"{n}: the level was shorter than its upscale_delay_s ({delay:g} s)")
            else:
                why.append(f"{n}: its ongoing requests averaged over look_back_period_s "
                           f"({p['look_back_period_s']}) s stayed at or below target_ongoing_requests ({target}) "
                           f"for upscale_delay_s ({delay} s)")
        notes.append(f"no deployment rose above its min_replicas: the longest level ({longest['mode']} at concurrency "
                     f"{longest['concurrency']}) ran {longest['seconds']:.1f} s ({longest['requests']} requests). "
                     "Serve upscales a deployment only after its averaged ongoing requests per replica stay above "
                     "target_ongoing_requests for upscale_delay_s (serve/app.py's DEPLOYMENTS). "
                     + "; ".join(why) + ".")
    for name, p in per.items():
        if p["rose_above_min"]:
            notes.append(f"{name} rose from {p['min_replicas']} to {p['observed_max']} RUNNING replicas "
                         f"(first seen {p['first_above_min_at_s']:.1f} s into the load).")
    if report["config"]["ranker"] == "none":
        notes.append("ranker none: the re-ranking levels were skipped.")
    errors = [r for r in levels if sum(r["errors"].values())]
    if errors:
        notes.append("errors: " + "; ".join(f"{r['mode']} c={r['concurrency']}: {r['errors']} "
                                            f"(first: {r.get('first_error')})" for r in errors))
    cores = report["host"].get("cpus") or 1
    loads = [x for r in levels for x in (r["load_avg_before"][0], r["load_avg_after"][0])]
    if loads and max(loads) > cores + 0.5:
        notes.append(f"the 1-minute load average reached {max(loads):.1f} on this {cores}-core machine while loading: "
                     "other work shared the cores, so these figures are pessimistic.")
    notes.append("the load generator (this process) runs on the same machine as the replicas and takes CPU from "
                 "them; latencies are client-side (send to reply), percentiles over the HTTP 200 replies only.")
    return notes


def bench_serve(config: Config, run: RunDir, variant: str = "none/random", ranker: str = "llm/zero-shot",
                concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY, requests: int = DEFAULT_REQUESTS,
                rerank_requests: int = DEFAULT_RERANK_REQUESTS, out: str | Path = DEFAULT_OUT,
                sustain: Optional[float] = None, config_spec: Optional[str] = None) -> dict[str, Any]:
    concurrency = tuple(sorted(set(concurrency)))
    if not concurrency or min(concurrency) < 1:
        raise CotrecError(f"--concurrency: every level must be at least 1, got {concurrency}")
    if requests < 1 or rerank_requests < 0:
        raise CotrecError(f"--requests must be at least 1 and --rerank-requests at least 0, got {requests}, "
                          f"{rerank_requests}")
    if sustain is not None and sustain < 0:
        raise CotrecError(f"--sustain must be at least 0, got {sustain}")
    served_config, user_ids = check_run(run, variant, ranker)
    rerank = parse_ranker(ranker)[0] != "none" and rerank_requests > 0
    bench_started = time.perf_counter()
    host = machine()
    repo = str(Path(__file__).resolve().parents[2])
    # The same runtime_env start_app asks for (the replicas import `serve.app` from the checkout);
    # replica logs stay in Ray's session folder instead of one line per request on this terminal.
    started_ray = ensure_ray(runtime_env={"env_vars": {"PYTHONPATH": repo}}, log_to_driver=False)
    try:
        deploy_started = time.perf_counter()
        url = start_app(run.root, variant, ranker, port=free_port())
        deploy_s = time.perf_counter() - deploy_started
        try:
            settings = deployed_autoscaling()
            sustain_s = sustain_default(settings) if sustain is None else float(sustain)
            levels = []
            for c in concurrency:
                levels.append({"mode": "retrieve", "concurrency": c, "count": requests,
                               "min_seconds": sustain_s if c == concurrency[-1] else 0.0})
                if rerank:
                    levels.append({"mode": "rerank", "concurrency": c, "count": rerank_requests, "min_seconds": 0.0})
            warmup, results, sampler = asyncio.run(run_load(url, user_ids, levels, rerank))
        finally:
            stop_app()
    finally:
        if started_ray:
            ray.shutdown()
    report: dict[str, Any] = {
        "bench": "serve", "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"config": config_spec or "demo", "run_dir": str(run.root), "variant": variant, "ranker": ranker,
                   "k": K, "horizon": "next", "seed": SEED, "concurrency": list(concurrency),
                   "requests": requests, "rerank_requests": rerank_requests if rerank else 0,
                   "sustain_s": sustain_s, "sustain_default": sustain is None, "warmup": warmup,
                   "request_timeout_s": REQUEST_TIMEOUT_S,
                   # the app serves with the run's own config (its config.yaml), not --config
                   "llm": {"model": served_config.llm.model, "backend": served_config.llm.backend}},
        "users": len(user_ids), "url": url, "deploy_s": round(deploy_s, 2), "started_ray": started_ray,
        "deployments": settings, "levels": results,
        "autoscaling": autoscaling_report(sampler, settings), "host": host,
    }
    report["notes"] = bench_notes(report)
    report["wall_s"] = round(time.perf_counter() - bench_started, 1)
    write_json(Path(out), report)
    return report


def format_bench(report: dict[str, Any]) -> str:
    def ms(value: Optional[float]) -> str:
        return f"{value:.1f}" if value is not None else "-"

    lines = [f"{'mode':<10}{'conc':>5}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
             f"{'4xx':>5}{'5xx':>5}{'exc':>5}  max replicas (Retriever/Ranker/Ingress)"]
    for row in report["levels"]:
        lat, err, mx = row["latency_ms"], row["errors"], row.get("replicas_max") or {}
        lines.append(f"{row['mode']:<10}{row['concurrency']:>5}{row['requests']:>10}{row['requests_per_s']:>9.1f}"
                     f"{ms(lat['p50']):>9}{ms(lat['p95']):>9}{ms(lat['p99']):>9}"
                     f"{err['4xx']:>5}{err['5xx']:>5}{err['exceptions']:>5}  "
                     + "/".join(str(mx.get(n, "-")) for n in DEPLOYMENTS))
    auto = report["autoscaling"]["per_deployment"]
    lines.append("replicas: " + ", ".join(f"{n} {p['observed_min']}..{p['observed_max']} (min_replicas "
                                          f"{p['min_replicas']}, max {p['max_replicas']})" for n, p in auto.items()))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
