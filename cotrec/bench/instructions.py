"""Instructions per user of the users job's actor: a count that this machine's noise does not move.

Wall-clock timings on a shared VM move too much between runs minutes apart to tell a small
change in the runner's cost per user. This counts instructions instead, with valgrind
(cachegrind, no cache simulation, a fixed hash seed): one `ExtractWorker` (the users job's Ray
Data actor, here called directly, without Ray) on the zero-latency engine takes SYNTHETIC users
(the scale bench's) in batches, converts them, runs their programs and writes their shards. It is
run twice, over `warm` users and over `warm + users` users, and the difference is divided by
`users`, so start-up, imports and the first batches cancel out.

    python -m cotrec.bench.instructions [--users 4000]

Needs valgrind on the PATH (it is not a test: CI does not run it). Run it from another checkout's
root with that checkout on PYTHONPATH to count an older version the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from cotrec.bench.extract import bench_config
from cotrec.bench.extract_scale import SCALE_SETTINGS, scale_config, synthetic_labels, synthetic_user_rows
from cotrec.extract.runner import ExtractWorker

WARM_USERS = 2000


def run_users(users: int, total: int) -> None:
    """The counted work: the first `users` of `total` synthetic users through one ExtractWorker."""
    config = scale_config(bench_config(None), SCALE_SETTINGS)
    table = pa.Table.from_pandas(synthetic_user_rows(total), preserve_index=False)  # the same set-up in both runs
    folder = tempfile.mkdtemp(prefix="cotrec-instructions-")
    worker = ExtractWorker("users", config.llm.model_dump(mode="json"), config.extract.model_dump(mode="json"),
                           "movie", folder, synthetic_labels())
    try:
        size = config.extract.batch_size
        for start in range(0, users, size):
            asyncio.run(worker(table.slice(start, min(size, users - start))))
    finally:
        worker.engine.close()
        shutil.rmtree(folder, ignore_errors=True)


def count(users: int, total: int) -> int:
    """Instructions valgrind counts for `run_users(users, total)` in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cachegrind.out"
        # This file run by path, so that the cotrec it counts is the one on PYTHONPATH / in the
        # current directory (another checkout's), which need not have this module.
        inner = (f"import runpy, sys; sys.argv = ['instructions', '--inner', '{users}', '{total}']; "
                 f"runpy.run_path({__file__!r}, run_name='__main__')")
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}", "-q",
                   sys.executable, "-c", inner]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONHASHSEED": "0"})
        summary = next(line for line in out.read_text().splitlines() if line.startswith("summary:"))
        return int(summary.split()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4000, help="users counted (after the warm ones)")
    parser.add_argument("--inner", nargs=2, type=int, metavar=("USERS", "TOTAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        run_users(*args.inner)
        return 0
    if shutil.which("valgrind") is None:
        print("cotrec.bench.instructions: valgrind is not on the PATH", file=sys.stderr)
        return 2
    total = WARM_USERS + args.users
    warm, counted = count(WARM_USERS, total), count(total, total)
    print(f"{(counted - warm) / args.users:,.0f} instructions per user "
          f"({args.users:,} synthetic users after {WARM_USERS:,}, one ExtractWorker, zero-latency engine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
