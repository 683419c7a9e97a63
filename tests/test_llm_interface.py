"""The LLM interface's own logic: normalisation, JSON validation, bounded retries, model names."""

import asyncio

import numpy as np
import pytest
from conftest import REPO

from cotrec.config import LLMConfig, load_config
from cotrec.errors import ConfigError, CotrecError
from cotrec.llm import letters
from cotrec.llm.base import ChoiceScores, Generation, LLMEngine, SamplingSettings, normalise_logprobs, validate_json
from cotrec.llm.embedded import resolve_model


class ScriptedFakeEngine(LLMEngine):
    """A fake engine for testing the retry orchestration only: replies come from a script."""

    backend = "fake"

    def __init__(self, script, retries=2):
        super().__init__(LLMConfig(model="fake", json_retries=retries))
        self.script = list(script)
        self.calls = []

    async def _generate(self, conversations, settings, json_schema):
        self.calls.append((len(conversations), settings.temperature))
        return [Generation(text, finish_reason=reason) for text, reason in (self.script.pop(0) for _ in conversations)]

    async def _score_choices(self, conversations, choices):
        return [ChoiceScores(choices, normalise_logprobs([0.0] * len(choices))) for _ in conversations]


SCHEMA = {"type": "object", "properties": {"k": {"type": "array"}}, "required": ["k"]}


def test_normalise_logprobs():
    probs = normalise_logprobs([np.log(0.2), np.log(0.6), -np.inf])
    assert probs == pytest.approx([0.25, 0.75, 0.0])
    assert normalise_logprobs([-np.inf, -np.inf]) == pytest.approx([0.5, 0.5])


def test_validate_json():
    assert validate_json('{"k": [1]}', SCHEMA) == ({"k": [1]}, None)
    assert "not JSON" in validate_json("{", SCHEMA)[1]
    assert "schema" in validate_json('{"x": 1}', SCHEMA)[1]


def test_bad_replies_are_retried_then_reported_not_raised():
    engine = ScriptedFakeEngine([("", "stop"), ('{"k": []}', "stop"),  # attempt 1: empty, ok
                                 ("{oops", "stop"),  # attempt 2 of the first
                                 ('{"k": [', "length")])  # attempt 3: truncated, give up
    try:
        first, second = engine.chat_sync([[{"role": "user", "content": "a"}]] * 2, SamplingSettings(), SCHEMA)
    finally:
        engine.close()
    assert second.ok and second.parsed == {"k": []} and second.attempts == 1
    assert first.status == "truncated" and first.attempts == 3 and "max_tokens" in first.error
    # one retry batch per attempt, and retries sample instead of repeating the greedy reply
    assert engine.calls == [(2, 0.0), (1, 0.7), (1, 0.7)]


def test_engine_is_usable_from_another_event_loop():
    engine = ScriptedFakeEngine([("fine", "stop")] * 4)

    async def two_programs():
        return await asyncio.gather(engine.chat([[{"role": "user", "content": "x"}]]),
                                    engine.score_choices([[{"role": "user", "content": "x"}]], ["A", "B"]))

    try:
        (reply,), (scores,) = asyncio.run(two_programs())
    finally:
        engine.close()
    assert reply.text == "fine" and scores.probs.sum() == pytest.approx(1.0)


def test_letters():
    assert letters(10) == list("ABCDEFGHIJ")
    with pytest.raises(ValueError):
        letters(27)


def test_model_names_resolve_or_fail_clearly(tmp_path):
    with pytest.raises(CotrecError, match="not a model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(CotrecError, match="no such model folder"):
        resolve_model("./no/such/model")
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_llm_config_keys():
    config = load_config("demo", ["llm.backend=transformers", "llm.max_model_len=1024"])
    assert config.llm.backend == "transformers" and config.llm.max_model_len == 1024
    with pytest.raises(ConfigError, match="llm.base_url"):
        load_config("demo", ["llm.backend=openai"])
    with pytest.raises(ConfigError, match=r"llm\.kv_cache: unknown key"):
        load_config("demo", ["llm.kv_cache=3"])
    assert LLMConfig().model == "embedded"


def test_the_cpu_level_is_the_widest_that_changes_bfloat16_and_benches_record_it(monkeypatch):
    # One CPU model name ("AMD EPYC") covers VMs with and without AVX512-BF16, whose bfloat16
    # results and speeds differ: each bench's JSON names the level, with the commit and command.
    import subprocess

    import cotrec.bench.common as common
    from cotrec.llm.placement import cpu_isa

    avx2 = {"sse2", "avx", "avx2", "fma"}
    assert cpu_isa(avx2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "amx"
    assert cpu_isa(avx2 | {"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert cpu_isa(avx2 | {"avx512f", "avx512bw"}) == "avx512"
    assert cpu_isa(avx2) == "avx2" and cpu_isa({"sse2", "neon"}) == "other"
    for level, native in (("avx2", False), ("avx512", False), ("avx512_bf16", True), ("amx", True)):
        monkeypatch.setattr(common, "cpu_isa", lambda level=level: level)
        assert (common.machine()["cpu_isa"], common.machine()["cpu_native_bf16"]) == (level, native)
    monkeypatch.setattr(common.sys, "argv", ["/venv/bin/cotrec", "bench", "llm", "--rounds", "3"])
    head = common.stamp("llm", 3)
    assert head["bench"] == "llm" and head["rounds"] == 3 and head["cpu_isa"] == "amx"
    assert head["command"] == "cotrec bench llm --rounds 3" and len(head["load_average"]) == 3
    assert head["commit"] == subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip()
    assert head["timestamp"].endswith("+00:00")
    assert common.spread([3.0, 1.0, 2.5]) == {"min": 1.0, "median": 2.5, "max": 3.0}


def test_an_engine_gets_the_cores_its_process_may_run_on_not_the_machines():
    # A cpuset or an xdist worker's share allows fewer cores than the machine has; OpenMP threads
    # beyond them wait on each other. Run in a child so this process keeps its own affinity.
    import subprocess
    import sys

    script = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
              "from cotrec.config import LLMConfig; from cotrec.llm.placement import give_engine_every_core, usable_cores; "
              "give_engine_every_core(LLMConfig()); print(usable_cores(), os.environ['OMP_NUM_THREADS']); "
              "give_engine_every_core(LLMConfig(threads=3)); print(os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == ["1", "1", "3"]
