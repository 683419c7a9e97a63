"""JSON-constrained prompts for the engine tests: keywords of a few movies, and their schema."""

from __future__ import annotations

import random

from cotrec.bench.prompts import history


def keyword_conversations(count: int, seed: int = 1) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": "Movies: " + ", ".join(history(rng, 5))
              + ". Give 3 keywords describing these movies' genres as JSON."}] for _ in range(count)]


KEYWORDS_SCHEMA = {
    "type": "object",
    "properties": {"keywords": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                "minItems": 1, "maxItems": 5}},
    "required": ["keywords"],
    "additionalProperties": False,
}
