"""`cotrec bench retriever`: SASRec's training-row schemes side by side, masked and unmasked, over seeds.

Each scheme is a `retriever.train_stride` (rows end every `stride` items; `max_len` = disjoint
windows, 1 = every prefix), plus the previous default (disjoint windows, a feed-forward as wide as
the model, patience 5) as a reference. Every (scheme, history masking, seed) trains the variant
afresh in a temporary copy of the run's prepared data with the configured trainer, and records test
and valid NDCG@10 / Hit@10, the best epoch, the time to it, epochs run and training targets per
second. A popularity ranking (no model) is the "no signal" row. Figures are per seed and as mean,
std, min and max over the seeds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cotrec.bench.common import load_average, machine, stamp
from cotrec.config import Config
from cotrec.data.prepare import prepare
from cotrec.metrics import ranking_metrics
from cotrec.progress import log
from cotrec.retriever.data import Sequences
from cotrec.retriever.stage import train_variant
from cotrec.rundir import DATA_DIR, RunDir, read_table, write_json

DEFAULT_OUT = "bench/retriever.json"
PREVIOUS_DEFAULT = {"train_stride": None, "ffn_mult": 1, "patience": 5}  # None: max_len (disjoint windows)
SUMMARISED = ("test_ndcg@10", "test_hit@10", "valid_ndcg@10", "valid_hit@10", "best_epoch", "epochs",
              "time_to_best_s", "wall_s", "targets_per_s")


def scheme_settings(name: str, max_len: int) -> dict[str, Any]:
    """`previous` (the reference), or `stride<N>`; `disjoint` is stride max_len, `prefix` stride 1."""
    if name == "previous":
        return {**PREVIOUS_DEFAULT, "train_stride": max_len}
    stride = {"disjoint": max_len, "prefix": 1}.get(name)
    if stride is None:
        if not name.startswith("stride") or not name[len("stride"):].isdigit():
            raise ValueError(f"scheme {name!r}: previous, disjoint, prefix or stride<N>")
        stride = int(name[len("stride"):])
    return {"train_stride": stride}


def popularity_floor(run: RunDir, mask: bool) -> dict[str, float]:
    """Test Hit@10 / NDCG@10 of ranking every item by its train popularity: no model, no signal."""
    items = read_table(run, "items")
    seqs = Sequences.from_interactions(read_table(run, "interactions"), num_items=len(items))
    counts = np.bincount(np.concatenate(seqs.train), minlength=seqs.num_items).astype(np.float64)
    ranks = []
    for user in range(seqs.num_users):
        scores = counts.copy()
        if mask:
            scores[seqs.history("test", user)] = -np.inf
        target = seqs.test[user]
        ranks.append(int((scores > scores[target]).sum()) if np.isfinite(scores[target]) else seqs.num_items)
    metrics = ranking_metrics(np.asarray(ranks), [10])
    return {"test_ndcg@10": metrics["ndcg@10"], "test_hit@10": metrics["hit@10"]}


def train_once(config: Config, data: Path, variant: str, seed: int) -> dict[str, Any]:
    run = RunDir(tempfile.mkdtemp(prefix="cotrec-bench-retriever-"))
    try:
        shutil.copytree(data, run / DATA_DIR)
        run.write_config(config)
        summary = train_variant(config, run, variant, seed=seed, force=True)
        history = json.loads((Path(summary["folder"]) / "history.json").read_text())
        items = read_table(run, "interactions")
        targets = int((items["split"] == "train").sum()) - items["user_idx"].nunique() * int(variant.startswith("none"))
    finally:
        shutil.rmtree(run.root, ignore_errors=True)
    best = summary["best_epoch"]
    train_s = sum(h["train_seconds"] for h in history)
    return {"seed": seed, "test_ndcg@10": summary["ndcg@10"], "test_hit@10": summary["hit@10"],
            "valid_ndcg@10": summary["valid"]["ndcg@10"], "valid_hit@10": summary["valid"]["hit@10"],
            "best_epoch": best, "epochs": len(history),
            "time_to_best_s": round(next(h["elapsed"] for h in history if h["epoch"] == best), 2),
            "wall_s": summary["wall_seconds"], "targets_per_s": round(targets * len(history) / max(train_s, 1e-9), 1),
            "hit_max_epochs": len(history) == config.retriever.max_epochs}


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in SUMMARISED:
        values = np.asarray([r[key] for r in rows], dtype=np.float64)
        out[key] = {"mean": round(float(values.mean()), 5), "std": round(float(values.std(ddof=1)), 5) if len(values) > 1 else 0.0,
                    "min": round(float(values.min()), 5), "median": round(float(np.median(values)), 5),
                    "max": round(float(values.max()), 5)}
    return out


def bench_retriever(config: Config, run: RunDir, variant: str = "none/random",
                    schemes: tuple[str, ...] = ("previous", "disjoint", "stride8", "stride4", "prefix"),
                    masks: tuple[bool, ...] = (False, True), seeds: int = 3,
                    out: str | Path = DEFAULT_OUT) -> dict[str, Any]:
    prepare(config, run)
    started = time.perf_counter()
    report: dict[str, Any] = {**stamp("retriever", seeds), "dataset": config.data.source, "variant": variant,
                              "machine": machine(), "seeds": [config.seed + i for i in range(seeds)],
                              "retriever": config.retriever.model_dump(mode="json"), "schemes": {},
                              "popularity": {("masked" if m else "unmasked"): popularity_floor(run, m) for m in masks}}
    for name in schemes:
        settings = scheme_settings(name, config.retriever.max_len)
        for mask in masks:
            key = f"{name} {'masked' if mask else 'unmasked'}"
            scheme_config = config.model_copy(deep=True)
            for field, value in {**settings, "mask_history": mask}.items():
                setattr(scheme_config.retriever, field, value)
            rows = []
            for seed in report["seeds"]:
                log(f"bench retriever: {key}, seed {seed}")
                rows.append({**train_once(scheme_config, Path(run / DATA_DIR), variant, seed),
                             "load_avg_after": load_average()})
            report["schemes"][key] = {"settings": {**settings, "mask_history": mask}, "runs": rows, **spread(rows)}
            write_json(Path(out), report)  # a long bench: what is measured is kept as it goes
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(Path(out), report)
    return report


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"retriever bench  {report['dataset']} {report['variant']}, seeds {report['seeds']} (mean ± std)",
             f"{'scheme':<22}{'test NDCG@10':>18}{'test Hit@10':>18}{'valid NDCG@10':>18}{'best epoch':>12}"
             f"{'to best (s)':>13}{'targets/s':>11}"]
    for name, row in report["schemes"].items():
        cell = lambda k, f="{:.4f}": f"{f.format(row[k]['mean'])} ± {f.format(row[k]['std'])}"  # noqa: E731
        lines.append(f"{name:<22}{cell('test_ndcg@10'):>18}{cell('test_hit@10'):>18}{cell('valid_ndcg@10'):>18}"
                     f"{row['best_epoch']['mean']:>12.1f}{row['time_to_best_s']['mean']:>13.0f}"
                     f"{row['targets_per_s']['mean']:>11,.0f}")
    for mask, floor in report["popularity"].items():
        lines.append(f"{'popularity ' + mask:<22}{floor['test_ndcg@10']:>18.4f}{floor['test_hit@10']:>18.4f}")
    return "\n".join(lines)
