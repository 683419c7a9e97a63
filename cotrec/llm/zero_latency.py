"""A zero-latency engine: no model, every reply instant and made from a digest of its prompt.

It exists to measure orchestration (the extraction runner's own overhead at a million users)
and to test orchestration paths; it is never a stand-in for results. Replies are a short sentence,
or the smallest value matching the JSON schema when one is given, whose words come from a digest
of the prompt: two prompts get different replies, so no cache downstream (an encoder's distinct
texts, a preference that repeats) can hide work a real model's varied replies would cause. Token
counts are rough (characters / 4, the roles' included): there is no tokenizer.
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


def prompt_text(conversation: Conversation) -> str:
    """Every message's role and content, with separators, so two conversations read alike only when
    their messages are the same."""
    return "\x1f".join([f"{m['role']}\x1e{m['content']}" for m in conversation])


def text_digest(text: str) -> bytes:
    hasher = _DIGEST.copy()
    hasher.update(text.encode())
    return hasher.digest()


def prompt_digest(conversation: Conversation) -> str:
    return text_digest(prompt_text(conversation)).hex()


def sentence_for(digest: bytes) -> str:
    """A sentence spelt out of a prompt's digest: the same for the same prompt."""
    return (f"Likes {TASTES[digest[0] % 8]} {KINDS[digest[1] % 8]} and {TASTES[digest[2] % 8]} "
            f"{KINDS[digest[3] % 8]} (taste {digest[4:].hex()}).")


def reply_for(conversation: Conversation) -> str:
    """A sentence that varies with the prompt (its digest spelt out), the same for the same prompt."""
    return sentence_for(text_digest(prompt_text(conversation)))


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


class ZeroLatencyEngine(LLMEngine):
    backend = "zero-latency"

    def __init__(self, config: LLMConfig):
        super().__init__(config, model_name="zero-latency")

    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        replies = []
        for conversation in conversations:  # one pass over the prompt: its digest and its length
            prompt = prompt_text(conversation)
            digest = text_digest(prompt)
            text = (sentence_for(digest) if json_schema is None else
                    json.dumps(smallest_instance(json_schema, f"term {digest.hex()[:6]}")))
            replies.append(Generation(text, finish_reason="stop", prompt_tokens=len(prompt) // 4,
                                      completion_tokens=len(text) // 4))
        return replies

    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]:
        uniform = np.full(len(choices), 1.0 / len(choices))
        return [ChoiceScores(list(choices), uniform.copy()) for _ in conversations]
