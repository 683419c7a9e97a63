"""The OpenAI-compatible HTTP backend against a real server: vLLM's own, on 127.0.0.1."""

import json
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
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
def vllm_server(tmp_path_factory):
    # float32 like the session's in-process engine it is compared with (see conftest.FLOAT32)
    server = start_vllm_server(LLMConfig(dtype="float32"), free_port(), log_path=tmp_path_factory.mktemp("vllm") / "serve.log")
    yield server
    server.stop()
    assert server.process.poll() is not None


@pytest.fixture(scope="module")
def http_engine(vllm_server):
    engine = make_engine(LLMConfig(backend="openai", base_url=vllm_server.base_url, model="embedded"))
    yield engine
    engine.close()


class FlakyProxy:
    """A proxy in front of the real server that refuses its first requests as a busy or restarting
    server does (`failures`: HTTP statuses, or "drop" to close the connection unanswered), then
    forwards; `seen` lists what each request got."""

    def __init__(self, target: str, failures: list):
        self.failures, self.seen = list(failures), []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                failure = proxy.failures.pop(0) if proxy.failures else None
                proxy.seen.append(failure or 200)
                if failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if failure is not None:
                    payload = json.dumps({"error": {"message": f"refused with {failure}"}}).encode()
                    self.send_response(failure)
                    self.send_header("retry-after-ms", "50")
                else:
                    forward = urllib.request.Request(target + self.path.removeprefix("/v1"), data=body,
                                                     headers={"content-type": "application/json"})
                    with urllib.request.urlopen(forward, timeout=120) as reply:
                        payload = reply.read()
                    self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_backend_retries_refused_and_dropped_requests_with_backoff(vllm_server):
    proxy = FlakyProxy(vllm_server.base_url, [429, 503, "drop"])
    engine = make_engine(LLMConfig(backend="openai", base_url=proxy.url, model="embedded", http_retries=3))
    try:
        (reply,) = engine.chat_sync(preference_conversations(1), SamplingSettings(max_tokens=16, retry_truncated=False))
        assert reply.status in ("ok", "truncated") and reply.text and proxy.seen == [429, 503, "drop", 200]
        proxy.failures, proxy.seen = [500], []
        (scores,) = engine.score_choices_sync(ranking_conversations(1, seed=3), letters(10))
        assert scores.probs.sum() == pytest.approx(1.0) and proxy.seen == [500, 200]
    finally:
        engine.close()
    impatient = make_engine(LLMConfig(backend="openai", base_url=proxy.url, model="embedded", http_retries=1))
    try:  # more refusals than retries: an error reply that says why, not an exception
        proxy.failures, proxy.seen = [429, 429], []
        (reply,) = impatient.chat_sync(preference_conversations(1), SamplingSettings(max_tokens=16, retry_truncated=False))
        assert reply.status == "error" and "429" in reply.error and proxy.seen == [429, 429]
    finally:
        impatient.close()
        proxy.close()


def test_http_chat_and_json(http_engine, vllm_engine):
    """The conversation reaches the server as the model's chat template renders it (the server's
    count of prompt tokens is the in-process engine's), and a reply asked for a schema is JSON that
    matches it (checked with jsonschema, not the engine's own verdict)."""
    conversations = preference_conversations(1)
    (reply,) = http_engine.chat_sync(conversations, SamplingSettings(max_tokens=64))
    assert reply.ok and reply.text and 0 < reply.completion_tokens <= 64
    assert reply.prompt_tokens == len(vllm_engine.encode(conversations[0]))
    replies = http_engine.chat_sync(keyword_conversations(4), SamplingSettings(max_tokens=96), KEYWORDS_SCHEMA)
    assert all(r.ok for r in replies), [r.error for r in replies]
    for r in replies:
        jsonschema.validate(json.loads(r.text), KEYWORDS_SCHEMA)
        assert r.parsed == json.loads(r.text) and r.parsed["keywords"]


def test_http_choice_scoring_matches_the_in_process_engine(http_engine, vllm_engine):
    conversations = ranking_conversations(8, seed=11)
    remote = np.stack([s.probs for s in http_engine.score_choices_sync(conversations, letters(10))])
    local = np.stack([s.probs for s in vllm_engine.score_choices_sync(conversations, letters(10))])
    assert np.allclose(remote.sum(axis=1), 1.0)
    assert (remote.argmax(axis=1) == local.argmax(axis=1)).mean() >= 0.85
    assert np.abs(remote - local).max() < 0.05
