"""`cotrec bench faults`: kill what a production run loses (a process, an engine, a replica) and count
what was lost.

Each scenario starts real work, kills one real process part-way (SIGKILL, by process id, found
among this process's descendants by its Ray or vLLM process title) and measures what survived:

- `actor`: an extraction actor of a users job (zero-latency engine, SYNTHETIC users): the job must
  finish with every row written exactly once (lost and duplicated rows counted before and after
  the folder's compaction);
- `engine`: the vLLM engine core under an extraction actor (the run's prepared data, real model):
  the actor is replaced and its batches run again, so no row is written as failed;
- `train`: a Ray Train worker of a SASRec fit: the group restarts and resumes from the last
  checkpoint, not from epoch 0;
- `finetune`: a Ray Train worker of the ranker's LoRA fine-tune (DeepSpeed, 2 workers): the same;
- `replica`: the Serve `Ingress` replica (which retrieves) under load: the requests it held are lost,
  those sent while it is down and after must be answered;
- `driver`: the `cotrec extract users` driver itself, then the same command again: it resumes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import numpy as np
import pandas as pd
import psutil
import ray

from cotrec.bench.common import machine, stamp
from cotrec.bench.extract_scale import SCALE_SETTINGS, scale_config, synthetic_labels, synthetic_user_rows
from cotrec.cluster import ensure_ray
from cotrec.config import Config
from cotrec.data.prepare import prepare
from cotrec.errors import CotrecError
from cotrec.extract.programs import PROGRAMS
from cotrec.extract.runner import run_programs
from cotrec.extract.shards import compact, read_shards, shard_files
from cotrec.extract.stage import extract_users
from cotrec.progress import log
from cotrec.ranker.stage import ranker_train
from cotrec.retriever.stage import train_variant
from cotrec.rundir import DATA_DIR, RunDir, write_json
from cotrec.serving import free_port, start_app, stop_app

SCENARIOS = ("actor", "engine", "train", "finetune", "replica", "driver")
DEFAULT_OUT = "bench/faults.json"


# -- finding and killing -------------------------------------------------------------------------
def descendants_titled(fragment: str) -> list[psutil.Process]:
    """This process's descendants whose command line (Ray and vLLM set it to the process title)
    contains `fragment`."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if fragment in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


class Killer:
    """Waits in a thread until `ready()` holds, then SIGKILLs the first descendant titled `fragment`."""

    def __init__(self, fragment: str, ready: Callable[[], bool], timeout_s: float = 600):
        self.fragment, self.ready, self.timeout_s = fragment, ready, timeout_s
        self.killed: Optional[dict[str, Any]] = None
        self._thread = threading.Thread(target=self._run, name=f"kill-{fragment}", daemon=True)
        self.t0 = time.perf_counter()

    def _run(self) -> None:
        deadline = time.perf_counter() + self.timeout_s
        while time.perf_counter() < deadline:
            if self.ready():
                victims = descendants_titled(self.fragment)
                if victims:
                    victim = victims[0]
                    title = " ".join(victim.cmdline())[:120]
                    victim.send_signal(signal.SIGKILL)
                    self.killed = {"pid": victim.pid, "title": title, "at_s": round(time.perf_counter() - self.t0, 2)}
                    log(f"bench faults: killed {title} (pid {victim.pid})")
                    return
            time.sleep(0.05)

    def __enter__(self) -> "Killer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._thread.join(timeout=5)


def row_accounting(folder: Path, key: tuple[str, ...], expected: set) -> dict[str, int]:
    """Rows on disk per key: keys missing, rows beyond one per key."""
    frame = read_shards(folder, list(key))
    keys = list(map(tuple, frame[list(key)].to_numpy().tolist()))
    present = set(keys)
    return {"rows": len(keys), "keys": len(present), "lost": len(expected - present),
            "duplicated": len(keys) - len(present), "unexpected": len(present - expected)}


# -- the scenarios ---------------------------------------------------------------------------------
def actor_killed(config: Config, users: int = 200_000) -> dict[str, Any]:
    """A users job on SYNTHETIC users with the zero-latency engine; one actor SIGKILLed after the
    first shard is written."""
    cfg = scale_config(config, SCALE_SETTINGS)
    rows = synthetic_user_rows(users)
    folder = Path(tempfile.mkdtemp(prefix="cotrec-faults-actor-"))
    expected = {(u, h) for u in range(users) for h in ("train", "valid", "test")}
    try:
        started = time.perf_counter()
        with Killer("ExtractWorker", lambda: bool(shard_files(folder))) as killer:
            summary = run_programs(PROGRAMS["users"], rows, folder, cfg, domain="movie", labels=synthetic_labels())
        before = row_accounting(folder, PROGRAMS["users"].key, expected)
        compact(folder, PROGRAMS["users"])
        after = row_accounting(folder, PROGRAMS["users"].key, expected)
        failed = int((read_shards(folder, ["status"])["status"] != "ok").sum())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"users": users, "killed": killer.killed, "finished": True, "seconds": round(time.perf_counter() - started, 2),
            "rows_reported": summary["rows"], "before_compaction": before, "after_compaction": after,
            "failed_rows": failed, "ok": killer.killed is not None and after["lost"] == 0 and after["duplicated"] == 0}


def engine_died(config: Config, run: RunDir, users: int = 24) -> dict[str, Any]:
    """The users job on the run's first users with vLLM; the engine core under the actor is SIGKILLed
    after the first shard: the actor must be replaced and the batch run again."""
    cfg = config.model_copy(deep=True)
    cfg.llm.backend = "vllm"
    cfg.extract.batch_size = max(1, users // 3)
    # one batch's programs at a time: the first shard then lands with two batches still to run, so the
    # kill finds the engine at work (with every batch in flight, the first shard came as the job ended)
    cfg.extract.in_flight = cfg.extract.batch_size
    tmp = _copy_prepared(cfg, run)
    folder = Path(tmp / PROGRAMS["users"].folder)
    try:
        started = time.perf_counter()
        with Killer("EngineCore", lambda: bool(shard_files(folder))) as killer:
            summary = extract_users(cfg, tmp, force=True, limit=users)
        latest = read_shards(folder)
        user_ids = set(latest["user_idx"].astype(int))
        accounting = row_accounting(folder, PROGRAMS["users"].key,
                                    {(u, h) for u in user_ids for h in ("train", "valid", "test")})
        failed = int((latest["status"] != "ok").sum())
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
    return {"users": users, "killed": killer.killed, "seconds": round(time.perf_counter() - started, 2),
            "rows": summary["rows_in_folder"], "failed_rows": failed, **{"accounting": accounting},
            "ok": killer.killed is not None and failed == 0 and accounting["duplicated"] == 0
            and summary["rows_in_folder"] == 3 * users}


def checkpoint_written(root: Path, staging: str) -> Callable[[], bool]:
    """A `Killer` condition: Ray Train has written a checkpoint under the stage's staging folder(s)
    `staging` (a glob below `root`), a few seconds ago, so that the controller has registered it."""
    seen: list[float] = []

    def ready() -> bool:
        if not seen and any(Path(root).glob(f"{staging}/.ray/**/checkpoint_*")):
            seen.append(time.perf_counter())
        return bool(seen) and time.perf_counter() - seen[0] > 3.0

    return ready


def train_worker_killed(config: Config, run: RunDir, variant: str = "none/random") -> dict[str, Any]:
    """A SASRec fit on Ray Train (checkpoint every 2 epochs); its worker SIGKILLed once the first
    checkpoint is written: the fit must resume after that checkpoint's epoch."""
    cfg = config.model_copy(deep=True)
    cfg.retriever.trainer, cfg.retriever.checkpoint_every = "ray", 2
    tmp = _copy_prepared(cfg, run)
    try:
        started = time.perf_counter()
        with Killer("RayTrainWorker", checkpoint_written(tmp.root, "retriever/.*partial*")) as killer:
            summary = train_variant(cfg, tmp, variant, force=True)
        history = json.loads((Path(summary["folder"]) / "history.json").read_text())
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
    resumed = [h["epoch"] for h in history if h.get("resumed")]
    return {"variant": variant, "killed": killer.killed, "seconds": round(time.perf_counter() - started, 2),
            "epochs": len(history), "resumed_at_epoch": resumed[0] if resumed else None,
            "best_epoch": summary["best_epoch"], "test_ndcg@10": summary["ndcg@10"],
            "ok": killer.killed is not None and bool(resumed) and resumed[0] > 0
            and [h["epoch"] for h in history] == list(range(len(history)))}


def finetune_worker_killed(config: Config, run: RunDir, variant: str = "none/random") -> dict[str, Any]:
    """The `llm` ranker's fine-tune on 2 Ray Train workers (a checkpoint every epoch); a worker SIGKILLed
    once the first checkpoint is written: the group must resume after that epoch, not from the base model."""
    cfg = config.model_copy(deep=True)
    cfg.retriever.trainer = "local"
    # Every user and two prefix positions each: the fine-tune keeps only lists whose target the
    # retriever found, and on a small real run that is a few of each user's lists; two lists are what
    # two workers with micro-batches of 1 need to each take a step.
    for key, value in {"trainer": "ray", "num_workers": 2, "epochs": 3, "max_train_users": None, "val_lists": 2,
                       "prefix_lists": 2, "min_train_lists": 2, "batch_size": 2, "micro_batch": 1}.items():
        setattr(cfg.ranker, key, value)
    tmp = _copy_prepared(cfg, run)
    try:
        train_variant(cfg, tmp, variant)  # the candidates the ranker trains on
        started = time.perf_counter()
        with Killer("RayTrainWorker", checkpoint_written(tmp.root, "ranker/*/.model.partial*")) as killer:
            summary = ranker_train(cfg, tmp, variant, "llm", force=True)
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
    if "not_trained" in summary:
        raise CotrecError(f"bench faults: finetune: {summary['not_trained']}")
    resumed = summary["resumed_after_epoch"]
    return {"variant": variant, "prompt": "llm", "killed": killer.killed, "seconds": round(time.perf_counter() - started, 2),
            "epochs": summary["epochs"], "curve_epochs": [c["epoch"] for c in summary["curve"]],
            "resumed_at_epoch": resumed, "best_epoch": summary["best_epoch"],
            "ok": killer.killed is not None and bool(resumed) and resumed > 0
            and [c["epoch"] for c in summary["curve"]] == list(range(summary["epochs"] + 1))}


def replica_killed(run: RunDir, variant: str, seconds: float = 30.0, concurrency: int = 8) -> dict[str, Any]:
    """Retrieval-only load on the Serve chain; the Ingress replica (retrieval runs in it) SIGKILLed a
    third of the way in."""
    user_ids = pd.read_parquet(Path(run / DATA_DIR / "users.parquet"), columns=["user_id"])["user_id"].astype(str).tolist()
    records: list[tuple[float, float, int]] = []  # sent, answered (seconds into the load), HTTP status (0: none)
    url = start_app(run.root, variant, "none", port=free_port())
    try:
        t0 = time.perf_counter()
        with Killer("ServeReplica:cotrec:Ingress", lambda: time.perf_counter() - t0 > seconds / 3) as killer:
            killer.t0 = t0

            async def load() -> None:
                rng = np.random.default_rng(0)
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    async def worker() -> None:
                        while time.perf_counter() - t0 < seconds:
                            sent = time.perf_counter() - t0
                            body = {"user_id": user_ids[int(rng.integers(len(user_ids)))], "k": 10}
                            try:
                                status = (await client.post("/recommend", json=body)).status_code
                            except httpx.HTTPError:
                                status = 0
                            records.append((sent, time.perf_counter() - t0, status))
                    await asyncio.gather(*(worker() for _ in range(concurrency)))

            asyncio.run(load())
    finally:
        stop_app()
    kill = killer.killed["at_s"] if killer.killed else seconds
    failed = [r for r in records if r[2] != 200]
    after = [r for r in records if r[0] >= kill]
    first_ok = min((done for sent, done, status in after if status == 200), default=None)
    return {"seconds": seconds, "concurrency": concurrency, "killed": killer.killed, "requests": len(records),
            "failed": len(failed), "failed_in_flight_at_kill": sum(1 for r in failed if r[0] < kill <= r[1]),
            "failed_sent_after_kill": sum(1 for r in failed if r[0] >= kill),
            "answered_after_kill_s": round(first_ok - kill, 2) if first_ok is not None else None,
            "max_latency_after_kill_s": round(max((done - sent for sent, done, _ in after), default=0.0), 2),
            "status_codes": {str(code): sum(1 for r in records if r[2] == code) for code in sorted({r[2] for r in records})},
            # the proxy does not resend an HTTP request whose replica died: only those it held may fail
            "ok": killer.killed is not None and not [r for r in failed if r[0] >= kill] and bool(after)}


def driver_killed(config: Config, run: RunDir) -> dict[str, Any]:
    """`cotrec extract users` (zero-latency engine) SIGKILLed with its Ray after its first shard, then
    run again: it must write only what was missing."""
    tmp = _copy_prepared(config, run)
    folder = Path(tmp / PROGRAMS["users"].folder)
    command = [sys.executable, "-m", "cotrec", "extract", "users", "--run-dir", str(tmp.root), "--config",
               str(tmp / "config.yaml"), "--set", "llm.backend=zero-latency", "--set", "extract.batch_size=64",
               "--set", "extract.max_actors=1"]
    try:
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while not shard_files(folder) and time.time() < deadline and job.poll() is None:
            time.sleep(0.05)
        killed_with = len(shard_files(folder))
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started: its whole session
        job.wait()
        before = read_shards(folder, ["user_idx"])["user_idx"].nunique()
        rerun = subprocess.run(command, capture_output=True, text=True)
        users = pd.read_parquet(Path(tmp / DATA_DIR / "users.parquet"), columns=["user_idx"])
        expected = {(int(u), h) for u in users["user_idx"] for h in ("train", "valid", "test")}
        accounting = row_accounting(folder, PROGRAMS["users"].key, expected)
    finally:
        shutil.rmtree(tmp.root, ignore_errors=True)
    return {"shards_when_killed": killed_with, "users_done_before": int(before), "rerun_exit": rerun.returncode,
            "accounting": accounting,
            "ok": rerun.returncode == 0 and accounting["lost"] == 0 and accounting["duplicated"] == 0}


def _copy_prepared(config: Config, run: RunDir) -> RunDir:
    """A temporary run directory holding the run's prepared data (prepared first when missing)."""
    prepare(config, run)
    tmp = RunDir(tempfile.mkdtemp(prefix="cotrec-faults-"))
    shutil.copytree(run / DATA_DIR, tmp / DATA_DIR)
    tmp.write_config(config)
    return tmp


# -- the bench -------------------------------------------------------------------------------------
def bench_faults(config: Config, run: RunDir, scenarios: tuple[str, ...] = SCENARIOS, variant: str = "none/random",
                 actor_users: int = 200_000, out: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    report: dict[str, Any] = {**stamp("faults", 1), "machine": machine(), "run_dir": str(run.root), "results": {}}
    started_ray = ensure_ray(runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    try:
        for scenario in scenarios:
            log(f"bench faults: {scenario}")
            started = time.perf_counter()
            if scenario == "actor":
                result = actor_killed(config, actor_users)
            elif scenario == "engine":
                result = engine_died(config, run)
            elif scenario == "train":
                result = train_worker_killed(config, run, variant)
            elif scenario == "finetune":
                result = finetune_worker_killed(config, run, variant)
            elif scenario == "replica":
                train_variant(config, run, variant)  # the served retriever (skipped when it is there)
                result = replica_killed(run, variant)
            else:
                result = driver_killed(config, run)
            report["results"][scenario] = {**result, "wall_s": round(time.perf_counter() - started, 1)}
            write_json(Path(out), report)
    finally:
        if started_ray:
            ray.shutdown()
    report["all_ok"] = all(r["ok"] for r in report["results"].values())
    write_json(Path(out), report)
    return report


def format_bench(report: dict[str, Any]) -> str:
    lines = []
    for name, r in report["results"].items():
        detail = {"actor": lambda: f"lost {r['after_compaction']['lost']}, duplicated {r['after_compaction']['duplicated']} "
                                   f"(before compaction: {r['before_compaction']['duplicated']} duplicated)",
                  "engine": lambda: f"{r['rows']} rows, {r['failed_rows']} failed, {r['accounting']['duplicated']} duplicated",
                  "train": lambda: f"resumed at epoch {r['resumed_at_epoch']} of {r['epochs']}",
                  "finetune": lambda: f"resumed at epoch {r['resumed_at_epoch']} of {r['epochs']}",
                  "replica": lambda: f"{r['failed']} of {r['requests']} requests failed; the first request sent after "
                                     f"the kill answered {r['answered_after_kill_s']} s after it",
                  "driver": lambda: f"lost {r['accounting']['lost']}, duplicated {r['accounting']['duplicated']}"}[name]()
        lines.append(f"{name:<8} {'ok' if r['ok'] else 'FAILED':<7} {detail}  ({r['wall_s']:.0f} s)")
    return "\n".join(lines)
