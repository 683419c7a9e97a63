"""`cotrec bench serve`: latency, throughput and autoscaling of the Ray Serve app under load.

The app of `cotrec/serve_app.py` (the FastAPI Ingress, which retrieves, and the Ranker) is deployed
locally with `cotrec.serving.start_app` on a free port with an API key that every request sends,
with the Serve settings `cotrec serve` uses (`SERVE_ENV`: the Ingress replica answers on its own
port), warmed up (a few requests of each kind, not counted), then loaded at the replica's own port
level by level, the retrieval levels `--rounds` times: for each concurrency, (a) retrieval only (`rerank: false`) and (b, in the
first round) retrieval + LLM re-ranking (`rerank: true`), `POST /recommend` for seeded random known
users (`horizon: next`, k = 10) with exactly that many requests in flight (asyncio + aiohttp, a
semaphore). Each request's latency is taken at the client; the server's own per-stage figures
(`latency.retrieve_ms`, `rerank_ms`, `total_ms`) come from the replies.

The floor: the same retrieval levels on one FastAPI + uvicorn process holding the same
`RetrieverService` (`cotrec.bench.floor`), with no Ray running, before and again after the Serve
app; after the Serve levels, the retrieval levels again through Serve's proxy (its port, which
balances over the replicas). `versus_bare` gives per concurrency both servers' req/s and p99
(min/median/max over the rounds), the ratios of the medians and the proxy path beside them,
`target` issue 43's bar (on the replica's own port). Where the time goes: per level,
`hops_ms` (wall clock: client -> Ingress, directly or via the proxy, validation, batch wait, retrieval, the return leg,
from the reply's stamps) and `cpu_ms_per_request` (CPU time of the proxy, the replicas, Ray, the
client, and the rest of the machine: other work on shared cores).

Autoscaling: while the load runs, a thread samples `serve.status()` every 0.5 s and records the
RUNNING replicas of each deployment. Serve upscales only after a deployment's averaged ongoing
requests stay above its `target_ongoing_requests` for `upscale_delay_s` (`cotrec/serve_app.py`'s
DEPLOYMENTS), so the retrieval-only level at the highest concurrency keeps sending
requests for at least `--sustain` seconds (default: the longest upscale delay of the deployments
that can scale, plus 15 s). When no replica count rose, the notes say so with the measured length.

The load generator runs on the same machine as the app: on a small machine it takes CPU from the
replicas, and the figures are those of the pair.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, TypedDict, Union

import numpy as np
import pandas as pd
import ray
from ray import serve

from cotrec.bench.common import Machine, Spread, Stamp, load_average, machine, rate, ratio, spread, stamp
from cotrec.cluster import ensure_ray
from cotrec.config import Config, parse_ranker
from cotrec.errors import CotrecError, DataError
from cotrec.progress import log
from cotrec.ranker.stage import merged_model, ranker_folder
from cotrec.recommend import run_config
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, write_json
from cotrec.bench.floor import start_floor, stop_floor
from cotrec.serving import SERVE_ENV, APP_NAME, apply_serve_env, direct_urls, free_port, start_app, stop_app

DEFAULT_OUT = "bench/serve.json"
DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_REQUESTS = 200
DEFAULT_RERANK_REQUESTS = 40
K = 10
SEED = 0
SAMPLE_INTERVAL_S = 0.5
WARMUP = {"retrieve": 4, "rerank": 2}  # requests of each kind before timing, 2 in flight
SUSTAIN_MARGIN_S = 15.0  # beyond the upscale delay: the averaged load must first exceed the target
MIN_SUSTAIN_S = 15.0
REQUEST_TIMEOUT_S = 600.0
RAY_DEFAULT_UPSCALE_DELAY_S = 30.0


class LoadSettings(TypedDict, total=False):
    """A deployment's autoscaling and load settings as the app deploys them."""

    min_replicas: Optional[float]
    max_replicas: Optional[float]
    target_ongoing_requests: Optional[float]
    upscale_delay_s: Optional[float]
    downscale_delay_s: Optional[float]
    look_back_period_s: Optional[float]
    max_ongoing_requests: int
    max_queued_requests: int


class RequestRecord(TypedDict, total=False):
    """One request of a level: the client's latency and status, the reply's `latency` fields, the
    client's hops (`hops`), or the transport error."""

    user_id: str
    latency_ms: float
    status: int
    detail: str
    exception: str
    retrieve_ms: float
    received_at: float
    parse_ms: float
    batch_wait_ms: float
    retrieval_ms: float
    batch_size: float
    rerank_ms: float
    total_ms: float
    app_ms: float
    inbound_ms: float
    outbound_ms: float


class HopFigures(TypedDict):
    """One hop over a level's answered requests: mean, median, and share of the mean latency."""

    mean: float
    p50: float
    share: Optional[float]


class Level(TypedDict):
    """A level of load: the mode, the requests in flight, how many (and for at least how long)."""

    mode: str
    concurrency: int
    count: int
    min_seconds: float
    round: int


class LevelRow(TypedDict, total=False):
    """A level's figures (`summarize`), where it ran, the machine's load and CPU, and the replicas."""

    server: str
    round: int
    mode: str
    concurrency: int
    path: str  # Serve's: `direct` to the Ingress replica's port, or via the `proxy`
    requests: int
    ok: int
    seconds: float
    requests_per_s: float
    ok_per_s: float
    latency_ms: dict[str, Optional[float]]
    server_ms: dict[str, dict[str, Optional[float]]]
    hops_ms: dict[str, Union[HopFigures, float]]
    errors: dict[str, int]
    status_codes: dict[str, int]
    exception_types: dict[str, int]
    first_error: RequestRecord
    window_s: list[float]
    sustained_s: Optional[float]
    load_avg_before: list[float]
    load_avg_after: list[float]
    cpu_ms_per_request: dict[str, Optional[float]]
    replicas_min: dict[str, int]
    replicas_max: dict[str, int]
    when: str


class Warmup(TypedDict):
    requests: int
    seconds: float


class SideFigures(TypedDict):
    """One server's retrieval at one concurrency over the rounds."""

    requests_per_s: Spread
    p50_ms: Spread
    p99_ms: Spread
    errors: int


class FloorComparison(TypedDict, total=False):
    """Serve's retrieval beside the bare process's at one concurrency, and the ratios of the medians."""

    concurrency: int
    rounds: int
    serve: SideFigures
    bare: SideFigures
    serve_via_proxy: SideFigures
    throughput_ratio: Optional[float]
    p99_ratio: Optional[float]


class TargetCheck(TypedDict):
    checks: dict[str, bool]
    met: bool


class DeploymentScaling(TypedDict):
    """A deployment's autoscaling settings beside the RUNNING replicas seen under the load."""

    min_replicas: Optional[float]
    max_replicas: Optional[float]
    target_ongoing_requests: Optional[float]
    upscale_delay_s: Optional[float]
    look_back_period_s: Optional[float]
    observed_min: Optional[int]
    observed_max: Optional[int]
    rose_above_min: bool
    first_above_min_at_s: Optional[float]


class AutoscalingReport(TypedDict, total=False):
    sample_interval_s: float
    samples: int
    sample_errors: int
    last_sample_error: str
    per_deployment: dict[str, DeploymentScaling]
    any_rose_above_min: bool
    not_running_states_seen: list[list[Any]]
    timeline: list[list[Any]]


class BenchSettings(TypedDict):
    """What the bench ran: the app, the load and the model the app served with."""

    config: str
    run_dir: str
    variant: str
    ranker: str
    k: int
    horizon: str
    seed: int
    concurrency: list[int]
    rounds: int
    requests: int
    rerank_requests: int
    sustain_s: float
    sustain_default: bool
    warmup: dict[str, Warmup]
    request_timeout_s: float
    api_key: str
    llm: dict[str, str]


class BareReport(TypedDict):
    what: str
    warmup: Optional[dict[str, Warmup]]
    levels: list[LevelRow]


class ServeBenchReport(Stamp, total=False):
    """`bench serve`'s JSON."""

    cpu: str
    config: BenchSettings
    users: int
    url: str
    direct_urls: list[str]
    deploy_s: float
    started_ray: bool
    serve_env: dict[str, Optional[str]]
    deployments: dict[str, LoadSettings]
    levels: list[LevelRow]
    bare: Optional[BareReport]
    versus_bare: list[FloorComparison]
    target: Optional[TargetCheck]
    hops: dict[str, str]
    autoscaling: AutoscalingReport
    host: Machine
    notes: list[str]
    wall_s: float


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
def deployment_names() -> tuple[str, ...]:
    from cotrec.serve_app import DEPLOYMENTS

    return tuple(DEPLOYMENTS)


def deployed_autoscaling() -> dict[str, LoadSettings]:
    """Each deployment's autoscaling and load settings as the app deploys them (cotrec/serve_app.py)."""
    from cotrec.serve_app import DEPLOYMENTS

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
        for name in deployment_names():
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
        return {"min": {n: min(s[n] for s in samples) for n in deployment_names()} if samples else {},
                "max": {n: max(s[n] for s in samples) for n in deployment_names()} if samples else {}}


# -- the load ----------------------------------------------------------------------------------
async def send_level(client: Any, users: Iterator[str], rerank: bool, concurrency: int, count: int,
                     min_seconds: float = 0.0) -> tuple[list[RequestRecord], float, float]:
    """`count` requests (and, with `min_seconds`, more until that long has passed) with `concurrency`
    in flight; returns one record per request and the level's start and end (perf_counter)."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task] = set()

    async def one(user: str) -> None:
        record: RequestRecord = {"user_id": user}
        sent_at = time.time()
        started = time.perf_counter()
        try:
            async with client.post("/recommend", json={"user_id": user, "k": K, "rerank": rerank,
                                                       "horizon": "next"}) as reply:
                body = await reply.read()
            record["latency_ms"] = (time.perf_counter() - started) * 1e3
            answered_at = time.time()
            record["status"] = reply.status
            if reply.status == 200:
                record.update({k: float(v) for k, v in json.loads(body).get("latency", {}).items()})
                record.update(hops(record, sent_at, answered_at))
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


# Where a request's time goes, in order; each a field of the reply's `latency` or computed from the
# client's wall clock (`hops`). On the bare process only inbound, retrieval and outbound exist.
HOPS = {
    "inbound_ms": "client -> Ingress replica: directly, the replica's own HTTP server; via the proxy, its HTTP parse, "
                  "routing and actor call to the replica",
    "parse_ms": "in the Ingress before the route runs: key check, body read, JSON and pydantic validation",
    "handle_ms": "the Ingress's handle call to another deployment, both legs (routing, pickling, the actor call)",
    "batch_wait_ms": "waiting in @serve.batch for the batch to start",
    "retrieval_ms": "the batch's work: resolve, one SASRec forward pass, top-k, describe",
    "rerank_ms": "the re-ranking call (handle + the Ranker's batch + LLM), re-rank levels only",
    "outbound_ms": "the route's return -> the client: reply serialisation, the proxy's return leg (via the proxy), "
                   "client read",
}


def hops(record: RequestRecord, sent_at: float, answered_at: float) -> dict[str, float]:
    """The client's share of the breakdown from the reply's wall-clock stamp (same host, same clock)."""
    if "received_at" not in record or "app_ms" not in record:
        return {}
    inbound = (record["received_at"] - sent_at) * 1e3
    return {"inbound_ms": inbound, "outbound_ms": record["latency_ms"] - inbound - record["app_ms"]}


def hop_breakdown(ok: list[RequestRecord]) -> dict[str, Union[HopFigures, float]]:
    """Per hop the mean and median over the answered requests, and the share of the mean latency."""
    if not ok:
        return {}
    mean_latency = float(np.mean([r["latency_ms"] for r in ok]))
    out: dict[str, Union[HopFigures, float]] = {}
    for hop in HOPS:
        values = [r[hop] for r in ok if hop in r]
        if values:
            mean = float(np.mean(values))
            out[hop] = {"mean": round(mean, 3), "p50": round(float(np.percentile(values, 50)), 3),
                        "share": round(mean / mean_latency, 3) if mean_latency else None}
    sizes = [r["batch_size"] for r in ok if "batch_size" in r]
    if sizes:
        out["batch_size_mean"] = round(float(np.mean(sizes)), 2)
    return out


def _percentiles(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, Optional[float]]:
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in qs}


def summarize(records: list[RequestRecord], seconds: float) -> LevelRow:
    ok = [r for r in records if r.get("status") == 200]
    codes = Counter(str(r["status"]) for r in records if "status" in r)
    exceptions = Counter(r["exception"] for r in records if "exception" in r)
    latency = [r["latency_ms"] for r in ok]
    server = {}
    for key in ("retrieve_ms", "rerank_ms", "total_ms"):
        values = [r[key] for r in ok if key in r]
        if values:
            server[key] = {**_percentiles(values, (50, 95)), "mean": round(float(np.mean(values)), 2)}
    summary: LevelRow = {
        "requests": len(records), "ok": len(ok), "seconds": round(seconds, 3),
        "requests_per_s": rate(len(records), seconds), "ok_per_s": rate(len(ok), seconds),
        "latency_ms": {**_percentiles(latency), "mean": round(float(np.mean(latency)), 2) if latency else None,
                       "max": round(float(np.max(latency)), 2) if latency else None},
        "server_ms": server,
        "hops_ms": hop_breakdown(ok),
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


async def warm_up(client: Any, user_ids: list[str], rerank: bool) -> dict[str, Warmup]:
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


async def run_load(url: str, user_ids: list[str], levels: list[Level], rerank: bool,
                   headers: Optional[dict[str, str]] = None, sample: bool = True,
                   path: Optional[str] = None) -> tuple[dict[str, Warmup], list[LevelRow], Optional[ReplicaSampler]]:
    """Warm-up, then every level in order; the sampler's clock starts when the first level does
    (`sample`: Serve's replicas are sampled; the bare process has none). `path`: how a Serve
    request reaches the Ingress (`direct` to the replica's own port, or via the `proxy`)."""
    import contextlib

    import aiohttp  # Serve's own HTTP client library: as load generator it leaves the replicas more of the cores than httpx

    top = max(level["concurrency"] for level in levels)
    connector = aiohttp.TCPConnector(limit=top + 8)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    server = f"serve ({path})" if path else "serve" if sample else "bare process"
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout, headers=headers) as client:
        log(f"bench serve: {server}: warm-up")
        warmup = await warm_up(client, user_ids, rerank)
        results: list[LevelRow] = []
        sampler_t0 = time.perf_counter()
        with (ReplicaSampler(sampler_t0) if sample else contextlib.nullcontext()) as sampler:
            for i, level in enumerate(levels):
                mode, c = level["mode"], level["concurrency"]
                users = user_stream(user_ids, (SEED, level.get("round", 0), c, int(mode == "rerank")))
                log(f"bench serve: {server}: round {level.get('round', 0) + 1}, {mode} at concurrency {c}: "
                    f"{level['count']} requests" + (f", at least {level['min_seconds']:.0f} s" if level["min_seconds"] else ""))
                load_before = load_average()
                meter = CpuMeter()
                cpu_before = meter.read()
                records, started, ended = await send_level(client, users, mode == "rerank", c, level["count"],
                                                           level["min_seconds"])
                cpu = CpuMeter.per_request(cpu_before, meter.read(), len(records), ended - started)
                row: LevelRow = {"server": "serve" if sample or path else "bare", "round": level.get("round", 0), "mode": mode,
                                  "concurrency": c, **({"path": path} if path else {}), **summarize(records, ended - started),
                                  "window_s": [round(started - sampler_t0, 2), round(ended - sampler_t0, 2)],
                                  "sustained_s": level["min_seconds"] or None,
                                  "load_avg_before": load_before, "load_avg_after": load_average(),
                                  "cpu_ms_per_request": cpu}
                results.append(row)
                log(f"bench serve: {server}: {mode} c={c}: {row['requests_per_s']:.1f} req/s, p50 "
                    f"{row['latency_ms']['p50']} ms, p99 {row['latency_ms']['p99']} ms, errors {row['errors']}")
            if sampler is not None:
                sampler.sample()  # the state at the end of the load
        for row in results:
            if sampler is not None:
                seen = sampler.window(*row["window_s"])
                row["replicas_min"], row["replicas_max"] = seen["min"], seen["max"]
    return warmup, results, sampler


# Processes whose CPU time a level counts, by a part of their command line (Ray sets a worker's to
# its actor's name); the rest of the machine's busy time is "other" (work that shared the cores).
CPU_PARTS = {"proxy": "ray::ProxyActor", "Ingress": "ServeReplica:cotrec:Ingress",
             "Ranker": "ServeReplica:cotrec:Ranker", "controller": "ray::ServeController",
             "ray (gcs, raylet, agents)": ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env/agent"),
             "bare process": "cotrec.bench.floor"}


class CpuMeter:
    """CPU time per request of each part of the chain over a level (psutil, this host only): with
    the client's wall-clock hops, where the cores went, so that a hop that costs CPU is told from
    one that only waits. The parts are this process's descendants (the Ray it started, the bare
    process), or on a Ray it joined every process named like one."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        children = self.me.children(recursive=True)
        self.procs: dict[int, tuple[str, Any]] = {}
        for proc in children or list(psutil.process_iter()):
            try:
                line = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            part = next((part for part, needles in CPU_PARTS.items()
                         if any(n in line for n in ((needles,) if isinstance(needles, str) else needles))),
                        "ray (workers, other)" if children else None)
            if part is not None:
                self.procs[proc.pid] = (part, proc)

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, proc in list(self.procs.values()):
            try:
                t = proc.cpu_times()
                out[part] = out.get(part, 0.0) + t.user + t.system
            except self.psutil.Error:
                continue
        t = self.me.cpu_times()
        out["client (this process)"] = t.user + t.system
        busy = self.psutil.cpu_times()
        out["machine"] = busy.user + busy.nice + busy.system + busy.irq + busy.softirq + getattr(busy, "steal", 0.0)
        return out

    @staticmethod
    def per_request(before: dict[str, float], after: dict[str, float], requests: int,
                    seconds: float) -> dict[str, Optional[float]]:
        if not requests:
            return {}
        spent = {k: after[k] - before.get(k, 0.0) for k in after}
        machine = spent.pop("machine")
        counted = sum(spent.values())
        out: dict[str, Optional[float]] = {k: round(v * 1e3 / requests, 3) for k, v in spent.items() if v > 0}
        out["other (not this bench)"] = round(max(0.0, machine - counted) * 1e3 / requests, 3)
        out["cores_busy"] = round(machine / seconds, 2) if seconds > 0 else None
        return out


def versus_floor(serve_rows: list[LevelRow], floor_rows: list[LevelRow],
                 proxy_rows: Optional[list[LevelRow]] = None) -> list[FloorComparison]:
    """Per concurrency, Serve's retrieval next to the bare process's over the rounds (the bare
    process's before and after Serve together): req/s and p99 (min/median/max) and the ratios of
    the medians. `proxy_rows`: the same levels through Serve's proxy, beside them."""
    out = []
    for c in sorted({r["concurrency"] for r in serve_rows if r["mode"] == "retrieve"}):
        mine = [r for r in serve_rows if r["mode"] == "retrieve" and r["concurrency"] == c]
        bare = [r for r in floor_rows if r["mode"] == "retrieve" and r["concurrency"] == c]
        proxied = [r for r in proxy_rows or () if r["mode"] == "retrieve" and r["concurrency"] == c]
        row: FloorComparison = {"concurrency": c, "rounds": len(mine)}
        for name, rows in (("serve", mine), ("bare", bare)) + ((("serve_via_proxy", proxied),) if proxied else ()):
            row[name] = {"requests_per_s": spread([r["requests_per_s"] for r in rows]),
                         "p50_ms": spread([r["latency_ms"]["p50"] for r in rows if r["latency_ms"]["p50"] is not None]),
                         "p99_ms": spread([r["latency_ms"]["p99"] for r in rows if r["latency_ms"]["p99"] is not None]),
                         "errors": sum(sum(r["errors"].values()) for r in rows)}
        s, b = row["serve"], row["bare"]
        row["throughput_ratio"] = ratio(s["requests_per_s"]["median"], b["requests_per_s"]["median"])
        row["p99_ratio"] = ratio(s["p99_ms"]["median"], b["p99_ms"]["median"])
        if proxied:
            v = row["serve_via_proxy"]
            row["via_proxy_throughput_ratio"] = ratio(v["requests_per_s"]["median"], b["requests_per_s"]["median"])
            row["via_proxy_p99_ratio"] = ratio(v["p99_ms"]["median"], b["p99_ms"]["median"])
        out.append(row)
    return out


def target_check(comparison: list[FloorComparison]) -> TargetCheck:
    """Issue 43's bar: >= 0.5x the bare process's req/s at 8 and 32, p99 at 32 within 2x, no errors."""
    by = {row["concurrency"]: row for row in comparison}
    checks = {}
    for c in (8, 32):
        if c in by:
            checks[f"throughput_ratio_c{c}_at_least_0.5"] = (by[c]["throughput_ratio"] or 0) >= 0.5
    if 32 in by and by[32]["p99_ratio"] is not None:
        checks["p99_ratio_c32_at_most_2"] = by[32]["p99_ratio"] <= 2.0
    checks["no_errors"] = all(row["serve"]["errors"] == 0 for row in comparison)
    return {"checks": checks, "met": bool(checks) and all(checks.values())}


# -- the report --------------------------------------------------------------------------------
def autoscaling_report(sampler: ReplicaSampler, settings: dict[str, LoadSettings]) -> AutoscalingReport:
    per: dict[str, DeploymentScaling] = {}
    for name in deployment_names():
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


def sustain_default(settings: dict[str, LoadSettings]) -> float:
    """The longest upscale delay among the deployments that can scale, plus a margin."""
    delays = [cfg.get("upscale_delay_s") if cfg.get("upscale_delay_s") is not None else RAY_DEFAULT_UPSCALE_DELAY_S
              for cfg in settings.values() if (cfg.get("max_replicas") or 0) > (cfg.get("min_replicas") or 0)]
    return max(MIN_SUSTAIN_S, (max(delays) if delays else RAY_DEFAULT_UPSCALE_DELAY_S) + SUSTAIN_MARGIN_S)


def bench_notes(report: ServeBenchReport) -> list[str]:
    notes = []
    auto = report["autoscaling"]
    per = auto["per_deployment"]
    levels = report["levels"]
    longest = max(levels, key=lambda r: r["seconds"]) if levels else None
    fixed = [n for n, p in per.items() if p["min_replicas"] is not None and p["min_replicas"] == p["max_replicas"]]
    if fixed:
        notes.append(f"{', '.join(fixed)}: min_replicas == max_replicas ({', '.join(str(per[n]['max_replicas']) for n in fixed)}) "
                     "in cotrec/serve_app.py, so it cannot scale here.")
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
                     "target_ongoing_requests for upscale_delay_s (cotrec/serve_app.py's DEPLOYMENTS). "
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
                sustain: Optional[float] = None, config_spec: Optional[str] = None, rounds: int = 3,
                floor: bool = True) -> ServeBenchReport:
    concurrency = tuple(sorted(set(concurrency)))
    if not concurrency or min(concurrency) < 1:
        raise CotrecError(f"--concurrency: every level must be at least 1, got {concurrency}")
    if requests < 1 or rerank_requests < 0:
        raise CotrecError(f"--requests must be at least 1 and --rerank-requests at least 0, got {requests}, "
                          f"{rerank_requests}")
    if sustain is not None and sustain < 0:
        raise CotrecError(f"--sustain must be at least 0, got {sustain}")
    if rounds < 1:
        raise CotrecError(f"--rounds must be at least 1, got {rounds}")
    served_config, user_ids = check_run(run, variant, ranker)
    rerank = parse_ranker(ranker)[0] != "none" and rerank_requests > 0
    bench_started = time.perf_counter()
    host = machine()
    head = stamp("serve", rounds)
    repo = str(Path(__file__).resolve().parents[2])
    retrieval_levels = [Level(mode="retrieve", concurrency=c, count=requests, min_seconds=0.0, round=r)
                        for r in range(rounds) for c in concurrency]
    # The key every request sends: the app checks it as a deployed one does (the bare process does not).
    key = secrets.token_urlsafe(32)
    headers = {"authorization": f"Bearer {key}"}
    floor_warmup: Optional[dict[str, Warmup]] = None
    floor_rows: list[LevelRow] = []

    def run_floor(when: str) -> None:
        """Every round on the bare process, with no Ray running (nothing of Serve's shares the cores)."""
        nonlocal floor_warmup
        process = start_floor(run.root, variant, port := free_port())
        try:
            warm, rows, _ = asyncio.run(run_load(f"http://127.0.0.1:{port}", user_ids, retrieval_levels, False,
                                                 headers, sample=False))
        finally:
            stop_floor(process)
        floor_warmup = floor_warmup or warm
        floor_rows.extend({**row, "when": when} for row in rows)

    if floor:  # before and after Serve: the floor brackets whatever else the machine did meanwhile
        run_floor("before")
    # The same Serve settings and runtime_env start_app asks for (the replicas import this checkout's
    # cotrec); replica logs stay in Ray's session folder instead of one line per request on this terminal.
    apply_serve_env()
    started_ray = ensure_ray(runtime_env={"env_vars": {"PYTHONPATH": repo}}, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="cotrec-bench-") as keys_dir:
            keys_file = Path(keys_dir) / "api-keys"
            keys_file.write_text(key + "\n")
            keys_file.chmod(0o600)
            deploy_started = time.perf_counter()
            url = start_app(run.root, variant, ranker, port=free_port(), access={"api_keys_file": str(keys_file)})
            deploy_s = time.perf_counter() - deploy_started
            try:
                settings = deployed_autoscaling()
                sustain_s = sustain_default(settings) if sustain is None else float(sustain)
                levels: list[Level] = []
                for level in retrieval_levels:
                    last = level["round"] == rounds - 1 and level["concurrency"] == concurrency[-1]
                    levels.append({**level, "min_seconds": sustain_s if last else 0.0})
                    if rerank and level["round"] == 0:  # the LLM's figures do not move with the chain's overhead
                        levels.append({"mode": "rerank", "concurrency": level["concurrency"], "count": rerank_requests,
                                       "min_seconds": 0.0, "round": 0})
                direct = direct_urls()
                # the replica's own port when Serve has one (the proxy's otherwise), then the same
                # retrieval levels through the proxy: what the proxy hop costs
                warmup, results, sampler = asyncio.run(run_load(direct[0] if direct else url, user_ids, levels, rerank,
                                                                headers, path="direct" if direct else "proxy"))
                proxy_rows = []
                if direct:
                    _, proxy_rows, _ = asyncio.run(run_load(url, user_ids, retrieval_levels, False, headers, sample=False,
                                                            path="proxy"))
            finally:
                stop_app()
    finally:
        if started_ray:
            ray.shutdown()
    if floor:
        run_floor("after")
    comparison = versus_floor(results, floor_rows, proxy_rows) if floor else []
    report: ServeBenchReport = {
        **head, "cpu": host.get("cpu_model"),
        "config": {"config": config_spec or "demo", "run_dir": str(run.root), "variant": variant, "ranker": ranker,
                   "k": K, "horizon": "next", "seed": SEED, "concurrency": list(concurrency), "rounds": rounds,
                   "requests": requests, "rerank_requests": rerank_requests if rerank else 0,
                   "sustain_s": sustain_s, "sustain_default": sustain is None, "warmup": warmup,
                   "request_timeout_s": REQUEST_TIMEOUT_S, "api_key": "every request sends one; the app checks it",
                   # the app serves with the run's own config (its config.yaml), not --config
                   "llm": {"model": served_config.llm.model, "backend": served_config.llm.backend}},
        "users": len(user_ids), "url": url, "direct_urls": direct, "deploy_s": round(deploy_s, 2),
        "started_ray": started_ray, "serve_env": {name: os.environ.get(name) for name in SERVE_ENV},
        "deployments": settings, "levels": results + proxy_rows,
        "bare": {"what": "one FastAPI + uvicorn process holding RetrieverService (cotrec/bench/floor.py), the same "
                         "model, users and load generator; every round before and again after the Serve app, with no "
                         "Ray running",
                 "warmup": floor_warmup, "levels": floor_rows} if floor else None,
        "versus_bare": comparison, "target": target_check(comparison) if floor else None,
        "hops": HOPS,
        "autoscaling": autoscaling_report(sampler, settings), "host": host,
    }
    report["notes"] = bench_notes(report)
    report["wall_s"] = round(time.perf_counter() - bench_started, 1)
    write_json(Path(out), report)
    return report


def format_bench(report: ServeBenchReport) -> str:
    def ms(value: Optional[float]) -> str:
        return f"{value:.1f}" if value is not None else "-"

    lines = [f"{'mode':<10}{'path':<8}{'round':>6}{'conc':>5}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
             f"{'4xx':>5}{'5xx':>5}{'exc':>5}  max replicas (" + "/".join(deployment_names()) + ")"]
    for row in report["levels"]:
        lat, err, mx = row["latency_ms"], row["errors"], row.get("replicas_max") or {}
        lines.append(f"{row['mode']:<10}{row.get('path', '-'):<8}{row.get('round', 0) + 1:>6}{row['concurrency']:>5}{row['requests']:>10}{row['requests_per_s']:>9.1f}"
                     f"{ms(lat['p50']):>9}{ms(lat['p95']):>9}{ms(lat['p99']):>9}"
                     f"{err['4xx']:>5}{err['5xx']:>5}{err['exceptions']:>5}  "
                     + "/".join(str(mx.get(n, "-")) for n in deployment_names()))
    if report.get("versus_bare"):
        lines.append(f"retrieval against the bare process (median of {report['config'].get('rounds', 1)} rounds; min..max):")
        lines.append(f"{'conc':>5}{'serve req/s':>24}{'bare req/s':>24}{'ratio':>7} {'serve p99':>22}{'bare p99':>22}{'ratio':>7}")

        def cell(x: Spread) -> str:
            return f"{x['median']} ({x['min']}..{x['max']})" if x["median"] is not None else "-"

        for row in report["versus_bare"]:
            sv, bv = row["serve"], row["bare"]
            lines.append(f"{row['concurrency']:>5}{cell(sv['requests_per_s']):>24}{cell(bv['requests_per_s']):>24}"
                         f"{row['throughput_ratio'] or '-':>7} {cell(sv['p99_ms']):>22}{cell(bv['p99_ms']):>22}"
                         f"{row['p99_ratio'] or '-':>7}")
        for row in report["versus_bare"]:
            if "serve_via_proxy" in row:
                v = row["serve_via_proxy"]
                lines.append(f"  via the proxy c={row['concurrency']}: {cell(v['requests_per_s'])} req/s "
                             f"(ratio {row['via_proxy_throughput_ratio']}), p99 {cell(v['p99_ms'])} ms "
                             f"(ratio {row['via_proxy_p99_ratio']})")
        lines.append(f"target (issue 43): {report['target']}")
    for row in report["levels"]:
        if row["mode"] == "retrieve" and row.get("round", 0) == 0:
            h = row.get("hops_ms", {})
            lines.append(f"hops {row.get('path', '')} c={row['concurrency']} (mean ms): " + ", ".join(
                f"{k[:-3]} {v['mean']:.2f}" for k, v in h.items() if isinstance(v, dict))
                + (f", batch {h['batch_size_mean']}" if "batch_size_mean" in h else ""))
            lines.append(f"  cpu ms per request c={row['concurrency']}: " + ", ".join(
                f"{k} {v}" for k, v in row.get("cpu_ms_per_request", {}).items()))
    auto = report["autoscaling"]["per_deployment"]
    lines.append("replicas: " + ", ".join(f"{n} {p['observed_min']}..{p['observed_max']} (min_replicas "
                                          f"{p['min_replicas']}, max {p['max_replicas']})" for n, p in auto.items()))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
