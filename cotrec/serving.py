"""Starting the Serve app from a run directory, and the scaled evaluation through it.

`start_app` runs `serve/app.py`'s application on the current Ray cluster (RAY_ADDRESS, else a
local Ray), HTTP on the given host and port. `evaluate_via_serve` sends every test user through
the deployed chain (`POST /recommend` with `horizon: test`) with bounded concurrency and computes
Hit@10 / NDCG@10 from the returned lists; because the deployments share the offline code paths,
the figures equal the offline `metrics.json` of the same run (the command prints both).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from cotrec.cluster import ensure_ray
from cotrec.config import parse_ranker
from cotrec.errors import CotrecError
from cotrec.metrics import ranking_metrics
from cotrec.progress import log
from cotrec.ranker.stage import ranker_folder
from cotrec.recommend import run_config
from cotrec.retriever.data import Sequences
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir, read_table

APP_NAME = "cotrec"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(run_dir: str | Path, variant: Optional[str] = None, ranker: Optional[str] = None,
              host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app (blocking until it is healthy); returns its base URL."""
    import sys

    from ray import serve

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # `serve` is a top-level package of the repository
        sys.path.insert(0, repo)
    from serve.app import app_builder

    ensure_ray(runtime_env={"env_vars": {"PYTHONPATH": repo}})
    serve.start(http_options={"host": host, "port": port})
    args = {"run_dir": str(run_dir), "variant": variant, "ranker": ranker}
    started = time.perf_counter()
    serve.run(app_builder({k: v for k, v in args.items() if v is not None}), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    log(f"serve: {url} is up ({time.perf_counter() - started:.0f} s)")
    return url


def stop_app() -> None:
    from ray import serve

    serve.shutdown()


async def _post_all(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    done = 0
    started = time.perf_counter()

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(body: dict[str, Any]) -> dict[str, Any]:
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
                       k: int = 10) -> dict[str, Any]:
    """Every test user through `POST /recommend`; Hit@K / NDCG@K next to the offline figures."""
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
    bodies = [{"user_id": str(u), "horizon": "test", "k": k, "rerank": rerank} for u in users["user_id"].astype(str)]
    started = time.perf_counter()
    replies = asyncio.run(_post_all(url, bodies, concurrency))
    seconds = time.perf_counter() - started
    ranks = []
    for user, reply in zip(users["user_idx"], replies):
        returned = [row["item_id"] for row in reply["items"]]
        target = item_ids[seqs.test[int(user)]]
        ranks.append(returned.index(target) if target in returned else k)
    metrics = ranking_metrics(np.asarray(ranks), [k])
    latency = [r["latency"]["total_ms"] for r in replies]
    result = {"via": url, "retriever": variant, "ranker": ranker, "split": "test", "users": len(replies), **metrics,
              "seconds": round(seconds, 3), "users_per_second": len(replies) / max(seconds, 1e-9),
              "latency_ms_p50": float(np.percentile(latency, 50)), "latency_ms_p95": float(np.percentile(latency, 95)),
              "concurrency": concurrency, "offline": None}
    if offline is not None:
        result["offline"] = {"file": str(offline_path), f"hit@{k}": offline.get(f"hit@{k}"),
                             f"ndcg@{k}": offline.get(f"ndcg@{k}"), "users": offline.get("users")}
        result["equal"] = all(offline.get(m) == result[m] for m in (f"hit@{k}", f"ndcg@{k}"))
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    lines = [f"via serve   {result['via']}  ({result['retriever']} + ranker {result['ranker']})",
             f"test        hit@10 {result['hit@10']:.6f}  ndcg@10 {result['ndcg@10']:.6f}  ({result['users']:,} users)"]
    if result.get("offline"):
        off = result["offline"]
        lines.append(f"offline     hit@10 {off['hit@10']:.6f}  ndcg@10 {off['ndcg@10']:.6f}  ({off['file']})")
        lines.append("agreement   " + ("equal" if result["equal"] else "DIFFERENT"))
    lines.append(f"throughput  {result['users_per_second']:.1f} users/s at concurrency {result['concurrency']}; "
                 f"latency p50 {result['latency_ms_p50']:.0f} ms, p95 {result['latency_ms_p95']:.0f} ms")
    return "\n".join(lines)
