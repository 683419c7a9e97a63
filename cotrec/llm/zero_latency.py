"""A zero-latency engine: no model, every reply instant and made from a digest of its prompt.

It exists to measure orchestration (the extraction runner's own overhead at a million users)
and to test orchestration paths; it is never a stand-in for results. Replies are a short sentence,
or the smallest value matching the JSON schema when one is given, whose words come from a digest
of the prompt: two prompts get different replies, so no cache downstream (an encoder's distinct
texts, a preference that repeats) can hide work a real model's varied replies would cause. Token
counts are rough (characters / 4): there is no tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from cotrec.config import LLMConfig
from cotrec.llm.base import ChoiceScores, Conversation, Generation, LLMEngine, SamplingSettings

TASTES = ("light", "dark", "slow", "witty", "epic", "quiet", "tense", "warm")
KINDS = ("comedies", "dramas", "thrillers", "westerns", "musicals", "documentaries", "romances", "mysteries")


# Each digest copies this empty hasher (cheaper than a new blake2b, whose keywords are parsed per call).
_DIGEST = hashlib.blake2b(digest_size=8)


def prompt_bytes_digest(conversation: Conversation) -> bytes:
    """8 bytes that depend on every message's role and content (a unit separator between fields, so
    two conversations digest alike only when their messages are the same)."""
    hasher = _DIGEST.copy()
    hasher.update("\x1f".join([f"{m['role']}\x1e{m['content']}" for m in conversation]).encode())
    return hasher.digest()


def prompt_digest(conversation: Conversation) -> str:
    return prompt_bytes_digest(conversation).hex()


def reply_for(conversation: Conversation) -> str:
    """A sentence that varies with the prompt (its digest spelt out), the same for the same prompt."""
    digest = prompt_bytes_digest(conversation)
    return (f"Likes {TASTES[digest[0] % 8]} {KINDS[digest[1] % 8]} and {TASTES[digest[2] % 8]} "
            f"{KINDS[digest[3] % 8]} (taste {digest[4:].hex()}).")


def smallest_instance(schema: dict[str, Any], word: str = "term") -> Any:
    """The smallest value of a (simple) JSON schema: required keys only, minItems items, every
    string `word`."""
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {key: smallest_instance(properties.get(key, {}), word) for key in schema.get("required", [])}
    if kind == "array":
        return [smallest_instance(schema.get("items", {}), word) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return word


def _chars(conversation: Conversation) -> int:
    return sum([len(message["content"]) for message in conversation])


class ZeroLatencyEngine(LLMEngine):
    backend = "zero-latency"

    def __init__(self, config: LLMConfig):
        super().__init__(config, model_name="zero-latency")

    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        texts = [reply_for(c) if json_schema is None else
                 json.dumps(smallest_instance(json_schema, f"term {prompt_digest(c)[:6]}")) for c in conversations]
        return [Generation(text, finish_reason="stop", prompt_tokens=_chars(c) // 4, completion_tokens=len(text) // 4)
                for c, text in zip(conversations, texts)]

    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]:
        uniform = np.full(len(choices), 1.0 / len(choices))
        return [ChoiceScores(list(choices), uniform.copy()) for _ in conversations]
