"""`cotrec bench <name>`: each bench's options and the handler that reads them, side by side, and the
table `cotrec.cli` builds the `bench` command from. A handler imports its bench when it runs: the
benches import Ray, torch and the engines, which `cotrec --help` has no need of."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cotrec.config import load_config
from cotrec.errors import CotrecError
from cotrec.rundir import RunDir
from cotrec.runargs import add_config_options, add_run_options, open_run, run_dir_of

Parser = argparse.ArgumentParser


def _items(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_retriever(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--variant", default="none/random", metavar="USER/ITEM")
    p.add_argument("--schemes", default="previous,disjoint,stride8,stride4,prefix",
                   help="comma-separated: previous (the earlier default), disjoint, prefix, stride<N>")
    p.add_argument("--masks", default="unmasked,masked", help="comma-separated: unmasked, masked")
    p.add_argument("--seeds", type=int, default=3, help="seeds per scheme (config seed, +1, ...)")
    p.add_argument("--out", default="bench/retriever.json", help="JSON output path")


def run_retriever(args: argparse.Namespace) -> int:
    from cotrec.bench.retriever import bench_retriever, format_bench, scheme_settings

    config, run = open_run(args)
    schemes = _items(args.schemes)
    for scheme in schemes:
        try:
            scheme_settings(scheme, config.retriever.max_len)
        except ValueError as exc:
            raise CotrecError(f"--schemes: {exc}") from None
    masks = _items(args.masks)
    if not masks or any(m not in ("masked", "unmasked") for m in masks):
        raise CotrecError(f"--masks {args.masks!r}: expected masked, unmasked or both, comma-separated")
    print(format_bench(bench_retriever(config, run, args.variant, schemes, tuple(m == "masked" for m in masks),
                                       args.seeds, args.out)))
    print(f"wrote {args.out}")
    return 0


def add_llm(p: Parser) -> None:
    add_config_options(p)
    p.add_argument("--backends", default="vllm:eager,vllm:compiled,transformers",
                   help="comma-separated: backends, vllm:eager, vllm:compiled (plain vllm: as llm.enforce_eager says)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per backend; figures are their median")
    p.add_argument("--out", default="bench/llm.json", help="JSON output path")


def run_llm(args: argparse.Namespace) -> int:
    from cotrec.bench.llm import bench_llm, format_bench

    config = load_config(args.config, args.overrides)
    backends = tuple(b.strip() for b in args.backends.split(","))
    print(format_bench(bench_llm(config, args.out, args.prompts, args.max_tokens, backends, args.rounds)))
    print(f"wrote {args.out}")
    return 0


def add_extract(p: Parser) -> None:
    add_config_options(p, run_dir="run directory whose prepared data is copied (not modified); "
                                  "default: runs/<config name>")
    p.add_argument("--parts", default="users,ceiling,naive,waves,stages,scale",
                   help="comma-separated: users,ceiling,naive,waves,stages,scale (ceiling needs users)")
    p.add_argument("--users", type=int, default=48, help="users in the users job, first by user_idx (default 48)")
    p.add_argument("--naive-users", type=int, default=4, help="users run one at a time on transformers (default 4)")
    p.add_argument("--waves-users", type=int, default=None,
                   help="users in the stage-per-step / async comparisons, first by user_idx (default: all)")
    p.add_argument("--waves-max-windows", type=int, default=0,
                   help="extract.max_windows of those comparisons (default 0: no cap, whole histories)")
    p.add_argument("--scale-users", type=int, default=1_000_000,
                   help="synthetic users in the scale part (default 1,000,000)")
    p.add_argument("--out", default="bench/extract.json", help="JSON output path")


def run_extract(args: argparse.Namespace) -> int:
    from cotrec.bench.extract import bench_config, bench_extract, format_bench

    config = bench_config(args.config, args.overrides)
    report = bench_extract(config, RunDir(run_dir_of(args)), args.out, _items(args.parts), users=args.users,
                           naive_users=args.naive_users, waves_users=args.waves_users,
                           waves_max_windows=args.waves_max_windows, scale_users=args.scale_users,
                           overrides=args.overrides)
    print(format_bench(report))
    print(f"wrote {args.out}")
    return 0


def add_ranker(p: Parser) -> None:
    add_config_options(p, run_dir="run directory with prepared data and the variant's retriever candidates (read "
                                  "only); default: runs/<config name>")
    p.add_argument("--variant", default="none/random", metavar="USER/ITEM",
                   help="retriever variant whose test candidate lists are ranked")
    p.add_argument("--lists", type=int, default=64,
                   help="lists ranked by each path, test lists with the target first (default 64)")
    p.add_argument("--out", default="bench/ranker.json", help="JSON output path")


def run_ranker(args: argparse.Namespace) -> int:
    from cotrec.bench.ranker import bench_ranker, format_bench

    config = load_config(args.config, args.overrides)
    print(format_bench(bench_ranker(config, RunDir(run_dir_of(args)), args.variant, args.lists, args.out)))
    print(f"wrote {args.out}")
    return 0


def add_serve(p: Parser) -> None:
    add_config_options(p, run_dir="run directory with prepared data and a trained retriever (read only); "
                                  "default: runs/<config name>")
    p.add_argument("--variant", default="none/random", metavar="USER/ITEM", help="retriever variant served")
    p.add_argument("--ranker", default="llm/zero-shot",
                   help="ranker served: none (retrieval only), llm, llm++, llm/zero-shot, ... (default llm/zero-shot)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated requests in flight per level")
    p.add_argument("--requests", type=int, default=200, help="retrieval-only requests per level (default 200)")
    p.add_argument("--rerank-requests", type=int, default=40,
                   help="retrieval + re-ranking requests per level (default 40; 0 skips them)")
    p.add_argument("--sustain", type=float, default=None, metavar="SECONDS",
                   help="the retrieval-only level at the highest concurrency runs at least this long so "
                        "Serve's autoscaler can act (default: the longest upscale_delay_s + 15 s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="times each retrieval level runs, on the bare process and on Serve (default 3)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the bare-process floor (one FastAPI + uvicorn process holding the retriever)")
    p.add_argument("--out", default="bench/serve.json", help="JSON output path")


def run_serve(args: argparse.Namespace) -> int:
    from cotrec.bench.serve import bench_serve, format_bench

    config = load_config(args.config, args.overrides)
    try:
        levels = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise CotrecError(f"--concurrency {args.concurrency!r}: expected comma-separated integers, e.g. 1,8,32") from None
    print(format_bench(bench_serve(config, RunDir(run_dir_of(args)), args.variant, args.ranker, levels, args.requests,
                                   args.rerank_requests, args.out, args.sustain, args.config, args.rounds,
                                   args.floor)))
    print(f"wrote {args.out}")
    return 0


def add_faults(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--scenarios", default=None,
                   help="comma-separated: actor, engine, train, finetune, replica, driver (default: all)")
    p.add_argument("--variant", default="none/random", metavar="USER/ITEM",
                   help="the retriever variant trained (train) and served (replica)")
    p.add_argument("--actor-users", type=int, default=200_000,
                   help="SYNTHETIC users in the actor scenario (default 200,000)")
    p.add_argument("--out", default="bench/faults.json", help="JSON output path")


def run_faults(args: argparse.Namespace) -> int:
    from cotrec.bench.faults import SCENARIOS, bench_faults, format_bench

    config, run = open_run(args)
    scenarios = SCENARIOS if args.scenarios is None else _items(args.scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise CotrecError(f"--scenarios {args.scenarios!r}: expected some of {', '.join(SCENARIOS)}")
    print(format_bench(bench_faults(config, run, scenarios, args.variant, args.actor_users, args.out)))
    print(f"wrote {args.out}")
    return 0


def add_scale(p: Parser) -> None:
    add_config_options(p, config_help="the base preset (default: ml-100k)",
                       set_help="override a config key after the bench's own settings (repeatable)")
    p.add_argument("--users", default="10000,100000,1000000", help="comma-separated sizes")
    p.add_argument("--run-root", default="runs/scale", help="where each size's run directory goes")
    p.add_argument("--keep", action="store_true", help="keep each size's run directory")
    p.add_argument("--until", metavar="STAGE", help="run the job up to this stage only (e.g. preferences: "
                   "the users extraction without the training after it); default: every stage")
    p.add_argument("--out", default="bench/scale.json", help="JSON output path (the plot beside it)")


def run_scale(args: argparse.Namespace) -> int:
    from cotrec.bench.scale import bench_scale, format_bench

    try:
        sizes = [int(s.replace("_", "")) for s in args.users.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 10:
        raise CotrecError(f"--users {args.users!r}: expected comma-separated user counts of at least 10, e.g. 10000,100000")
    out = Path(args.out)
    print(format_bench(bench_scale(args.config or "ml-100k", sizes, args.overrides, out, Path(args.run_root), args.keep,
                                   args.until)))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def add_models(p: Parser) -> None:
    add_config_options(p)
    p.add_argument("--parts", default="llm,encoder,sasrec",
                   help="comma-separated: llm, encoder, sasrec, users (user tables of 100k and 1M rows)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per part; figures are their median")
    p.add_argument("--texts", type=int, default=256, help="texts the encoder part encodes per round")
    p.add_argument("--sasrec-steps", type=int, default=20,
                   help="training steps per round of the sasrec part (the users part takes half); "
                        "more on a GPU, so that a round runs well past start-up")
    p.add_argument("--out", default="bench/models.json", help="JSON output path")


def run_models(args: argparse.Namespace) -> int:
    from cotrec.bench.models import bench_models, format_bench

    config = load_config(args.config, args.overrides)
    print(format_bench(bench_models(config, args.out, _items(args.parts), args.rounds, texts=args.texts,
                                    sasrec_steps=args.sasrec_steps)))
    print(f"wrote {args.out}")
    return 0


@dataclass(frozen=True)
class Bench:
    help: str
    add_options: Callable[[Parser], None]
    run: Callable[[argparse.Namespace], int]


# In the order `cotrec bench --help` lists them.
BENCHES: dict[str, Bench] = {
    "retriever": Bench("training-row schemes over seeds, masked and unmasked: NDCG@10, Hit@10, best epoch, time to "
                       "it, targets/s", add_retriever, run_retriever),
    "llm": Bench("the same prompts through each LLM backend: tokens/s, load time", add_llm, run_llm),
    "extract": Bench("users job vs engine ceiling, naive, stage-per-step; 1M-user overhead", add_extract, run_extract),
    "ranker": Bench("lists ranked per second: vLLM choice scoring vs one list at a time through transformers",
                    add_ranker, run_ranker),
    "serve": Bench("the Serve app under load: latency percentiles, requests/s, errors and replica counts per "
                   "concurrency level", add_serve, run_serve),
    "faults": Bench("kill an extraction actor, an engine, a Train worker (SASRec, the fine-tune), a Serve replica, "
                    "the driver; count what was lost", add_faults, run_faults),
    "scale": Bench("the main job on SYNTHETIC users with the zero-latency engine and the zero-cost encoder: per "
                   "stage, wall, users/s, CPU and memory", add_scale, run_scale),
    "models": Bench("the real models' throughput per worker on this machine: LLM prompt/generated tokens/s, encoder "
                    "texts/s, SASRec windows/s (what `plan` uses)", add_models, run_models),
}
