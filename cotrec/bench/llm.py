"""`cotrec bench llm`: the same realistic prompts through each backend, measured in one run.

For each backend: time to load, generated tokens/s and prompt tokens/s over one batch of
chat requests (greedy, up to `max_tokens` each, natural end of sequence), and choice-scoring
lists/s; then the ratio vLLM / transformers of generated tokens/s. vLLM runs twice by default:
`vllm:eager` (`llm.enforce_eager: true`, the default: the shortest start) and `vllm:compiled`
(torch.compile: a longer start, more tokens/s); plain `vllm` takes `llm.enforce_eager` as set.

Each figure is the median of `rounds` timed rounds over the same prompts, after one untimed
round that warms the engine up (on a CPU the first pass over new batch shapes builds its kernels:
vLLM's first scoring round ran at a third of the speed of the next ones); a shared machine's speed
also moves from one minute to the next, and every round is kept in the JSON. vLLM's prefix cache
is emptied before every round, so a round never reuses the prompts the previous one computed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from cotrec.bench.common import load_average, machine, spread, stamp
from cotrec.bench.prompts import preference_conversations, ranking_conversations
from cotrec.config import Config
from cotrec.errors import CotrecError
from cotrec.llm import SamplingSettings, letters, make_engine
from cotrec.progress import log
from cotrec.rundir import write_json


VLLM_MODES = {"vllm:eager": True, "vllm:compiled": False}  # name -> llm.enforce_eager


def backend_config(config: Config, name: str) -> Any:
    """The LLM config a bench entry runs with: a backend name, or vllm:eager / vllm:compiled."""
    if name in VLLM_MODES:
        return config.llm.model_copy(update={"backend": "vllm", "enforce_eager": VLLM_MODES[name]})
    if ":" in name:
        raise CotrecError(f"--backends: unknown entry {name!r} (a backend, or one of {', '.join(VLLM_MODES)})")
    return config.llm.model_copy(update={"backend": name})


def measure_backend(config: Config, name: str, prompts: int, max_tokens: int, rounds: int = 3) -> dict[str, Any]:
    llm = backend_config(config, name)
    started = time.perf_counter()
    engine = make_engine(llm)
    loaded = time.perf_counter() - started
    conversations = preference_conversations(prompts)
    ranking = ranking_conversations(prompts)
    timed = []
    try:
        for round_ in range(rounds + 1):  # round 0 warms up and is not kept
            engine.forget_prompts()
            load_before = load_average()
            started = time.perf_counter()
            replies = engine.chat_sync(conversations, SamplingSettings(max_tokens=max_tokens))
            seconds = time.perf_counter() - started
            engine.forget_prompts()
            started = time.perf_counter()
            engine.score_choices_sync(ranking, letters(10))
            scoring_seconds = time.perf_counter() - started
            if round_ == 0:
                continue
            generated = sum(r.completion_tokens for r in replies)
            prompt_tokens = sum(r.prompt_tokens for r in replies)
            timed.append({"generate_s": round(seconds, 2), "generated_tokens": generated, "prompt_tokens": prompt_tokens,
                          "generated_tokens_per_s": round(generated / seconds, 1),
                          "prompt_tokens_per_s": round(prompt_tokens / seconds, 1),
                          "scoring_lists_per_s": round(prompts / scoring_seconds, 2),
                          "failures": sum(not r.ok for r in replies), "load_avg_before": load_before})
    finally:
        engine.close()
    dtype = getattr(engine, "dtype", llm.dtype)
    keys = ("generate_s", "generated_tokens_per_s", "prompt_tokens_per_s", "scoring_lists_per_s")
    middle = {key: statistics.median(r[key] for r in timed) for key in keys}
    return {
        "backend": llm.backend, "model": llm.model, "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens,
        "load_s": round(loaded, 2), **middle, "spread": {key: spread(r[key] for r in timed) for key in keys},
        "generated_tokens": timed[-1]["generated_tokens"], "prompt_tokens": timed[-1]["prompt_tokens"],
        "failures": max(r["failures"] for r in timed), "rounds": timed,
        **({"batch_size": llm.batch_size} if llm.backend == "transformers" else {"enforce_eager": llm.enforce_eager}),
    }


def bench_llm(config: Config, out: str | Path, prompts: int = 64, max_tokens: int = 64,
              backends: tuple[str, ...] = ("vllm:eager", "vllm:compiled", "transformers"),
              rounds: int = 3) -> dict[str, Any]:
    if rounds < 1:
        raise CotrecError(f"--rounds must be at least 1, got {rounds}")
    head = stamp("llm", rounds)
    for name in backends:
        backend_config(config, name)  # a bad entry fails before any engine loads
    results = {}
    for name in backends:
        log(f"bench llm: {name}, {rounds} round(s)")
        results[name] = measure_backend(config, name, prompts, max_tokens, rounds)
    report: dict[str, Any] = {**head, "machine": machine(),
                              "figures": "the median of the timed rounds, after one warm-up round; spread: their "
                                         "min, median and max",
                              "backends": results}
    if "transformers" in results:
        reference = results["transformers"]["generated_tokens_per_s"]
        report["over_transformers_generated_tokens_per_s"] = {
            name: round(row["generated_tokens_per_s"] / reference, 2)
            for name, row in results.items() if row["backend"] == "vllm"}
        # round by round (the backends' i-th rounds ran minutes apart, so this is a range, not a pairing)
        report["over_transformers_by_round"] = {
            name: spread(r["generated_tokens_per_s"] / t["generated_tokens_per_s"]
                         for r, t in zip(row["rounds"], results["transformers"]["rounds"]))
            for name, row in results.items() if row["backend"] == "vllm"}
    write_json(Path(out), report)
    return report


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"{'backend':<15}{'dtype':>10}{'load s':>8}{'gen tok/s':>11}{'prompt tok/s':>14}{'lists/s':>9}{'failures':>10}"
             f"   gen tok/s by round"]
    for name, row in report["backends"].items():
        by_round = ", ".join(f"{r['generated_tokens_per_s']:.1f}" for r in row["rounds"])
        lines.append(f"{name:<15}{row['dtype']:>10}{row['load_s']:>8.1f}{row['generated_tokens_per_s']:>11.1f}"
                     f"{row['prompt_tokens_per_s']:>14.1f}{row['scoring_lists_per_s']:>9.2f}{row['failures']:>10}"
                     f"   {by_round}")
    for name, value in report.get("over_transformers_generated_tokens_per_s", {}).items():
        by_round = report.get("over_transformers_by_round", {}).get(name)
        span = f" (round by round {by_round['min']:.2f}..{by_round['max']:.2f})" if by_round else ""
        lines.append(f"{name} / transformers generated tokens/s (medians of {report['rounds']} rounds): {value:.2f}x{span}")
    return "\n".join(lines)
