"""LLM engines behind one interface (see `cotrec.llm.base`), chosen by `llm.backend`."""

from __future__ import annotations

import time
from typing import Any

from cotrec.config import LLMConfig
from cotrec.llm.base import ChoiceScores, Conversation, Generation, LLMEngine, SamplingSettings
from cotrec.llm.placement import give_engine_every_core

__all__ = ["ChoiceScores", "Conversation", "Generation", "LLMEngine", "SamplingSettings", "make_engine",
           "load_actor_engine", "letters"]


def make_engine(config: LLMConfig) -> LLMEngine:
    """Start the configured engine (imports only the backend it needs)."""
    if config.backend == "vllm":
        from cotrec.llm.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    if config.backend == "transformers":
        from cotrec.llm.transformers_engine import TransformersEngine

        return TransformersEngine(config)
    if config.backend == "zero-latency":
        from cotrec.llm.zero_latency import ZeroLatencyEngine

        return ZeroLatencyEngine(config)
    from cotrec.llm.http_engine import HTTPEngine

    return HTTPEngine(config)


def load_actor_engine(llm: dict[str, Any]) -> tuple[LLMEngine, float]:
    """A Ray Data actor's engine, from its LLM config as a dict, and the seconds its load took."""
    llm_config = LLMConfig.model_validate(llm)
    give_engine_every_core(llm_config)
    started = time.perf_counter()
    engine = make_engine(llm_config)
    return engine, time.perf_counter() - started


def letters(count: int) -> list[str]:
    """The index letters A, B, C, ... used to label candidates."""
    if not 1 <= count <= 26:
        raise ValueError(f"between 1 and 26 choices, got {count}")
    return [chr(ord("A") + i) for i in range(count)]
