"""Shared fixtures. Real data comes from the cache (COTREC_CACHE, fetched once per machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


# `make test` runs the suite on two xdist workers with the scheduler below. Each test file is one
# unit of work, so its module fixtures are built once. The tests named here keep both cores busy with
# processes that wait on each other (Ray Train groups, DeepSpeed, the learnability fine-tunes): two of
# them side by side each take several times as long, so they form one unit of their own, queued
# first, and run one after another while the other worker takes the files.
CPU_BOUND_TESTS = (
    "tests/test_finetune.py::test_the_loop_learns_a_learnable_ranking_and_nothing_from_shuffled_answers",
    "tests/test_finetune.py::test_the_probe_finds_what_the_frozen_model_encodes_and_says_nothing_it_cannot",
    "tests/test_ranker.py::test_table2_fine_tunes_with_deepspeed_on_two_ray_workers_and_ranks_with_vllm",
    "tests/test_ranker.py::test_a_float32_fine_tune_on_two_ray_workers_moves_the_model_and_the_merge_keeps_it",
    "tests/test_retriever.py::test_ray_train_two_workers_match_one",
    "tests/test_retriever.py::test_ray_train_workers_read_equal_shards_of_the_training_rows_dataset",
    "tests/test_retriever.py::test_the_grid_trains_two_at_once_and_each_learns_what_it_learns_alone",
    "tests/test_retriever.py::test_a_train_worker_killed_mid_fit_resumes_from_its_last_checkpoint",
    "tests/test_storage.py::test_the_main_job_on_a_multi_node_cluster_places_its_stages_survives_a_lost_node_"
    "resumes_after_a_kill_and_reruns_as_skips",
)


def _cpu_bound(nodeid: str) -> bool:
    return nodeid.split("[", 1)[0] in CPU_BOUND_TESTS


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The CPU-bound tests first (the scheduler queues units in the order the workers collected
    them); a name in CPU_BOUND_TESTS that is no test of a collected file is an error."""
    collected = {item.nodeid.split("[", 1)[0] for item in items}
    files = {nodeid.split("::", 1)[0] for nodeid in collected}
    stale = [name for name in CPU_BOUND_TESTS if name.split("::", 1)[0] in files and name not in collected]
    if stale:
        pytest.exit(f"tests/conftest.py: CPU_BOUND_TESTS names {stale[0]}, which is no test",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    if hasattr(config, "workerinput"):  # an xdist worker; a plain run keeps the files' order
        items.sort(key=lambda item: not _cpu_bound(item.nodeid))  # stable: the files keep their order


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class CpuBoundFirst(LoadScopeScheduling):
        """A unit per test file, and one for the CPU-bound tests, queued in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return "cpu-bound" if _cpu_bound(nodeid) else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False
    return CpuBoundFirst(config, log)


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
