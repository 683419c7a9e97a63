"""The one interface every LLM backend implements.

Two calls matter to CoT-Rec:
- `chat`: generate a reply for each of a batch of conversations, optionally constrained to a
  JSON schema. Extraction runs many dependent multi-step programs concurrently on one engine,
  so the calls are coroutines: each program awaits its own steps while the engine batches the
  steps of all programs.
- `score_choices`: the normalised probabilities of a set of single-token choices (the letters
  A, B, C, ...) as the next token after a conversation, in one forward step, no sampling. This
  is how the ranker ranks a candidate list.

Every engine owns a private event loop on a background thread, so the same engine can be used
from synchronous code (`chat_sync`, `score_choices_sync`), from any other event loop (a Ray
actor's, a Serve replica's), and from tests, without caring where it was created.
"""

from __future__ import annotations

import asyncio
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from cotrec.config import LLMConfig
from cotrec.errors import CotrecError

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}
Conversation = list[Message]
T = TypeVar("T")


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample a reply. temperature 0 is greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    # > 1 discourages repeating tokens already in the prompt or reply (small models loop otherwise).
    repetition_penalty: float = 1.0
    # Retry a reply cut at max_tokens. Free text that can be trimmed to its last sentence is
    # better kept: a retry samples (temperature >= 0.7) and so is not reproducible.
    retry_truncated: bool = True


@dataclass(slots=True)
class Generation:
    """One reply. `status` is ok | truncated | invalid_json | error; failures carry `error`."""

    text: str
    status: str = "ok"
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    parsed: Any = None  # the JSON value, when a schema was given and the reply parsed
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ChoiceScores:
    """Probabilities of the choices (summing to 1), in the order the choices were given."""

    choices: list[str]
    probs: np.ndarray
    prompt_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> str:
        return self.choices[int(np.argmax(self.probs))]


def normalise_logprobs(logprobs: Sequence[float]) -> np.ndarray:
    """Softmax over the given log-probabilities (missing ones as -inf) -> probabilities."""
    values = np.asarray(logprobs, dtype=np.float64)
    if not np.isfinite(values).any():
        return np.full(len(values), 1.0 / len(values))
    values = values - np.max(values[np.isfinite(values)])
    weights = np.where(np.isfinite(values), np.exp(values), 0.0)
    return weights / weights.sum()


def validate_json(text: str, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """Parse `text` as JSON and check it against `schema`; returns (value, error or None)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if schema is not None:
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            return None, f"does not match the schema: {exc.message}"
    return value, None


class EngineDeadError(RuntimeError):
    """The engine can serve no more requests (its loop stopped, its backend process died): whoever
    holds it replaces it (a Ray Data actor restarts, a Serve replica is taken out of rotation)."""


# The statuses a reply is tried again for (a truncated one only where the settings say so).
_RETRIED = frozenset({"empty", "invalid_json"})
_RETRIED_WITH_TRUNCATED = _RETRIED | {"truncated"}


class LLMEngine(ABC):
    """Base of every backend: a private event loop thread and the sync/async plumbing."""

    backend: str = "?"

    def __init__(self, config: LLMConfig, model_name: str | None = None):
        self.config = config
        # what every output row records as its model: the configured name unless the backend has none
        self.model_name = model_name or config.model
        self.json_retries = config.json_retries
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.backend}-engine",
                                        daemon=True)
        self._thread.start()
        self._closed = False

    # -- what a backend implements (they run on the engine's own loop) --------------------
    @abstractmethod
    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        """One attempt per conversation: text, finish reason and token counts (status is set later)."""

    @abstractmethod
    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]: ...

    def _shutdown(self) -> None:
        """Release the backend's resources (called once from `close`)."""

    # -- the public interface ---------------------------------------------------------------
    async def chat(self, conversations: list[Conversation], settings: SamplingSettings = SamplingSettings(),
                   json_schema: dict[str, Any] | None = None) -> list[Generation]:
        return await self._on_engine_loop(self._chat(list(conversations), settings, json_schema))

    async def score_choices(self, conversations: list[Conversation], choices: Sequence[str]) -> list[ChoiceScores]:
        return await self._on_engine_loop(self._score_choices(list(conversations), list(choices)))

    async def run_on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the engine's own loop: a whole program of calls then needs no thread hops."""
        return await self._on_engine_loop(coro)

    def chat_sync(self, conversations: list[Conversation], settings: SamplingSettings = SamplingSettings(),
                  json_schema: dict[str, Any] | None = None) -> list[Generation]:
        return self._run(self._chat(list(conversations), settings, json_schema))

    def score_choices_sync(self, conversations: list[Conversation], choices: Sequence[str]) -> list[ChoiceScores]:
        return self._run(self._score_choices(list(conversations), list(choices)))

    def check_health(self) -> None:
        """Raise EngineDeadError when the engine can serve no more requests."""
        if self._closed or not self._thread.is_alive():
            raise EngineDeadError(f"{self.backend} engine: closed or its event loop stopped")
        self._check_backend()

    def _check_backend(self) -> None:
        """A backend's own liveness check (raise EngineDeadError); cheap, it runs on every probe."""

    def forget_prompts(self) -> None:
        """Drop whatever the backend cached of earlier prompts (vLLM: its prefix cache), so that a
        timed pass computes every prompt afresh. Backends that cache nothing do nothing."""

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._shutdown()
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- validation and bounded retries, shared by every backend --------------------------
    async def _chat(self, conversations: list[Conversation], settings: SamplingSettings,
                    json_schema: dict[str, Any] | None) -> list[Generation]:
        """Generate, check each reply, and retry the failed ones a bounded number of times.

        An empty, truncated or (with a schema) unparsable reply is retried with sampling
        (temperature >= 0.7: a greedy retry would repeat itself); after `json_retries` retries it
        is returned with its status and error instead of raising, so one bad row never sinks
        a batch. Backend errors (a prompt over the context length) are not retried.
        """
        replies = await self._generate(conversations, settings, json_schema)
        retried = _RETRIED_WITH_TRUNCATED if settings.retry_truncated else _RETRIED
        pending = [i for i, reply in enumerate(replies) if self._judge(reply, json_schema) in retried]
        for attempt in range(2, self.json_retries + 2):
            if not pending:
                break
            sampled = replace(settings, temperature=max(settings.temperature, 0.7))
            again = await self._generate([conversations[i] for i in pending], sampled, json_schema)
            for index, reply in zip(pending, again):
                reply.attempts = attempt
                replies[index] = reply
            pending = [i for i, reply in zip(pending, again) if self._judge(reply, json_schema) in retried]
        return replies

    @staticmethod
    def _judge(reply: Generation, json_schema: dict[str, Any] | None) -> str:
        """Set a reply's status (and error) from its text, finish reason and schema; returns the status."""
        if reply.status == "error":
            return "error"
        if not reply.text.strip():
            reply.status, reply.error = "empty", "empty reply"
        elif json_schema is not None:
            reply.parsed, problem = validate_json(reply.text, json_schema)
            if problem is None:
                reply.status, reply.error = "ok", None
            elif reply.finish_reason == "length":
                reply.status, reply.error = "truncated", f"cut at max_tokens; {problem}"
            else:
                reply.status, reply.error = "invalid_json", problem
        elif reply.finish_reason == "length":
            reply.status, reply.error = "truncated", "cut at max_tokens"
        else:
            reply.status, reply.error = "ok", None
        return reply.status

    # -- plumbing ---------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            raise RuntimeError("the engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _on_engine_loop(self, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """`coro` to await on the engine's loop: itself when the caller runs there already (no
        coroutine in between, for the millions of calls a users job makes), else a future of it."""
        if self._closed:
            coro.close()
            raise RuntimeError("the engine is closed")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return coro
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))


def single_token_ids(tokenizer: Any, choices: Sequence[str]) -> list[int]:
    """Token id of each choice; each must be exactly one token (the letters A, B, C, ... are)."""
    ids = []
    for choice in choices:
        encoded = tokenizer.encode(choice, add_special_tokens=False)
        if len(encoded) != 1:
            raise CotrecError(f"choice {choice!r} is {len(encoded)} tokens for this model; choices must be single tokens")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise CotrecError(f"choices {list(choices)} do not map to distinct tokens")
    return ids
