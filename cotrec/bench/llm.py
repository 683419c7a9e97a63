"""`cotrec bench llm`: the same realistic prompts through each backend, measured in one run.

For each backend: time to load, generated tokens/s and prompt tokens/s over one batch of
chat requests (greedy, up to `max_tokens` each, natural end of sequence), and choice-scoring
lists/s; then the ratio vLLM / transformers of generated tokens/s.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from cotrec.bench.prompts import preference_conversations, ranking_conversations
from cotrec.config import Config
from cotrec.llm import SamplingSettings, letters, make_engine
from cotrec.progress import log
from cotrec.rundir import write_json


def measure_backend(config: Config, backend: str, prompts: int, max_tokens: int) -> dict[str, Any]:
    llm = config.llm.model_copy(update={"backend": backend})
    started = time.perf_counter()
    engine = make_engine(llm)
    loaded = time.perf_counter() - started
    try:
        conversations = preference_conversations(prompts)
        engine.chat_sync(conversations[:2], SamplingSettings(max_tokens=8))  # warm-up
        started = time.perf_counter()
        replies = engine.chat_sync(conversations, SamplingSettings(max_tokens=max_tokens))
        seconds = time.perf_counter() - started
        ranking = ranking_conversations(prompts)
        started = time.perf_counter()
        engine.score_choices_sync(ranking, letters(10))
        scoring_seconds = time.perf_counter() - started
    finally:
        engine.close()
    dtype = getattr(engine, "dtype", llm.dtype)
    generated = sum(r.completion_tokens for r in replies)
    prompt_tokens = sum(r.prompt_tokens for r in replies)
    return {
        "backend": backend, "model": llm.model, "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens,
        "load_s": round(loaded, 2), "generate_s": round(seconds, 2),
        "generated_tokens": generated, "prompt_tokens": prompt_tokens,
        "generated_tokens_per_s": round(generated / seconds, 1),
        "prompt_tokens_per_s": round(prompt_tokens / seconds, 1),
        "scoring_lists_per_s": round(prompts / scoring_seconds, 2),
        "failures": sum(not r.ok for r in replies),
        **({"batch_size": llm.batch_size} if backend == "transformers" else {"enforce_eager": llm.enforce_eager}),
    }


def bench_llm(config: Config, out: str | Path, prompts: int = 64, max_tokens: int = 64,
              backends: tuple[str, ...] = ("vllm", "transformers")) -> dict[str, Any]:
    results = {}
    for backend in backends:
        log(f"bench llm: {backend}")
        results[backend] = measure_backend(config, backend, prompts, max_tokens)
    report: dict[str, Any] = {"bench": "llm", "machine": platform.machine(), "backends": results}
    if "vllm" in results and "transformers" in results:
        report["vllm_over_transformers_generated_tokens_per_s"] = round(
            results["vllm"]["generated_tokens_per_s"] / results["transformers"]["generated_tokens_per_s"], 2)
    write_json(Path(out), report)
    return report


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"{'backend':<14}{'load s':>8}{'gen tok/s':>11}{'prompt tok/s':>14}{'lists/s':>9}{'failures':>10}"]
    for name, row in report["backends"].items():
        lines.append(f"{name:<14}{row['load_s']:>8.1f}{row['generated_tokens_per_s']:>11.1f}"
                     f"{row['prompt_tokens_per_s']:>14.1f}{row['scoring_lists_per_s']:>9.2f}{row['failures']:>10}")
    if "vllm_over_transformers_generated_tokens_per_s" in report:
        lines.append(f"vLLM / transformers generated tokens/s: {report['vllm_over_transformers_generated_tokens_per_s']:.2f}x")
    return "\n".join(lines)
