"""`cotrec bench models`: the real models' throughput per worker on this machine.

What `cotrec plan` divides a run's work by. One worker is what the config places: an extraction
actor's LLM engine, an embed actor's sentence encoder, a SASRec Train worker with
`retriever.cpus_per_worker` threads. Parts:

  llm      prompt tokens/s (a round of one-token replies: prefill alone), then generated tokens/s
           net of that prefill (a round of full replies), and choice-scoring lists/s
  encoder  texts/s on preference-length sentences, at `embed.batch_size`
  sasrec   training windows/s and evaluation queries/s at the config's model size, for two
           catalogue sizes: the full softmax grows linearly with the items, so the plan
           interpolates (or extrapolates) in items between them
  users    training windows/s with a user token, for user tables of 100k and 1M rows, with
           dense and with sparse user-table updates (`retriever.sparse_user_updates`), on the
           larger catalogue and the config's loss: what the table's size costs a step

Each part runs one untimed warm-up, then `rounds` timed rounds; figures are their median.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cotrec.bench.common import load_average, machine
from cotrec.bench.prompts import MOVIES, preference_conversations, ranking_conversations
from cotrec.config import Config
from cotrec.errors import CotrecError
from cotrec.llm import SamplingSettings, letters, make_engine
from cotrec.progress import log
from cotrec.rundir import write_json

PARTS = ("llm", "encoder", "sasrec", "users")
SASREC_CATALOGUES = (1_000, 20_000)
USER_TABLES = (100_000, 1_000_000)


def _median_of_rounds(rounds: int, measure: Callable[[], dict[str, float]]) -> dict[str, Any]:
    measure()  # warm-up: first passes over new shapes build kernels and caches
    timed = [measure() for _ in range(rounds)]
    return {**{key: round(statistics.median(r[key] for r in timed), 4) for key in timed[0]}, "rounds": timed}


def measure_llm(config: Config, prompts: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    engine = make_engine(config.llm)
    conversations = preference_conversations(prompts)
    ranking = ranking_conversations(prompts)

    def one_round() -> dict[str, float]:
        engine.forget_prompts()
        started = time.perf_counter()
        prefill = engine.chat_sync(conversations, SamplingSettings(max_tokens=1))
        prefill_s = time.perf_counter() - started
        prompt_tokens = sum(r.prompt_tokens for r in prefill)
        engine.forget_prompts()
        started = time.perf_counter()
        replies = engine.chat_sync(conversations, SamplingSettings(max_tokens=max_tokens))
        generate_s = time.perf_counter() - started
        generated = sum(r.completion_tokens for r in replies)
        engine.forget_prompts()
        started = time.perf_counter()
        engine.score_choices_sync(ranking, letters(10))
        scoring_s = time.perf_counter() - started
        # the full round repeats the prefill, so decoding gets what is left of its time
        decode_s = max(generate_s - prefill_s, generate_s * 0.05)
        return {"prompt_tokens_per_s": prompt_tokens / prefill_s, "generated_tokens_per_s": generated / decode_s,
                "scoring_lists_per_s": len(ranking) / scoring_s,
                "prompt_tokens_per_prompt": prompt_tokens / len(conversations),
                "generated_tokens_per_reply": generated / len(conversations)}

    try:
        result = _median_of_rounds(rounds, one_round)
    finally:
        engine.close()
    return {"backend": config.llm.backend, "model": config.llm.model, "device": config.llm.device,
            "dtype": getattr(engine, "dtype", config.llm.dtype), "prompts": prompts, "max_tokens": max_tokens, **result}


def preference_texts(count: int, seed: int = 0) -> list[str]:
    """Sentences of the length and kind the preference recurrence writes (about 40 words)."""
    rng = random.Random(seed)
    return [f"This viewer keeps returning to {a}, {b} and {c}: character-driven stories with a strong sense "
            f"of place. Lately they favour {d} and {e}, and they tend to skip broad comedies and long sequels, "
            f"preferring films that reward close attention." for a, b, c, d, e in
            (rng.sample(MOVIES, 5) for _ in range(count))]


def measure_encoder(config: Config, texts: int, rounds: int) -> dict[str, Any]:
    from cotrec.embed.encoder import encode, load_encoder

    encoder = load_encoder(config.embed.model, config.embed.device)
    batch = preference_texts(texts)

    def one_round() -> dict[str, float]:
        started = time.perf_counter()
        encode(encoder, batch, batch_size=config.embed.batch_size, label="bench")
        return {"texts_per_s": len(batch) / (time.perf_counter() - started)}

    return {"model": config.embed.model, "device": config.embed.device, "batch_size": config.embed.batch_size,
            "texts": texts, **_median_of_rounds(rounds, one_round)}


def _sasrec_at(config: Config, num_items: int, steps: int, rounds: int) -> dict[str, Any]:
    from cotrec.retriever.data import Sequences, eval_queries, training_rows
    from cotrec.retriever.evaluate import score_queries
    from cotrec.retriever.sasrec import SASRec, SASRecConfig
    from cotrec.retriever.train import RetrieverOptimizer, train_step

    rc = config.retriever
    rng = np.random.default_rng(0)
    users = max(64, rc.batch_size * steps // 3)
    histories = [rng.integers(0, num_items, int(rng.integers(rc.max_len, 4 * rc.max_len))) for _ in range(users)]
    seqs = Sequences(users, num_items, histories, rng.integers(0, num_items, users), rng.integers(0, num_items, users))
    windows = training_rows(seqs, rc.max_len, user_token=True, stride=rc.train_stride)
    queries = eval_queries(seqs, "valid", rc.max_len)
    model = SASRec(SASRecConfig(num_items=num_items, num_users=users, dim=rc.dim, max_len=rc.max_len, layers=rc.layers,
                                heads=rc.heads, ffn_mult=rc.ffn_mult, dropout=rc.dropout,
                                sparse_users=rc.sparse_user_updates))
    optim = RetrieverOptimizer(model, rc.lr, rc.weight_decay)
    rows = np.arange(len(windows["users"]))

    def one_round() -> dict[str, float]:
        model.train()
        order = rng.permutation(rows)[:steps * rc.batch_size]
        started = time.perf_counter()
        for start in range(0, len(order), rc.batch_size):
            idx = order[start:start + rc.batch_size]
            train_step(model, model, optim, torch.as_tensor(windows["items"][idx]),
                       torch.as_tensor(windows["users"][idx]), torch.as_tensor(windows["targets"][idx]))
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        score_queries(model, queries, np.arange(len(queries["users"])), rc.mask_history, top_m=rc.top_m,
                      batch_size=rc.eval_batch_size)
        return {"train_windows_per_s": len(order) / train_s,
                "eval_queries_per_s": len(queries["users"]) / (time.perf_counter() - started)}

    return {"items": num_items, "windows_per_round": min(len(rows), steps * rc.batch_size), "eval_queries": users,
            **_median_of_rounds(rounds, one_round)}


def _on_a_train_workers_threads(config: Config, measure: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """`measure()` with the intra-op threads a Train worker gets (`retriever.cpus_per_worker`), seeded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.retriever.cpus_per_worker)))
    try:
        torch.manual_seed(0)
        return measure()
    finally:
        torch.set_num_threads(threads)


def measure_sasrec(config: Config, steps: int, rounds: int) -> dict[str, Any]:
    at = _on_a_train_workers_threads(
        config, lambda: [_sasrec_at(config, items, steps, rounds) for items in SASREC_CATALOGUES])
    rc = config.retriever
    return {"dim": rc.dim, "max_len": rc.max_len, "layers": rc.layers, "batch_size": rc.batch_size,
            "train_stride": rc.train_stride, "loss": "full softmax", "threads": rc.cpus_per_worker, "catalogues": at}


def _user_table_at(config: Config, users: int, sparse: bool, steps: int, rounds: int) -> dict[str, Any]:
    from cotrec.retriever.loss import SampledSoftmax
    from cotrec.retriever.sasrec import SASRec, SASRecConfig
    from cotrec.retriever.train import RetrieverOptimizer, train_step

    rc, items = config.retriever, SASREC_CATALOGUES[-1]
    generator = torch.Generator().manual_seed(0)
    model = SASRec(SASRecConfig(num_items=items, num_users=users, dim=rc.dim, max_len=rc.max_len, layers=rc.layers,
                                heads=rc.heads, ffn_mult=rc.ffn_mult, dropout=rc.dropout, sparse_users=sparse))
    optim = RetrieverOptimizer(model, rc.lr)
    sampled = SampledSoftmax(np.ones(items), rc.negatives, rc.sampler) if rc.loss == "sampled" else None
    # full rows: every position trains a target, as the first row of each history does
    batches = [(torch.randint(1, items + 1, (rc.batch_size, rc.max_len), generator=generator),
                torch.randint(0, users, (rc.batch_size,), generator=generator),
                torch.randint(1, items + 1, (rc.batch_size, rc.max_len + 1), generator=generator))
               for _ in range(steps)]

    def one_round() -> dict[str, float]:
        model.train()
        started = time.perf_counter()
        for inputs, user_ids, targets in batches:
            train_step(model, model, optim, inputs, user_ids, targets, sampled, generator)
        return {"train_windows_per_s": steps * rc.batch_size / (time.perf_counter() - started)}

    return {"users": users, "sparse_user_updates": sparse, **_median_of_rounds(rounds, one_round)}


def measure_user_tables(config: Config, steps: int, rounds: int) -> dict[str, Any]:
    at = _on_a_train_workers_threads(config, lambda: [_user_table_at(config, users, sparse, steps, rounds)
                                                      for users in USER_TABLES for sparse in (False, True)])
    rc = config.retriever
    return {"items": SASREC_CATALOGUES[-1], "dim": rc.dim, "max_len": rc.max_len, "batch_size": rc.batch_size,
            "loss": rc.loss, "negatives": rc.negatives if rc.loss == "sampled" else None,
            "threads": rc.cpus_per_worker, "tables": at}


def bench_models(config: Config, out: str | Path, parts: tuple[str, ...] = PARTS, rounds: int = 3, prompts: int = 32,
                 max_tokens: int = 64, texts: int = 256, sasrec_steps: int = 20) -> dict[str, Any]:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise CotrecError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if rounds < 1:
        raise CotrecError(f"--rounds must be at least 1, got {rounds}")
    report: dict[str, Any] = {"bench": "models", "machine": machine(),
                              "rounds": rounds, "figures": "per worker; the median of the timed rounds after a warm-up",
                              "load_average_before": load_average()}
    if "llm" in parts:
        log(f"bench models: llm ({config.llm.backend}, {config.llm.model})")
        report["llm"] = measure_llm(config, prompts, max_tokens, rounds)
    if "encoder" in parts:
        log(f"bench models: encoder ({config.embed.model})")
        report["encoder"] = measure_encoder(config, texts, rounds)
    if "sasrec" in parts:
        log(f"bench models: sasrec (dim {config.retriever.dim}, catalogues {SASREC_CATALOGUES})")
        report["sasrec"] = measure_sasrec(config, sasrec_steps, rounds)
    if "users" in parts:
        log(f"bench models: user tables of {', '.join(f'{u:,}' for u in USER_TABLES)} rows, dense and sparse updates")
        report["users"] = measure_user_tables(config, sasrec_steps // 2, rounds)
    report["load_average_after"] = load_average()
    write_json(Path(out), report)
    return report


def format_bench(report: dict[str, Any]) -> str:
    lines = []
    if "llm" in report:
        r = report["llm"]
        lines.append(f"llm      {r['backend']} {r['model']} ({r['dtype']}): {r['prompt_tokens_per_s']:,.1f} prompt tok/s, "
                     f"{r['generated_tokens_per_s']:,.1f} generated tok/s, {r['scoring_lists_per_s']:,.2f} lists/s")
    if "encoder" in report:
        r = report["encoder"]
        lines.append(f"encoder  {r['model']} ({r['device']}): {r['texts_per_s']:,.1f} texts/s")
    if "sasrec" in report:
        for r in report["sasrec"]["catalogues"]:
            lines.append(f"sasrec   {r['items']:,} items: {r['train_windows_per_s']:,.1f} training windows/s, "
                         f"{r['eval_queries_per_s']:,.1f} evaluation queries/s")
    if "users" in report:
        for r in report["users"]["tables"]:
            lines.append(f"users    {r['users']:,} users, {'sparse' if r['sparse_user_updates'] else 'dense'} updates: "
                         f"{r['train_windows_per_s']:,.1f} training windows/s")
    return "\n".join(lines)
