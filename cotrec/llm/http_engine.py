"""OpenAI-compatible HTTP backend: a `vllm serve` endpoint, or a hosted model, through the `openai` SDK.

The SDK's client retries what a busy or restarting server answers (429, 5xx, connection errors and
timeouts), `llm.http_retries` times with exponential backoff, honouring a server's Retry-After; a
request that still fails becomes an `error` reply (chat) or a CotrecError naming the endpoint
(choice scoring). A JSON schema is sent as `response_format: {type: json_schema}`. Choice scoring
asks for one token with `logprobs`/`top_logprobs` and reads the choices' log-probabilities from the
top list (a choice absent from it gets probability 0 before renormalising). With
`llm.vllm_extensions` and a tokenizer that can be loaded locally, it also sends vLLM's
`allowed_token_ids` (in `extra_body`); start such a server with `--logprobs-mode processed_logprobs`
so its top list is exactly the choices.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

import openai

from cotrec.config import LLMConfig
from cotrec.errors import CotrecError
from cotrec.llm.base import (ChoiceScores, Conversation, Generation, LLMEngine, SamplingSettings,
                             normalise_logprobs, single_token_ids)
from cotrec.llm.embedded import EMBEDDED_NAMES, resolve_model

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit


class HTTPEngine(LLMEngine):
    backend = "openai"

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        self.base_url = config.base_url.rstrip("/")
        # a server that needs no key (a local vLLM) still gets one: the SDK refuses to start without
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=os.environ.get(config.api_key_env) or "none",
                                         timeout=config.request_timeout_s, max_retries=config.http_retries)
        self.limit = asyncio.Semaphore(config.max_concurrency)
        self.tokenizer = self._local_tokenizer()

    def _local_tokenizer(self) -> Any:
        """The served model's tokenizer, if it can be had without a hub (embedded or local path)."""
        if not self.config.vllm_extensions:
            return None
        if self.config.model not in EMBEDDED_NAMES and not os.path.isdir(os.path.expanduser(self.config.model)):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_model(self.config.model))

    async def _create(self, **request: Any) -> Any:
        """One chat completion, retried by the SDK; what still fails is a CotrecError naming the endpoint."""
        async with self.limit:
            try:
                return await self.client.chat.completions.create(model=self.config.model, **request)
            except openai.APIStatusError as exc:
                raise CotrecError(f"{self.base_url}/chat/completions answered {exc.status_code} after "
                                  f"{self.config.http_retries} retries: {str(exc)[:300]}") from exc
            except openai.APIError as exc:  # connection errors and timeouts
                raise CotrecError(f"{self.base_url}: request failed after {self.config.http_retries} retries: "
                                  f"{exc!r}") from exc

    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        return list(await asyncio.gather(*(self._generate_one(c, settings, json_schema) for c in conversations)))

    async def _generate_one(self, conversation: Conversation, settings: SamplingSettings,
                            json_schema: dict[str, Any] | None) -> Generation:
        request: dict[str, Any] = {"messages": conversation, "max_tokens": settings.max_tokens,
                                   "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.repetition_penalty != 1.0 and self.config.vllm_extensions:
            request["extra_body"] = {"repetition_penalty": settings.repetition_penalty}  # a vLLM server extension
        if json_schema is not None:
            request["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": json_schema}}
        try:
            reply = await self._create(**request)
        except CotrecError as exc:
            return Generation("", status="error", error=str(exc))
        choice = reply.choices[0]
        usage = reply.usage
        return Generation(choice.message.content or "", finish_reason=choice.finish_reason,
                          prompt_tokens=usage.prompt_tokens if usage else 0,
                          completion_tokens=usage.completion_tokens if usage else 0)

    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]:
        if len(choices) > MAX_TOP_LOGPROBS:
            raise CotrecError(f"the HTTP backend scores at most {MAX_TOP_LOGPROBS} choices, got {len(choices)}")
        token_ids = single_token_ids(self.tokenizer, choices) if self.tokenizer is not None else None
        return list(await asyncio.gather(*(self._score_one(c, choices, token_ids) for c in conversations)))

    async def _score_one(self, conversation: Conversation, choices: list[str], token_ids: list[int] | None) -> ChoiceScores:
        request: dict[str, Any] = {"messages": conversation, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                                   "top_logprobs": len(choices) if token_ids else MAX_TOP_LOGPROBS}
        if token_ids:
            request["extra_body"] = {"allowed_token_ids": token_ids}
        reply = await self._create(**request)
        best: dict[str, float] = {}
        for entry in reply.choices[0].logprobs.content[0].top_logprobs:
            token = entry.token.strip()
            best[token] = max(best.get(token, -math.inf), entry.logprob)
        probs = normalise_logprobs([best.get(c, -math.inf) for c in choices])
        return ChoiceScores(list(choices), probs, prompt_tokens=reply.usage.prompt_tokens if reply.usage else 0)

    def _shutdown(self) -> None:
        try:
            self._run(self.client.close())
        except RuntimeError:
            pass
