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


@pytest.fixture(scope="session")
def vllm_engine():
    """One vLLM engine (embedded model, CPU, eager) shared by the whole session."""
    from cotrec.config import LLMConfig
    from cotrec.llm import make_engine

    engine = make_engine(LLMConfig(backend="vllm"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def transformers_engine():
    from cotrec.config import LLMConfig
    from cotrec.llm import make_engine

    engine = make_engine(LLMConfig(backend="transformers"))
    yield engine
    engine.close()
