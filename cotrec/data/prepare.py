"""The `prepare` stage: raw source -> `<run>/data/{interactions,items,users}.parquet, stats.json`."""

from __future__ import annotations

import time

from cotrec.config import Config
from cotrec.data.preprocess import preprocess
from cotrec.data.sources import load_source
from cotrec.progress import log
from cotrec.rundir import DATA_DIR, DatasetStats, RunDir, read_stats, write_json


class PrepareSummary(DatasetStats, total=False):
    """`prepare`'s result: the dataset's stats, and whether it was already up to date."""

    skipped: bool


def prepare(config: Config, run: RunDir, force: bool = False) -> PrepareSummary:
    """Load, filter and split the configured dataset; skipped when already done for this config."""
    fingerprint = config.fingerprint("data")
    if not force and run.is_complete(DATA_DIR, fingerprint):
        stats = read_stats(run)
        log(f"prepare: {run / DATA_DIR} is up to date; skipped")
        return {"skipped": True, **stats}
    started = time.perf_counter()
    log(f"prepare: loading {config.data.source}")
    raw = load_source(config.data)
    loaded = time.perf_counter()
    log(f"prepare: loaded {len(raw.interactions):,} interactions in {loaded - started:.1f} s; filtering")
    prepared = preprocess(raw, config.data)
    prepared.stats["files"] = raw.files
    with run.staged(DATA_DIR, fingerprint) as folder:
        prepared.interactions.to_parquet(str(folder / "interactions.parquet"), index=False)
        prepared.items.to_parquet(str(folder / "items.parquet"), index=False)
        prepared.users.to_parquet(str(folder / "users.parquet"), index=False)
        prepared.stats["seconds"] = round(time.perf_counter() - started, 3)
        write_json(folder / "stats.json", prepared.stats)
    return {"skipped": False, **prepared.stats}


def format_summary(stats: PrepareSummary) -> str:
    lengths = stats["history_length"]
    lines = [
        f"dataset       {stats['dataset']} ({stats['domain']})" + ("  [up to date, skipped]" if stats.get("skipped") else ""),
        f"users         {stats['users']:,}",
        f"items         {stats['items']:,}",
        f"interactions  {stats['interactions']:,}  (raw {stats['raw_interactions']:,}; "
        f"{stats['k_core']}-core in {stats['k_core_rounds']} rounds)",
        f"history       mean {lengths['mean']:.1f}, median {lengths['median']:.0f}, "
        f"min {lengths['min']}, max {lengths['max']}",
        f"density       {stats['density']:.4%}",
    ]
    if "sample" in stats:
        lines.append(f"sample        {stats['sample']['users']} of {stats['sample']['from_users']:,} users "
                     f"(seed {stats['sample']['seed']})"
                     + (f", then {stats['sample']['k_core']}-core within the sample" if "k_core" in stats["sample"] else ""))
    lines.append(f"time          {stats['seconds']:.1f} s")
    return "\n".join(lines)
