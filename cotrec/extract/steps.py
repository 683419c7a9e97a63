"""One LLM step of an extraction program, with the program's bookkeeping and failure policy.

Every program (a user's recurrence, an item's description, a perception chain) makes its calls
through `Steps`, which counts calls and tokens for the run summary and turns replies into
(text, error) pairs so a program never raises on a bad reply:
- empty or unparsable replies are retried by the engine a bounded number of times, then
  reported as an error string;
- a free-text reply cut at its token budget is kept up to its last full sentence (retrying it
  would sample, and greedy runs would stop being reproducible);
- a prompt over the context length comes back as an error the caller may shorten and retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cotrec.llm.base import Conversation, Generation, LLMEngine, SamplingSettings


@dataclass(slots=True)
class StepStats:
    """What one program spent: LLM calls (retries included), tokens, failed steps."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def record(self, reply: Generation) -> None:
        self.calls += reply.attempts
        self.prompt_tokens += reply.prompt_tokens * reply.attempts
        self.completion_tokens += reply.completion_tokens

    def fail(self, error: str) -> None:
        self.errors.append(error)

    @property
    def last_error(self) -> str | None:
        return self.errors[-1] if self.errors else None


def is_context_overflow(reply: Generation) -> bool:
    return reply.status == "error" and "context" in (reply.error or "")


def trim_to_sentence(text: str, min_chars: int = 20) -> str:
    """Cut a truncated reply after its last full sentence, when that leaves enough text."""
    text = text.strip()
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if text.endswith((".", "!", "?")):
        return text
    return text[: cut + 1] if cut + 1 >= min_chars else text


class Steps:
    """The engine as an extraction program sees it."""

    def __init__(self, engine: LLMEngine, temperature: float = 0.0, repetition_penalty: float = 1.0):
        self.engine = engine
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty
        self._settings: dict[tuple[int, bool], SamplingSettings] = {}  # a program's few budgets, built once

    def settings(self, max_tokens: int, structured: bool) -> SamplingSettings:
        key = (max_tokens, structured)
        settings = self._settings.get(key)
        if settings is None:
            settings = self._settings[key] = SamplingSettings(
                max_tokens=max_tokens, temperature=self.temperature,
                repetition_penalty=1.0 if structured else self.repetition_penalty, retry_truncated=structured)
        return settings

    async def reply(self, conversation: Conversation, max_tokens: int, stats: StepStats,
                    json_schema: dict[str, Any] | None = None) -> Generation:
        settings = self.settings(max_tokens, json_schema is not None)
        reply = (await self.engine.chat([conversation], settings, json_schema))[0]
        stats.record(reply)
        return reply

    async def text(self, conversation: Conversation, max_tokens: int, stats: StepStats) -> tuple[str | None, Generation]:
        """Free text, or None (with the reply, whose error says why)."""
        return read_text(await self.reply(conversation, max_tokens, stats))

    async def texts(self, conversations: list[Conversation], max_tokens: int,
                    stats: list[StepStats]) -> list[tuple[str | None, Generation]]:
        """`text` for several independent conversations in one engine call; `stats[i]` counts reply i."""
        replies = await self.engine.chat(conversations, self.settings(max_tokens, False))
        for reply, counted in zip(replies, stats):
            counted.record(reply)
        return [read_text(reply) for reply in replies]

    async def json(self, conversation: Conversation, schema: dict[str, Any], max_tokens: int,
                   stats: StepStats) -> tuple[Any, Generation]:
        reply = await self.reply(conversation, max_tokens, stats, json_schema=schema)
        return (reply.parsed if reply.ok else None), reply


def read_text(reply: Generation) -> tuple[str | None, Generation]:
    """A free-text reply as (text, reply): a reply cut at its budget up to its last full sentence,
    None when it failed (the reply's error says why)."""
    if reply.status == "truncated":
        return trim_to_sentence(reply.text), reply
    if reply.ok:
        return reply.text.strip(), reply
    return None, reply


def describe_failure(reply: Generation) -> str:
    return f"{reply.status}: {reply.error or 'no reply'}"
