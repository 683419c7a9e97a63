"""LLM engines behind one interface (see `cotrec.llm.base`), chosen by `llm.backend`."""

from __future__ import annotations

from cotrec.config import LLMConfig
from cotrec.llm.base import ChoiceScores, Conversation, Generation, LLMEngine, SamplingSettings

__all__ = ["ChoiceScores", "Conversation", "Generation", "LLMEngine", "SamplingSettings", "make_engine",
           "letters"]


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


def letters(count: int) -> list[str]:
    """The index letters A, B, C, ... used to label candidates."""
    if not 1 <= count <= 26:
        raise ValueError(f"between 1 and 26 choices, got {count}")
    return [chr(ord("A") + i) for i in range(count)]
