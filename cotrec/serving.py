"""Starting the Serve app from a run directory, and the scaled evaluation through it.

`start_app` runs `cotrec/serve_app.py`'s application on the current Ray cluster (RAY_ADDRESS, else a
local Ray), HTTP on the given host and port, with the access settings of the app's args (API keys
from a file or a variable; an app without keys only on a loopback address unless `insecure`).
A local Ray it starts runs Serve with `SERVE_ENV`: direct ingress, where each Ingress replica also
answers HTTP on a port of its own (`direct_urls`), so that a request skips the proxy and the
proxy's call to the replica; the proxy stays on the given port, balancing over the replicas and
keeping one address when a replica is replaced.
`serve_until_stopped` holds `cotrec serve` until Ctrl-C or SIGTERM and then stops the app.
`evaluate_via_serve` sends every test user through the deployed chain (`POST /recommend` with
`horizon: test`, which the app must open) with bounded concurrency and computes Hit@10 / NDCG@10
from the returned lists; because the deployments share the offline code paths, the figures equal
the offline `metrics.json` of the same run (the command prints both). A client's key comes from
`COTREC_API_KEY`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypedDict

from cotrec.errors import CotrecError
from cotrec.progress import log
from cotrec.rundir import RunDir

if TYPE_CHECKING:  # Ray Serve and the model code load only where an app is started
    from cotrec.recommend import RecommendBody
    from cotrec.serve_app import AccessArgs, RecommendReply

APP_NAME = "cotrec"
API_KEY_ENV = "COTREC_API_KEY"  # a client's key (evaluate --via-serve --url, scripts/probe-serve.py)
# Serve's settings for the Ray this process starts (its controller and replicas read them when they
# start, so they are set before ray.init; a value already in the environment wins). A Ray joined at
# RAY_ADDRESS has its nodes' own (serve/config.yaml and cluster/kuberay/rayservice.yaml say which).
SERVE_ENV = {
    # each Ingress replica also serves HTTP itself, on a port of Ray's range (30000-30999)
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # a stopping replica stays open this long for a load balancer to drop it; a local app has none
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # a proxy starting on a few busy cores can take longer than Serve's default allows to say it is ready, and is
    # then killed and restarted until `serve.start` gives up
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
}
DIRECT_WAIT_S = 10.0  # for the controller to list a RUNNING replica's port


# The offline figures `evaluate_via_serve` compares with (at the default k; the keys follow k).
OfflineFigures = TypedDict("OfflineFigures", {"file": str, "hit@10": Optional[float], "ndcg@10": Optional[float],
                                              "users": Optional[int]}, total=False)

# `evaluate_via_serve`: Hit@K and NDCG@K of the lists the app returned, its throughput and latency,
# and the offline figures beside them.
ServeEvaluation = TypedDict("ServeEvaluation", {
    "via": str, "retriever": str, "ranker": str, "split": str, "users": int, "hit@10": float, "ndcg@10": float,
    "seconds": float, "users_per_second": float, "latency_ms_p50": float, "latency_ms_p95": float,
    "concurrency": int, "offline": Optional[OfflineFigures], "equal": bool}, total=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def checked_access(host: str, access: Optional[AccessArgs] = None, insecure: bool = False) -> AccessArgs:
    """The app's access args for an app bound to `host`: keys checked readable here (a one-line error
    before anything starts), a key file's path made absolute for the replicas, and an app without
    keys allowed only on a loopback address or when `insecure`."""
    from cotrec.guard import load_api_keys

    access: AccessArgs = {k: v for k, v in (access or {}).items() if v is not None}
    if access.get("api_keys_file"):
        access["api_keys_file"] = str(Path(access["api_keys_file"]).expanduser().resolve())
    keys = load_api_keys(access.get("api_keys_file"), access.get("api_keys_env"))
    if not keys:
        if not (is_loopback(host) or insecure):
            raise CotrecError(f"--host {host}: an address other machines reach needs API keys (--api-keys-file or "
                              "--api-keys-env); --insecure serves every user's data to anyone who reaches the port")
        access["allow_unauthenticated"] = True
    return access


def start_app(run_dir: str | Path, variant: Optional[str] = None, ranker: Optional[str] = None,
              host: str = "127.0.0.1", port: int = 8000, access: Optional[AccessArgs] = None,
              insecure: bool = False) -> str:
    """Deploy the app (blocking until it is healthy); returns its base URL. `access`: the app's
    access args (cotrec/serve_app.py's ACCESS_ARGS)."""
    from ray import serve

    from cotrec.cluster import ensure_ray

    access = checked_access(host, access, insecure)
    from cotrec.serve_app import app_builder

    apply_serve_env()
    # the replicas import the cotrec this process runs (a checkout's, not another installed copy)
    ensure_ray(runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    serve.start(http_options={"host": host, "port": port})
    args = {"run_dir": str(run_dir), "variant": variant, "ranker": ranker, **access}
    started = time.perf_counter()
    serve.run(app_builder({k: v for k, v in args.items() if v is not None}), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    log(f"serve: {url} is up ({time.perf_counter() - started:.0f} s)")
    return url


def apply_serve_env() -> None:
    """`SERVE_ENV` in this process's environment, which a local Ray started afterwards inherits
    (a Ray already running, or joined at RAY_ADDRESS, keeps its own)."""
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)


def direct_urls(host: str = "127.0.0.1", wait_s: float = DIRECT_WAIT_S) -> list[str]:
    """The Ingress replicas' own HTTP addresses (direct ingress), one per RUNNING replica; [] when
    this process's environment does not ask for direct ingress (a joined cluster's driver sets it
    as its nodes do)."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return []
    controller = _get_global_client()._controller
    deadline = time.monotonic() + wait_s
    while True:
        # what the controller offers a load balancer: the replicas' ports, or the proxies' until
        # every replica has one
        groups = ray.get(controller.get_target_groups.remote(APP_NAME))
        replicas = [t for g in groups if g.protocol == RequestProtocol.HTTP for t in g.targets
                    if t.name.startswith("SERVE_REPLICA::")]
        if replicas or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    shown = host if host not in ("0.0.0.0", "::") else None
    return sorted(f"http://{shown or t.ip}:{t.port}" for t in replicas)


def stop_app() -> None:
    from ray import serve

    serve.shutdown()


def serve_until_stopped(stop: Callable[[], None] = stop_app) -> None:
    """Wait for Ctrl-C or SIGTERM (what Docker, systemd and Kubernetes send), then `stop()`. Replaces
    the SIGTERM handler ray.init installed, which exits at once with status 1."""
    stopping = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: stopping.set()) for s in handled}
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log("serve: stopping")
    stop()


def client_headers(api_key: Optional[str] = None) -> dict[str, str]:
    key = api_key or os.environ.get(API_KEY_ENV)
    return {"authorization": f"Bearer {key}"} if key else {}


async def _post_all(url: str, bodies: list[RecommendBody], concurrency: int,
                    api_key: Optional[str] = None) -> list[RecommendReply]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    done = 0
    started = time.perf_counter()

    async with httpx.AsyncClient(base_url=url, timeout=600, headers=client_headers(api_key)) as client:
        async def one(body: RecommendBody) -> RecommendReply:
            nonlocal done
            async with gate:
                reply = await client.post("/recommend", json=body)
            if reply.status_code != 200:
                raise CotrecError(f"{url}/recommend: HTTP {reply.status_code} for user {body['user_id']}: "
                                  f"{reply.text[:200]}")
            done += 1
            if done % 200 == 0:
                log(f"evaluate via serve: {done:,} of {len(bodies):,} users ({done / (time.perf_counter() - started):.1f}/s)")
            return reply.json()

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def evaluate_via_serve(run: RunDir, url: str, variant: str, ranker: str = "none", concurrency: int = 8,
                       k: int = 10, api_key: Optional[str] = None) -> ServeEvaluation:
    """Every test user through `POST /recommend`; Hit@K / NDCG@K next to the offline figures."""
    import numpy as np
    import pandas as pd

    from cotrec.config import parse_ranker
    from cotrec.metrics import ranking_metrics
    from cotrec.ranker.stage import ranker_folder
    from cotrec.recommend import run_config
    from cotrec.retriever.data import Sequences
    from cotrec.retriever.variants import parse_variant, variant_dir
    from cotrec.rundir import read_table

    config = run_config(run)
    rerank = parse_ranker(ranker)[0] != "none"
    user, item = parse_variant(variant)
    offline_path = (run / ranker_folder(variant, ranker) / "eval" / "metrics.json" if rerank
                    else run / variant_dir(config, user, item, config.seed) / "metrics.json")
    offline = json.loads(offline_path.read_text()) if offline_path.is_file() else None
    users = read_table(run, "users").sort_values("user_idx")
    if offline is not None and offline.get("sampled_users"):  # the ranker evaluated a seeded sample: the same users
        evaluated = pd.read_parquet(str(offline_path.with_name("rankings.parquet")), columns=["user_idx"])["user_idx"]
        users = users[users["user_idx"].isin(set(evaluated))]
    items = read_table(run, "items").sort_values("item_idx")
    seqs = Sequences.from_interactions(read_table(run, "interactions"), num_items=len(items))
    item_ids = items["item_id"].astype(str).to_numpy()
    bodies: list[RecommendBody] = [{"user_id": str(u), "horizon": "test", "k": k, "rerank": rerank}
                                   for u in users["user_id"].astype(str)]
    started = time.perf_counter()
    replies = asyncio.run(_post_all(url, bodies, concurrency, api_key))
    seconds = time.perf_counter() - started
    ranks = []
    for user, reply in zip(users["user_idx"], replies):
        returned = [row["item_id"] for row in reply["items"]]
        target = item_ids[seqs.test[int(user)]]
        ranks.append(returned.index(target) if target in returned else k)
    metrics = ranking_metrics(np.asarray(ranks), [k])
    latency = [r["latency"]["total_ms"] for r in replies]
    result: ServeEvaluation = {
        "via": url, "retriever": variant, "ranker": ranker, "split": "test", "users": len(replies), **metrics,
        "seconds": round(seconds, 3), "users_per_second": len(replies) / max(seconds, 1e-9),
        "latency_ms_p50": float(np.percentile(latency, 50)), "latency_ms_p95": float(np.percentile(latency, 95)),
        "concurrency": concurrency, "offline": None}
    if offline is not None:
        result["offline"] = {"file": str(offline_path), f"hit@{k}": offline.get(f"hit@{k}"),
                             f"ndcg@{k}": offline.get(f"ndcg@{k}"), "users": offline.get("users")}
        result["equal"] = all(offline.get(m) == result[m] for m in (f"hit@{k}", f"ndcg@{k}"))
    return result


def format_evaluation(result: ServeEvaluation) -> str:
    lines = [f"via serve   {result['via']}  ({result['retriever']} + ranker {result['ranker']})",
             f"test        hit@10 {result['hit@10']:.6f}  ndcg@10 {result['ndcg@10']:.6f}  ({result['users']:,} users)"]
    if result.get("offline"):
        off = result["offline"]
        lines.append(f"offline     hit@10 {off['hit@10']:.6f}  ndcg@10 {off['ndcg@10']:.6f}  ({off['file']})")
        lines.append("agreement   " + ("equal" if result["equal"] else "DIFFERENT"))
    lines.append(f"throughput  {result['users_per_second']:.1f} users/s at concurrency {result['concurrency']}; "
                 f"latency p50 {result['latency_ms_p50']:.0f} ms, p95 {result['latency_ms_p95']:.0f} ms")
    return "\n".join(lines)
