"""`cotrec bench retriever`: epoch time, time to the best epoch, peak memory, evaluation users/s.

Trains one variant afresh (force) in the given run directory with the configured trainer and
writes the figures, with the machine and config they were measured on, to a JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from cotrec.config import Config
from cotrec.data.prepare import prepare
from cotrec.retriever.stage import train_variant
from cotrec.rundir import RunDir, write_json

DEFAULT_OUT = "bench/retriever.json"


def bench_retriever(config: Config, run: RunDir, variant: str = "none/random",
                    out: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    prepare(config, run)
    started = time.perf_counter()
    summary = train_variant(config, run, variant, force=True)
    wall = time.perf_counter() - started
    history = json.loads((Path(summary["folder"]) / "history.json").read_text())
    best = summary["best_epoch"]
    epoch_seconds = [h["train_seconds"] for h in history]
    figures = {
        "benchmark": "retriever",
        "dataset": config.data.source,
        "variant": summary["variant"],
        "trainer": config.retriever.trainer,
        "num_workers": config.retriever.num_workers,
        "loss": config.retriever.loss,
        "users": summary["users"],
        "epochs": len(history),
        "best_epoch": best,
        "epoch_seconds_mean": float(np.mean(epoch_seconds)),
        "epoch_seconds_median": float(np.median(epoch_seconds)),
        "valid_eval_seconds_mean": float(np.mean([h["eval_seconds"] for h in history])),
        # Seconds from the start of the training loop to the end of the best epoch's evaluation.
        "time_to_best_epoch_seconds": float(history[best]["elapsed"]),
        "train_wall_seconds": summary["train_seconds"],
        "stage_wall_seconds": round(wall, 3),
        "peak_memory_mb": summary["peak_memory_mb"],
        "eval_users_per_second": summary["eval_users_per_second"],
        "test_ndcg@10": summary["ndcg@10"],
        "test_hit@10": summary["hit@10"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": config.retriever.model_dump(mode="json"),
    }
    write_json(Path(out), figures)
    return figures


def format_bench(figures: dict[str, Any]) -> str:
    return "\n".join([
        f"retriever bench  {figures['dataset']} {figures['variant']} ({figures['trainer']}, "
        f"{figures['num_workers']} worker(s))",
        f"epoch            {figures['epoch_seconds_mean']:.2f} s mean, {figures['epoch_seconds_median']:.2f} s median"
        f" (+ {figures['valid_eval_seconds_mean']:.2f} s valid eval)",
        f"best epoch       {figures['best_epoch']} of {figures['epochs']}, reached after "
        f"{figures['time_to_best_epoch_seconds']:.1f} s",
        f"peak memory      {figures['peak_memory_mb']:.0f} MB",
        f"eval             {figures['eval_users_per_second']:.0f} users/s (test, full ranking)",
        f"test ndcg@10     {figures['test_ndcg@10']:.4f}",
    ])
