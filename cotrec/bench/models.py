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

Each part runs one untimed warm-up, then `rounds` timed rounds; figures are their median. The
sasrec and users parts run where the config places a Train worker: on a GPU when
`retriever.gpus_per_worker` > 0 (a one-line error if there is none), else on the CPU; the encoder
on `embed.device`. Each part records its device (and the GPU's name), which `cotrec plan` checks
against the stage's placement.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, TypedDict, TypeVar

import numpy as np
import torch

from cotrec.bench.common import Machine, Spread, Stamp, load_average, machine, spread, stamp
from cotrec.bench.prompts import MOVIES, preference_conversations, ranking_conversations
from cotrec.config import Config
from cotrec.errors import CotrecError
from cotrec.llm import SamplingSettings, letters, make_engine
from cotrec.llm.placement import pick_device
from cotrec.progress import log
from cotrec.rundir import write_json

PARTS = ("llm", "encoder", "sasrec", "users")
SASREC_CATALOGUES = (1_000, 20_000)
USER_TABLES = (100_000, 1_000_000)
T = TypeVar("T")


class Where(TypedDict, total=False):
    """A part's device (and the GPU's name on one)."""

    device: str
    gpu: str


class RoundFigures(Where, total=False):
    """`_median_of_rounds`: each figure a part's round measures, the median over the timed rounds, with
    the figures' spread and every round's own."""

    prompt_tokens_per_s: float
    generated_tokens_per_s: float
    scoring_lists_per_s: float
    prompt_tokens_per_prompt: float
    generated_tokens_per_reply: float
    texts_per_s: float
    train_windows_per_s: float
    eval_queries_per_s: float
    spread: dict[str, Spread]
    rounds: list[dict[str, float]]


class LlmPart(RoundFigures, total=False):
    backend: str
    model: str
    dtype: str
    prompts: int
    max_tokens: int


class EncoderPart(RoundFigures, total=False):
    model: str
    batch_size: int
    texts: int


class CatalogueFigures(RoundFigures, total=False):
    items: int
    windows_per_round: int
    eval_queries: int


class SasrecPart(Where, total=False):
    dim: int
    max_len: int
    layers: int
    batch_size: int
    train_stride: int
    loss: str
    threads: float
    catalogues: list[CatalogueFigures]


class UserTableFigures(RoundFigures, total=False):
    users: int
    sparse_user_updates: bool


class UserTablesPart(Where, total=False):
    items: int
    dim: int
    max_len: int
    batch_size: int
    loss: str
    negatives: Optional[int]
    threads: float
    tables: list[UserTableFigures]


class ModelsReport(Stamp, total=False):
    """`bench models`' JSON: one worker's rates per part, and the machine they were measured on."""

    machine: Machine
    figures: str
    llm: LlmPart
    encoder: EncoderPart
    sasrec: SasrecPart
    users: UserTablesPart
    load_average_after: list[float]


def _where(device: str | torch.device) -> Where:
    """What a part records of its device: `plan` uses a figure only for a stage placed alike."""
    if not str(device).startswith("cuda"):
        return {"device": str(device)}
    return {"device": "cuda", "gpu": torch.cuda.get_device_name(torch.device(device))}


def _needs_cuda(setting: str, parts: str, on_cpu: str) -> None:
    if not torch.cuda.is_available():
        raise CotrecError(f"{setting}: bench models runs the {parts} on a GPU, and torch {torch.__version__} sees "
                          f"none on this machine; run it where one is, or --set {on_cpu} to measure on the CPU")


def train_device(config: Config) -> torch.device:
    """A SASRec Train worker's device: a GPU when the config gives each worker one."""
    gpus = config.retriever.gpus_per_worker
    if gpus <= 0:
        return torch.device("cpu")
    _needs_cuda(f"retriever.gpus_per_worker is {gpus:g}", "sasrec and users parts", "retriever.gpus_per_worker=0")
    return torch.device("cuda")


def encoder_device(config: Config) -> str:
    device = config.embed.device
    if device.startswith("cuda"):
        _needs_cuda(f"embed.device is {device}", "encoder part", "embed.device=cpu")
    return device


def _synchronize(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):  # kernels run asynchronously: a timer read before this misses them
        torch.cuda.synchronize(device)


def _median_of_rounds(rounds: int, measure: Callable[[], dict[str, float]]) -> RoundFigures:
    measure()  # warm-up: first passes over new shapes build kernels and caches
    timed = [measure() for _ in range(rounds)]
    return {**{key: round(statistics.median(r[key] for r in timed), 4) for key in timed[0]},
            "spread": {key: spread((r[key] for r in timed), 4) for key in timed[0]}, "rounds": timed}


def measure_llm(config: Config, prompts: int, max_tokens: int, rounds: int) -> LlmPart:
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
    return {"backend": config.llm.backend, "model": config.llm.model, **_where(pick_device(config.llm.device)),
            "dtype": getattr(engine, "dtype", config.llm.dtype), "prompts": prompts, "max_tokens": max_tokens, **result}


def preference_texts(count: int, seed: int = 0) -> list[str]:
    """Sentences of the length and kind the preference recurrence writes (about 40 words)."""
    rng = random.Random(seed)
    return [f"This viewer keeps returning to {a}, {b} and {c}: character-driven stories with a strong sense "
            f"of place. Lately they favour {d} and {e}, and they tend to skip broad comedies and long sequels, "
            f"preferring films that reward close attention." for a, b, c, d, e in
            (rng.sample(MOVIES, 5) for _ in range(count))]


def measure_encoder(config: Config, texts: int, rounds: int) -> EncoderPart:
    from cotrec.embed.encoder import encode, load_encoder

    device = encoder_device(config)
    encoder = load_encoder(config.embed.model, config.embed.device)
    batch = preference_texts(texts)

    def one_round() -> dict[str, float]:
        _synchronize(device)
        started = time.perf_counter()
        encode(encoder, batch, batch_size=config.embed.batch_size, label="bench")
        _synchronize(device)
        return {"texts_per_s": len(batch) / (time.perf_counter() - started)}

    return {"model": config.embed.model, **_where(device), "batch_size": config.embed.batch_size,
            "texts": texts, **_median_of_rounds(rounds, one_round)}


def _sasrec_at(config: Config, num_items: int, steps: int, rounds: int, device: torch.device) -> CatalogueFigures:
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
                                sparse_users=rc.sparse_user_updates)).to(device)
    optim = RetrieverOptimizer(model, rc.lr, rc.weight_decay)
    rows = np.arange(len(windows["users"]))

    def one_round() -> dict[str, float]:
        model.train()
        order = rng.permutation(rows)[:steps * rc.batch_size]
        _synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(order), rc.batch_size):
            idx = order[start:start + rc.batch_size]
            # each batch copied to the device inside the timing, as the training loop does
            train_step(model, model, optim, torch.as_tensor(windows["items"][idx], device=device),
                       torch.as_tensor(windows["users"][idx], device=device),
                       torch.as_tensor(windows["targets"][idx], device=device))
        _synchronize(device)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        score_queries(model, queries, np.arange(len(queries["users"])), rc.mask_history, top_m=rc.top_m,
                      batch_size=rc.eval_batch_size, device=device)
        _synchronize(device)
        return {"train_windows_per_s": len(order) / train_s,
                "eval_queries_per_s": len(queries["users"]) / (time.perf_counter() - started)}

    return {"items": num_items, "windows_per_round": min(len(rows), steps * rc.batch_size), "eval_queries": users,
            **_median_of_rounds(rounds, one_round)}


def _on_a_train_workers_threads(config: Config, measure: Callable[[], list[T]]) -> list[T]:
    """`measure()` with the intra-op threads a Train worker gets (`retriever.cpus_per_worker`), seeded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.retriever.cpus_per_worker)))
    try:
        torch.manual_seed(0)
        return measure()
    finally:
        torch.set_num_threads(threads)


def measure_sasrec(config: Config, steps: int, rounds: int) -> SasrecPart:
    device = train_device(config)
    at = _on_a_train_workers_threads(
        config, lambda: [_sasrec_at(config, items, steps, rounds, device) for items in SASREC_CATALOGUES])
    rc = config.retriever
    return {**_where(device), "dim": rc.dim, "max_len": rc.max_len, "layers": rc.layers, "batch_size": rc.batch_size,
            "train_stride": rc.train_stride, "loss": "full softmax", "threads": rc.cpus_per_worker, "catalogues": at}


def _user_table_at(config: Config, users: int, sparse: bool, steps: int, rounds: int,
                   device: torch.device) -> UserTableFigures:
    from cotrec.retriever.loss import SampledSoftmax
    from cotrec.retriever.sasrec import SASRec, SASRecConfig
    from cotrec.retriever.train import RetrieverOptimizer, train_step

    rc, items = config.retriever, SASREC_CATALOGUES[-1]
    generator = torch.Generator().manual_seed(0)  # a CPU one, as the training loop passes
    model = SASRec(SASRecConfig(num_items=items, num_users=users, dim=rc.dim, max_len=rc.max_len, layers=rc.layers,
                                heads=rc.heads, ffn_mult=rc.ffn_mult, dropout=rc.dropout,
                                sparse_users=sparse)).to(device)
    optim = RetrieverOptimizer(model, rc.lr)
    sampled = SampledSoftmax(np.ones(items), rc.negatives, rc.sampler) if rc.loss == "sampled" else None
    # full rows: every position trains a target, as the first row of each history does
    batches = [(torch.randint(1, items + 1, (rc.batch_size, rc.max_len), generator=generator),
                torch.randint(0, users, (rc.batch_size,), generator=generator),
                torch.randint(1, items + 1, (rc.batch_size, rc.max_len + 1), generator=generator))
               for _ in range(steps)]

    def one_round() -> dict[str, float]:
        model.train()
        _synchronize(device)
        started = time.perf_counter()
        for inputs, user_ids, targets in batches:
            train_step(model, model, optim, inputs.to(device), user_ids.to(device), targets.to(device), sampled,
                       generator)
        _synchronize(device)
        return {"train_windows_per_s": steps * rc.batch_size / (time.perf_counter() - started)}

    return {"users": users, "sparse_user_updates": sparse, **_median_of_rounds(rounds, one_round)}


def measure_user_tables(config: Config, steps: int, rounds: int) -> UserTablesPart:
    device = train_device(config)
    at = _on_a_train_workers_threads(config, lambda: [_user_table_at(config, users, sparse, steps, rounds, device)
                                                      for users in USER_TABLES for sparse in (False, True)])
    rc = config.retriever
    return {**_where(device), "items": SASREC_CATALOGUES[-1], "dim": rc.dim, "max_len": rc.max_len,
            "batch_size": rc.batch_size, "loss": rc.loss, "negatives": rc.negatives if rc.loss == "sampled" else None,
            "threads": rc.cpus_per_worker, "tables": at}


def bench_models(config: Config, out: str | Path, parts: tuple[str, ...] = PARTS, rounds: int = 3, prompts: int = 32,
                 max_tokens: int = 64, texts: int = 256, sasrec_steps: int = 20) -> ModelsReport:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise CotrecError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if rounds < 1:
        raise CotrecError(f"--rounds must be at least 1, got {rounds}")
    if texts < 1 or sasrec_steps < 2:
        raise CotrecError(f"--texts must be at least 1 and --sasrec-steps at least 2, got {texts} and {sasrec_steps}")
    # no GPU where the config asks for one: said before any part runs
    if "encoder" in parts:
        encoder_device(config)
    if {"sasrec", "users"} & set(parts):
        train_device(config)
    report: ModelsReport = {**stamp("models", rounds), "machine": machine(),
                            "figures": "per worker; the median of the timed rounds after a warm-up; spread: their "
                                       "min, median and max"}
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


def _device_label(part: Where) -> str:
    return f"{part.get('device', 'cpu')} {part['gpu']}" if part.get("gpu") else part.get("device", "cpu")


def format_bench(report: ModelsReport) -> str:
    lines = []
    if "llm" in report:
        r = report["llm"]
        lines.append(f"llm      {r['backend']} {r['model']} ({r['dtype']}): {r['prompt_tokens_per_s']:,.1f} prompt tok/s, "
                     f"{r['generated_tokens_per_s']:,.1f} generated tok/s, {r['scoring_lists_per_s']:,.2f} lists/s")
    if "encoder" in report:
        r = report["encoder"]
        lines.append(f"encoder  {r['model']} ({_device_label(r)}): {r['texts_per_s']:,.1f} texts/s")
    if "sasrec" in report:
        where = _device_label(report["sasrec"])
        for r in report["sasrec"]["catalogues"]:
            lines.append(f"sasrec   ({where}) {r['items']:,} items: {r['train_windows_per_s']:,.1f} training "
                         f"windows/s, {r['eval_queries_per_s']:,.1f} evaluation queries/s")
    if "users" in report:
        where = _device_label(report["users"])
        for r in report["users"]["tables"]:
            updates = "sparse" if r["sparse_user_updates"] else "dense"
            lines.append(f"users    ({where}) {r['users']:,} users, {updates} updates: "
                         f"{r['train_windows_per_s']:,.1f} training windows/s")
    return "\n".join(lines)
