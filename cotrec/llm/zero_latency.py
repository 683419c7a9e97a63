"""A zero-latency engine: no model, every reply is instant and fixed.

It exists to measure orchestration (the extraction runner's own overhead at a million users)
and to test orchestration paths; it is never a stand-in for results. Replies are a short fixed
sentence, or the smallest value matching the JSON schema when one is given. Token counts are
rough (characters / 4): there is no tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cotrec.config import LLMConfig
from cotrec.llm.base import ChoiceScores, Conversation, Generation, LLMEngine, SamplingSettings

REPLY = "Likes light comedies and character-driven dramas."


def smallest_instance(schema: dict[str, Any]) -> Any:
    """The smallest value of a (simple) JSON schema: required keys only, minItems items."""
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {key: smallest_instance(properties.get(key, {})) for key in schema.get("required", [])}
    if kind == "array":
        return [smallest_instance(schema.get("items", {})) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    return "term"


def _chars(conversation: Conversation) -> int:
    return sum([len(message["content"]) for message in conversation])


class ZeroLatencyEngine(LLMEngine):
    backend = "zero-latency"

    def __init__(self, config: LLMConfig):
        super().__init__(config, model_name="zero-latency")

    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        text = REPLY if json_schema is None else json.dumps(smallest_instance(json_schema))
        completion_tokens = len(text) // 4
        return [Generation(text, finish_reason="stop", prompt_tokens=_chars(c) // 4, completion_tokens=completion_tokens)
                for c in conversations]

    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]:
        uniform = np.full(len(choices), 1.0 / len(choices))
        return [ChoiceScores(list(choices), uniform.copy()) for _ in conversations]
