"""`cotrec bench ranker`: lists ranked per second, vLLM choice scoring against the reference way.

Both paths rank the same test lists of one retriever variant with the `llm` prompt (history
titles + candidate titles, shown in the ranker's seeded order), same model, same dtype:

- `vllm`: one vLLM engine, `LetterRanker.score` over `ranker.lists_per_call` lists per call (one
  decoding step per list restricted to the letters), as `cotrec ranker eval` runs it.
- `transformers_one_at_a_time`: how the reference code ranks: `AutoModelForCausalLM`, one list
  at a time: chat template, one plain forward pass, softmax of the last position's logits over the
  letters' token ids.
- `vllm_mapb_probe` (vLLM only): each user's M probe orders of the MAPB probe sent together, so
  the M prompts share their prefix in vLLM's prefix cache.

Each path first ranks every list once, untimed: on a CPU the first pass over new prompt lengths
builds its kernels, so the figures are the steady state of an engine that has been running; then
ranks them `rounds` times (3), timed: the figures are the medians, `lists_per_s_spread` their min,
median and max, and the ratios are of the medians. vLLM's prefix cache is reset before every timed
round, so no round reuses what an earlier pass computed.
Agreement: the fraction of lists both paths rank the same candidate first and the largest
difference of a letter's probability (the two compute the same thing up to numerics).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from cotrec.bench.common import load_average, machine, rate, ratio, spread, stamp
from cotrec.config import Config
from cotrec.errors import DataError
from cotrec.llm import letters, make_engine
from cotrec.llm.base import single_token_ids
from cotrec.llm.placement import resolve_placement, usable_cores
from cotrec.progress import log
from cotrec.ranker.letters import LetterRanker, Query
from cotrec.ranker.lists import CandidateList, load_lists, shown_order
from cotrec.ranker.mapb import probe_orders
from cotrec.rundir import RunDir, write_json

DEFAULT_OUT = "bench/ranker.json"
DEFAULT_LISTS = 64
PROMPT = "llm"
SPLIT = "test"


def bench_queries(config: Config, run: RunDir, variant: str, count: int) -> tuple[list[Query], dict[str, Any]]:
    """`count` (list, shown order) queries: the test lists whose target is among the candidates,
    first by user; when there are fewer, the other test lists of the variant (they cost the same
    to rank), then the same lists again, each repeat in a fresh seeded order."""
    if not run.root.is_dir():
        raise DataError(f"{run.root}: no such run directory")
    lists, _ = load_lists(config, run, variant, SPLIT, PROMPT)
    if not lists:
        raise DataError(f"{run.root}: retriever variant {variant} has no {SPLIT} lists")
    hits = [lst for lst in lists if lst.hit]
    pool = (hits + [lst for lst in lists if not lst.hit])[:count]
    seed = config.ranker.shuffle_seed
    queries = [(pool[i % len(pool)], shown_order(pool[i % len(pool)], seed, epoch=i // len(pool)))
               for i in range(count)]
    used_hits = min(len(hits), count)
    selection = {"split": SPLIT, "variant": variant, "prompt": PROMPT, "test_lists": len(lists),
                 "test_lists_with_target": len(hits), "measured_with_target": used_hits,
                 "measured_without_target": len(pool) - used_hits, "distinct_lists": len(pool),
                 "reused": count > len(pool), "candidates_per_list": len(pool[0].candidates)}
    if selection["measured_without_target"]:
        selection["note"] = (f"only {len(hits)} {SPLIT} lists have the target among the candidates: the other "
                             f"{selection['measured_without_target']} are lists without it (ranked at the same cost)")
    if selection["reused"]:
        selection["note"] = (selection.get("note", "") + f"; {count} lists from {len(pool)} distinct ones: each repeat "
                             "shows the candidates in a fresh seeded order, but shares its history prefix with the "
                             "earlier copy (vLLM's prefix cache can reuse it)").lstrip("; ")
    return queries, selection


def _ranker(run: RunDir, engine: Any = None) -> LetterRanker:
    return LetterRanker.for_run(run, PROMPT, engine)


# -- A. vLLM choice scoring ---------------------------------------------------------------------
def measure_vllm(config: Config, run: RunDir, queries: list[Query], rounds: int = 3,
                 mapb_probe: bool = True) -> tuple[dict[str, Any], np.ndarray, dict[str, Any] | None]:
    """Lists/s of `LetterRanker.score` on a vLLM engine, `ranker.lists_per_call` lists per call;
    returns the figures, the probabilities of every query and the MAPB probe's figures."""
    llm = config.llm.model_copy(update={"backend": "vllm"})
    per_call = config.ranker.lists_per_call
    log(f"bench ranker: vllm: {len(queries)} lists, {per_call} per call")
    started = time.perf_counter()
    engine = make_engine(llm)
    loaded = time.perf_counter() - started
    probe = None
    try:
        ranker = _ranker(run, engine)
        for start in range(0, len(queries), per_call):  # warm-up, untimed
            ranker.score(queries[start:start + per_call])
        load_before = load_average()
        timed = []
        for _ in range(rounds):
            engine.forget_prompts()
            started = time.perf_counter()
            probs = [ranker.score(queries[start:start + per_call]) for start in range(0, len(queries), per_call)]
            timed.append(time.perf_counter() - started)
        seconds = statistics.median(timed)
        load_after = load_average()
        # Counted after the clock stops: the same token ids the engine was sent.
        prompt_tokens = sum(len(engine.encode(ranker.conversation(lst, order))) for lst, order in queries)
        if mapb_probe:
            probe = measure_mapb_probe(config, engine, ranker, queries)
        device, dtype = engine.device, engine.dtype
    finally:
        engine.close()
    figures = {
        "backend": "vllm", "device": device, "dtype": dtype, "load_s": round(loaded, 2),
        "lists": len(queries), "lists_per_call": per_call, "calls": len(probs),
        "seconds": round(seconds, 3), "lists_per_s": rate(len(queries), seconds),
        "lists_per_s_spread": spread(len(queries) / s for s in timed),
        "prompt_tokens": prompt_tokens, "mean_prompt_tokens": round(prompt_tokens / len(queries), 1),
        "prompt_tokens_per_s": rate(prompt_tokens, seconds),
        "max_num_seqs": llm.max_num_seqs, "enforce_eager": llm.enforce_eager,
        "prefix_cache_reset_before": True, "load_avg_before": load_before, "load_avg_after": load_after,
    }
    return figures, np.concatenate(probs), probe


def measure_mapb_probe(config: Config, engine: Any, ranker: LetterRanker, queries: list[Query]) -> dict[str, Any]:
    """Each user's M probe orders (the target at every position) sent together, as `ranker eval`
    sends them with MAPB on, over the first max(1, N // M) lists."""
    m = len(queries[0][1])
    users = [lst for lst, _ in queries[:max(1, len(queries) // m)]]
    users_per_call = max(1, config.ranker.lists_per_call // m)
    seed = config.ranker.shuffle_seed
    probes: list[list[Query]] = []
    for lst in users:
        # A list without its target (a filler) probes the position of its retriever's first candidate.
        target = lst.candidates.index(lst.target) if lst.hit else 0
        probes.append([(lst, o) for o in probe_orders(shown_order(lst, seed), target)])
    log(f"bench ranker: vllm MAPB probe: {len(users)} users x {m} orders")
    engine.forget_prompts()
    started = time.perf_counter()
    for start in range(0, len(probes), users_per_call):
        ranker.score([q for probe in probes[start:start + users_per_call] for q in probe])
    seconds = time.perf_counter() - started
    prompts = len(users) * m
    return {"users": len(users), "orders_per_user": m, "lists": prompts, "users_per_call": users_per_call,
            "seconds": round(seconds, 3), "lists_per_s": rate(prompts, seconds),
            "users_per_s": rate(len(users), seconds), "prefix_cache_reset_before": True}


# -- B. the reference: transformers, one list at a time ---------------------------------------------
def measure_transformers(config: Config, run: RunDir, queries: list[Query],
                         rounds: int = 3) -> tuple[dict[str, Any], np.ndarray]:
    """Lists/s of one plain forward pass per list, as the reference code ranks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = resolve_placement(config.llm)
    threads = usable_cores()
    if placement.device == "cpu":
        torch.set_num_threads(threads)
    log(f"bench ranker: transformers one at a time: {len(queries)} lists on {placement.device} ({placement.dtype})")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(placement.path)
    model = AutoModelForCausalLM.from_pretrained(placement.path, dtype=getattr(torch, placement.dtype))
    model = model.to(placement.device).eval()
    loaded = time.perf_counter() - started
    ranker = _ranker(run)
    token_ids = single_token_ids(tokenizer, letters(len(queries[0][1])))

    def score(lst: CandidateList, order: np.ndarray) -> tuple[np.ndarray, int]:
        text = tokenizer.apply_chat_template(ranker.conversation(lst, order), add_generation_prompt=True,
                                             tokenize=False)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(placement.device)
        with torch.inference_mode():
            logits = model(**batch).logits[0, -1, :].float()
        probs = torch.softmax(logits[token_ids], dim=-1).cpu().numpy().astype(np.float64)
        return probs, int(batch["input_ids"].shape[1])

    for lst, order in queries:  # warm-up, untimed
        score(lst, order)
    load_before = load_average()
    timed = []
    for _ in range(rounds):
        probs, prompt_tokens, each = [], 0, []
        started = time.perf_counter()
        for lst, order in queries:
            t0 = time.perf_counter()
            p, n = score(lst, order)
            each.append(time.perf_counter() - t0)
            probs.append(p)
            prompt_tokens += n
        timed.append(time.perf_counter() - started)
    seconds = statistics.median(timed)
    figures = {
        "backend": "transformers", "device": placement.device, "dtype": placement.dtype,
        "torch_threads": torch.get_num_threads(), "load_s": round(loaded, 2), "lists": len(queries),
        "seconds": round(seconds, 3), "lists_per_s": rate(len(queries), seconds),
        "lists_per_s_spread": spread(len(queries) / s for s in timed),
        "seconds_per_list_median": round(float(np.median(each)), 4),
        "prompt_tokens": prompt_tokens, "prompt_tokens_per_s": rate(prompt_tokens, seconds),
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }
    return figures, np.stack(probs)


def agreement(vllm: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    diff = np.abs(vllm - reference)
    return {"lists": len(vllm),
            "same_first_candidate": round(float(np.mean(vllm.argmax(axis=1) == reference.argmax(axis=1))), 4),
            "max_abs_prob_diff": round(float(diff.max()), 6), "mean_abs_prob_diff": round(float(diff.mean()), 6)}


def bench_ranker(config: Config, run: RunDir, variant: str = "none/random", lists: int = DEFAULT_LISTS,
                 out: str | Path = DEFAULT_OUT, mapb_probe: bool = True, rounds: int = 3) -> dict[str, Any]:
    if lists < 1 or rounds < 1:
        raise DataError(f"--lists and rounds must be at least 1, got {lists} and {rounds}")
    bench_started = time.perf_counter()
    queries, selection = bench_queries(config, run, variant, lists)
    host = machine()
    report: dict[str, Any] = {
        **stamp("ranker", rounds),
        "config": {"llm": config.llm.model_dump(mode="json"),
                   "ranker": {k: getattr(config.ranker, k) for k in ("history_items", "shuffle_seed", "lists_per_call")},
                   "run_dir": str(run.root)},
        "lists": lists, "selection": selection, "model": config.llm.model,
    }
    report["vllm"], vllm_probs, probe = measure_vllm(config, run, queries, rounds, mapb_probe)
    if probe is not None:
        report["vllm_mapb_probe"] = probe
    report["model_path"] = resolve_placement(config.llm).path
    report["transformers_one_at_a_time"], reference_probs = measure_transformers(config, run, queries, rounds)
    report["ratio_vllm_vs_transformers"] = ratio(report["vllm"]["lists_per_s"],
                                                  report["transformers_one_at_a_time"]["lists_per_s"])
    if "vllm_mapb_probe" in report:
        report["ratio_vllm_mapb_probe_vs_transformers"] = ratio(
            report["vllm_mapb_probe"]["lists_per_s"], report["transformers_one_at_a_time"]["lists_per_s"])
    report["agreement"] = agreement(vllm_probs, reference_probs)
    if report["vllm"]["device"] == "cuda":
        import torch

        host["gpu"] = torch.cuda.get_device_name(0)
    report["host"] = host
    report["notes"] = bench_notes(report)
    report["wall_s"] = round(time.perf_counter() - bench_started, 1)
    write_json(Path(out), report)
    return report


def bench_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    cores = report["host"].get("cpus") or 1
    loads = [report[part][key][0] for part in ("vllm", "transformers_one_at_a_time")
             for key in ("load_avg_before", "load_avg_after")]
    if max(loads) > cores + 0.5:
        notes.append(f"the 1-minute load average reached {max(loads):.1f} on this {cores}-core machine while timing: "
                     "other work shared the cores, so these figures are pessimistic (the transformers path most: "
                     "its thread pool stalls when a core is taken).")
    if report["vllm"]["device"] == "cpu":
        notes.append("on a CPU both paths are bound by the same arithmetic (a forward pass over every prompt "
                     "token), so batching lists gains little; the gap is expected on a GPU.")
    return notes


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"{'path':<30}{'lists':>7}{'seconds':>10}{'lists/s':>10}{'prompt tok/s':>14}{'load s':>8}"]
    for key in ("vllm", "vllm_mapb_probe", "transformers_one_at_a_time"):
        if key not in report:
            continue
        row = report[key]
        tokens = row.get("prompt_tokens_per_s")
        load = row.get("load_s")
        lines.append(f"{key:<30}{row['lists']:>7}{row['seconds']:>10.2f}{row['lists_per_s']:>10.2f}"
                     f"{(f'{tokens:,.0f}' if tokens is not None else '-'):>14}"
                     f"{(f'{load:.1f}' if load is not None else '-'):>8}")
    if report.get("ratio_vllm_vs_transformers") is not None:
        lines.append(f"vLLM / transformers one at a time: {report['ratio_vllm_vs_transformers']:.2f}x lists/s")
    if report.get("ratio_vllm_mapb_probe_vs_transformers") is not None:
        lines.append(f"vLLM MAPB probe / transformers one at a time: "
                     f"{report['ratio_vllm_mapb_probe_vs_transformers']:.2f}x lists/s")
    a = report["agreement"]
    lines.append(f"agreement: same first candidate on {a['same_first_candidate']:.0%} of {a['lists']} lists, "
                 f"max |p diff| {a['max_abs_prob_diff']:.4f}")
    for note in ([report["selection"]["note"]] if report["selection"].get("note") else []) + report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
