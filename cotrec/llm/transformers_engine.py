"""transformers backend: starts in seconds, runs anywhere torch does; the reference for scoring.

Generation runs in fixed-size batches with left padding; a JSON schema is not enforced while
decoding (the shared retry logic validates and retries). Choice scoring is one plain forward
pass per batch: the logits at the last prompt position, restricted to the choices' tokens and
normalised, which is exactly what the vLLM backend computes with `allowed_token_ids`.
The model runs on a single worker thread so the engine's event loop stays responsive.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cotrec.config import LLMConfig
from cotrec.llm.base import (ChoiceScores, Conversation, Generation, LLMEngine, SamplingSettings,
                             single_token_ids)
from cotrec.llm.placement import resolve_placement

class TransformersEngine(LLMEngine):
    backend = "transformers"

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.device, self.dtype = resolve_placement(config)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype)).to(self.device).eval()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transformers")

    def _batch(self, conversations: list[Conversation]) -> tuple[Any, list[int]]:
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return batch, batch["attention_mask"].sum(dim=1).tolist()

    def _generate_batch(self, conversations: list[Conversation], settings: SamplingSettings) -> list[Generation]:
        import torch

        batch, lengths = self._batch(conversations)
        room = self.config.max_model_len - max(lengths)
        if room < 1:
            return [Generation("", status="error", prompt_tokens=n,
                               error=f"prompt of {n} tokens leaves no room in the context of {self.config.max_model_len}")
                    for n in lengths]
        sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p) \
            if settings.temperature > 0 else dict(do_sample=False)
        if settings.repetition_penalty != 1.0:
            sampling["repetition_penalty"] = settings.repetition_penalty
        with torch.inference_mode():
            output = self.model.generate(**batch, max_new_tokens=min(settings.max_tokens, room),
                                         pad_token_id=self.tokenizer.pad_token_id, **sampling)
        replies = []
        eos = {self.tokenizer.eos_token_id, *np.atleast_1d(self.model.generation_config.eos_token_id or [])}
        for row, prompt_tokens in zip(output[:, batch["input_ids"].shape[1]:].tolist(), lengths):
            ended = next((i for i, t in enumerate(row) if t in eos), None)
            tokens = row if ended is None else row[:ended]
            replies.append(Generation(self.tokenizer.decode(tokens, skip_special_tokens=True),
                                      finish_reason="length" if ended is None else "stop",
                                      prompt_tokens=prompt_tokens, completion_tokens=len(tokens) + (ended is not None)))
        return replies

    def _score_batch(self, conversations: list[Conversation], token_ids: list[int]) -> np.ndarray:
        import torch

        batch, _ = self._batch(conversations)
        with torch.inference_mode():
            logits = self.model(**batch).logits[:, -1, :].float()
        chosen = logits[:, token_ids]
        return torch.softmax(chosen, dim=-1).numpy().astype(np.float64)

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _generate(self, conversations: list[Conversation], settings: SamplingSettings,
                        json_schema: dict[str, Any] | None) -> list[Generation]:
        replies: list[Generation] = []
        size = self.config.batch_size
        for start in range(0, len(conversations), size):
            replies += await self._in_worker(self._generate_batch, conversations[start:start + size], settings)
        return replies

    async def _score_choices(self, conversations: list[Conversation], choices: list[str]) -> list[ChoiceScores]:
        token_ids = single_token_ids(self.tokenizer, choices)
        scores: list[ChoiceScores] = []
        size = self.config.batch_size
        for start in range(0, len(conversations), size):
            probs = await self._in_worker(self._score_batch, conversations[start:start + size], token_ids)
            scores += [ChoiceScores(list(choices), row) for row in probs]
        return scores

    def _shutdown(self) -> None:
        self._worker.shutdown(wait=True)
