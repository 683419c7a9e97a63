"""Shared fixtures. Real data comes from the cache (COTREC_CACHE, fetched once per machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    share_cores_among_xdist_workers()


def share_cores_among_xdist_workers() -> None:
    """Under `pytest -n N`, give each worker its own share of the cores this run may use. Each
    worker's engines, trainers and Ray processes size their threads from the cores they are allowed
    (OpenMP, vLLM's binding, Ray's CPU shares), so unshared, two workers run twice the threads the
    cores have and OpenMP's barriers wait on threads the other worker has descheduled."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:  # fewer cores than workers: nothing to share out
        return
    os.sched_setaffinity(0, cores[int(worker[2:]) % count::count])


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m cotrec ...` as a user would, capturing its output."""
    return subprocess.run([sys.executable, "-m", "cotrec", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


# Tests that compare model numerics (one engine against another, one run against another) run the
# model in float32: `dtype: auto` picks bfloat16 on CPUs with AVX512-BF16 or AMX, whose kernels
# differ from machine to machine, and the suite must hold on any x86-64 CPU it lands on.
FLOAT32 = "llm.dtype=float32"


@pytest.fixture(scope="session")
def vllm_engine():
    """One vLLM engine (embedded model, CPU, eager, float32) shared by the whole session."""
    from cotrec.config import LLMConfig
    from cotrec.llm import make_engine

    engine = make_engine(LLMConfig(backend="vllm", dtype="float32"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def transformers_engine():
    from cotrec.config import LLMConfig
    from cotrec.llm import make_engine

    engine = make_engine(LLMConfig(backend="transformers", dtype="float32"))
    yield engine
    engine.close()


# The test process holds native libraries' threads (vLLM, torch, Ray clients) until the interpreter
# tears down, and that teardown can crash after every test has passed and the summary is printed
# (CI of this change: "135 passed", then make: Segmentation fault). Once pytest is done, leave with
# its exit status and without the teardown; a crash during the tests still fails the run.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
