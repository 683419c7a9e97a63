"""The real engines on the embedded SmolLM2-135M-Instruct, on CPU."""

import asyncio
import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from cotrec.llm import SamplingSettings, letters
from cotrec.bench.prompts import preference_conversations, ranking_conversations
from json_prompts import KEYWORDS_SCHEMA, keyword_conversations

pytestmark = pytest.mark.slow


def test_vllm_generates_sensible_text(vllm_engine):
    replies = vllm_engine.chat_sync(preference_conversations(4), SamplingSettings(max_tokens=96))
    for reply in replies:
        assert reply.ok, reply.error
        assert len(reply.text.split()) >= 5 and reply.completion_tokens > 0 and reply.prompt_tokens > 20
        # English prose, not token soup
        assert sum(ch.isalpha() for ch in reply.text) > 0.6 * len(reply.text)


def test_vllm_json_schema_generation_parses_every_time(vllm_engine):
    replies = vllm_engine.chat_sync(keyword_conversations(32), SamplingSettings(max_tokens=96), KEYWORDS_SCHEMA)
    assert len(replies) == 32
    for reply in replies:
        assert reply.ok and reply.attempts == 1, (reply.status, reply.error, reply.text)
        assert 1 <= len(reply.parsed["keywords"]) <= 5


def test_vllm_prompt_over_the_context_is_an_error_reply_not_a_crash(vllm_engine):
    long = [{"role": "user", "content": "movie " * 5000}]
    short = preference_conversations(1)[0]
    too_long, fine = vllm_engine.chat_sync([long, short], SamplingSettings(max_tokens=16))
    assert too_long.status == "error" and "context" in too_long.error
    assert fine.text


def test_choice_scoring_sums_to_one_and_agrees_with_transformers(vllm_engine, transformers_engine):
    conversations = ranking_conversations(24)
    choices = letters(10)
    fast = vllm_engine.score_choices_sync(conversations, choices)
    reference = transformers_engine.score_choices_sync(conversations, choices)
    p_fast = np.stack([s.probs for s in fast])
    p_ref = np.stack([s.probs for s in reference])
    assert np.allclose(p_fast.sum(axis=1), 1.0) and np.allclose(p_ref.sum(axis=1), 1.0)
    same_top = (p_fast.argmax(axis=1) == p_ref.argmax(axis=1)).mean()
    max_diff = np.abs(p_fast - p_ref).max(axis=1)
    print(f"same top choice {same_top:.2f}; max |dp| median {np.median(max_diff):.4f}, max {max_diff.max():.4f}")
    assert same_top >= 0.9
    assert (max_diff <= 0.05).mean() >= 0.9 and np.median(max_diff) <= 0.02


def test_many_concurrent_programs_on_one_engine(vllm_engine, monkeypatch):
    """Each program's second call awaits its first; the engine batches across programs: vLLM holds
    every program's request at once, not one program's after another's."""
    original, in_flight, peak, everyone = vllm_engine.engine.generate, 0, 0, []

    def counted(*args, **kwargs):  # the engine core's requests, as vLLM receives them
        async def stream():
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            if not everyone:
                everyone.append(asyncio.Event())
            if peak == 8:
                everyone[0].set()
            try:
                # a request waits for the others (a loaded machine may finish one before the last is
                # sent); an engine that admits one at a time never gets them, and the wait gives up
                try:
                    await asyncio.wait_for(everyone[0].wait(), timeout=30)
                except asyncio.TimeoutError:
                    everyone[0].set()
                async for output in original(*args, **kwargs):
                    yield output
            finally:
                in_flight -= 1
        return stream()

    monkeypatch.setattr(vllm_engine.engine, "generate", counted)

    async def program(conversation):
        first = (await vllm_engine.chat([conversation], SamplingSettings(max_tokens=24)))[0]
        follow = conversation + [{"role": "assistant", "content": first.text},
                                 {"role": "user", "content": "Now name one movie they would like."}]
        return (await vllm_engine.chat([follow], SamplingSettings(max_tokens=24)))[0]

    async def main():
        return await asyncio.gather(*(program(c) for c in preference_conversations(8, seed=5)))

    replies = asyncio.run(main())
    # every program got its reply (one cut at max_tokens counts: the test is about batching, not length)
    assert len(replies) == 8 and all(r.text and r.status in ("ok", "truncated") for r in replies), replies
    assert peak == 8  # the eight programs' first calls, together in the engine


def test_transformers_generation_and_json_validation(transformers_engine):
    """No guided decoding on this backend: every reply is judged by the schema, and one that cannot
    match it is retried json_retries times and then reported, not raised."""
    (reply,) = transformers_engine.chat_sync(preference_conversations(1), SamplingSettings(max_tokens=24))
    assert reply.text and reply.completion_tokens > 0 and reply.ok
    replies = transformers_engine.chat_sync(keyword_conversations(1), SamplingSettings(max_tokens=48), KEYWORDS_SCHEMA)
    for reply in replies:  # the verdict is the schema's own (jsonschema's, not the engine's helper)
        try:
            jsonschema.validate(json.loads(reply.text), KEYWORDS_SCHEMA)
            valid = True
        except (ValueError, jsonschema.ValidationError):
            valid = False
        assert reply.ok == valid and (reply.parsed == json.loads(reply.text) if valid else reply.error)
    impossible = {"type": "integer", "minimum": 10**12}  # prose can never be this
    (reply,) = transformers_engine.chat_sync(preference_conversations(1), SamplingSettings(max_tokens=8), impossible)
    assert reply.status in ("invalid_json", "truncated") and reply.error and reply.parsed is None
    assert reply.attempts == transformers_engine.json_retries + 1


def test_embedded_model_loads_without_a_hub(tmp_path):
    """With every hub address unreachable, the embedded model still loads from the cache."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", NO_PROXY="*",
               HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    code = ("from cotrec.config import LLMConfig; from cotrec.llm import make_engine;"
            "e = make_engine(LLMConfig(backend='transformers'));"
            "print(e.score_choices_sync([[{'role':'user','content':'A or B?'}]], ['A','B'])[0].probs.sum()); e.close()")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(1.0)
