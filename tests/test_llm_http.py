"""The OpenAI-compatible HTTP backend against a real server: vLLM's own, on 127.0.0.1."""

import socket

import numpy as np
import pytest

from cotrec.config import LLMConfig
from cotrec.llm import SamplingSettings, letters, make_engine
from cotrec.llm.server import start_vllm_server
from cotrec.bench.prompts import preference_conversations, ranking_conversations
from json_prompts import KEYWORDS_SCHEMA, keyword_conversations

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_engine(tmp_path_factory):
    port = free_port()
    # float32 like the session's in-process engine it is compared with (see conftest.FLOAT32)
    server = start_vllm_server(LLMConfig(dtype="float32"), port, log_path=tmp_path_factory.mktemp("vllm") / "serve.log")
    engine = make_engine(LLMConfig(backend="openai", base_url=server.base_url, model="embedded"))
    yield engine
    engine.close()
    server.stop()
    assert server.process.poll() is not None


def test_http_chat_and_json(http_engine):
    (reply,) = http_engine.chat_sync(preference_conversations(1), SamplingSettings(max_tokens=64))
    assert reply.text and reply.prompt_tokens > 20 and reply.completion_tokens > 0
    replies = http_engine.chat_sync(keyword_conversations(4), SamplingSettings(max_tokens=96), KEYWORDS_SCHEMA)
    assert all(r.ok and r.parsed["keywords"] for r in replies), [r.error for r in replies]


def test_http_choice_scoring_matches_the_in_process_engine(http_engine, vllm_engine):
    conversations = ranking_conversations(8, seed=11)
    remote = np.stack([s.probs for s in http_engine.score_choices_sync(conversations, letters(10))])
    local = np.stack([s.probs for s in vllm_engine.score_choices_sync(conversations, letters(10))])
    assert np.allclose(remote.sum(axis=1), 1.0)
    assert (remote.argmax(axis=1) == local.argmax(axis=1)).mean() >= 0.85
    assert np.abs(remote - local).max() < 0.05
