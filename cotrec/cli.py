"""`cotrec <stage> [--config NAME|PATH] [--run-dir DIR] [--set key=value ...]`

Every stage command loads and validates the config, records it in the run directory and calls
the same stage function the job drivers and the tests call. Errors the user can cause end in
one line on stderr and exit code 2. Each command's options stand beside its handler, and
`COMMANDS` is the table the parser is built from; the benches' are in `cotrec.bench.commands`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cotrec import __version__
from cotrec.bench.commands import BENCHES
from cotrec.config import load_config
from cotrec.data.prepare import format_summary, prepare
from cotrec.errors import CotrecError
from cotrec.runargs import add_config_options, add_run_options, open_run, run_dir_of
from cotrec.rundir import RunDir
from cotrec.storage import run_path

Parser = argparse.ArgumentParser
Args = argparse.Namespace


def cmd_prepare(args: Args) -> int:
    config, run = open_run(args)
    summary = prepare(config, run, force=args.force)
    print(format_summary(summary))
    print(f"wrote {run / 'data'}")
    return 0


def cmd_run(args: Args) -> int:
    from cotrec.pipeline import run_pipeline
    from cotrec.report import format_report

    config, run = open_run(args)
    # `ray job stop` and `kill` send SIGTERM: end through SystemExit so the pipeline records the
    # interrupted stage's time and shuts Ray down, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run_pipeline(config, run, force=args.force)
    print("== summary ==")
    print(format_report(result["stages"]["report"], result["timings"]))
    return 0


def prepared_run(args: Args) -> Path:
    """The run directory a command reads (report, serve, evaluate): a one-line error, before anything
    is written there, when it holds no prepared run."""
    root = run_path(run_dir_of(args))
    if not (root / "data").is_dir():
        raise CotrecError(f"{root}: not a prepared run directory (no data/); run `cotrec run` or "
                          "`cotrec prepare` first")
    return root


def report_options(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--check", metavar="FOLDER",
                   help="recompute a report folder's table2.md from its per-list outputs (table2.json, "
                        "rankings/) and compare, instead of rendering a run")


def cmd_report(args: Args) -> int:
    from cotrec.pipeline import STAGE_NAMES
    from cotrec.report import format_report, write_reports

    if args.check:
        return check_report_folder(Path(args.check))

    root = prepared_run(args)
    if args.config is None and (root / "config.yaml").is_file():
        args.config = str(root / "config.yaml")  # the run's own settings, not the default preset's
    config, run = open_run(args)
    print(format_report(write_reports(config, run, STAGE_NAMES)))
    return 0


def check_report_folder(folder: Path) -> int:
    from cotrec.ranker.probe import check_probe
    from cotrec.ranker.table2 import MANIFEST, check_report
    from cotrec.reporting.tables import table2_markdown

    if not (folder / MANIFEST).is_file():
        raise CotrecError(f"{folder}: no {MANIFEST} (a report folder written by `cotrec report` or `cotrec run`)")
    differs = check_report(folder, table2_markdown)
    if differs is not None:
        raise CotrecError(f"{folder / 'table2.md'}: not what its per-list outputs give: {differs}")
    print(f"{folder / 'table2.md'}: every figure recomputed from {folder / MANIFEST} and its rankings")
    for record in sorted(folder.glob("probe-*.json")):  # a frozen-feature probe kept beside the table
        lists = record.with_name(f"{record.stem}-lists.parquet")
        if not lists.is_file():
            raise CotrecError(f"{record}: no {lists.name} beside it (the probe's per-list ranks)")
        differs = check_probe(record, lists)
        if differs is not None:
            raise CotrecError(f"{record}: not what its per-list ranks give: {differs}")
        print(f"{record}: every figure recomputed from {lists.name}")
    return 0


def cmd_config(args: Args) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def embed_options(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--kind", dest="kinds", action="append", choices=["caption", "description", "preference"],
                   help="embed only this kind (repeatable); default: every kind whose source exists")


def cmd_embed(args: Args) -> int:
    from cotrec.embed import embed, format_summary as format_embed

    config, run = open_run(args)
    print(format_embed(embed(config, run, force=args.force, kinds=args.kinds or None)))
    return 0


def retriever_train_options(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--variant", default="none/random", metavar="USER/ITEM",
                   help="user init none|random|preference / item init random|caption|description")
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")


def cmd_retriever_train(args: Args) -> int:
    from cotrec.reporting.console import format_train_summary
    from cotrec.retriever import train_variant

    config, run = open_run(args)
    print(format_train_summary(train_variant(config, run, args.variant, seed=args.seed, force=args.force)))
    return 0


def retriever_grid_options(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (retriever.grid_seeds)")


def cmd_retriever_grid(args: Args) -> int:
    from cotrec.reporting.console import format_grid_summary
    from cotrec.retriever import retriever_grid

    if args.seeds is not None:
        args.overrides.append(f"retriever.grid_seeds={args.seeds}")
    config, run = open_run(args)
    print(format_grid_summary(retriever_grid(config, run, force=args.force)))
    return 0


def ranker_options(action: str) -> Callable[[Parser], None]:
    """The options of `ranker train|eval|probe`: the retriever whose lists, the prompt."""
    def add(p: Parser) -> None:
        add_run_options(p)
        p.add_argument("--retriever", default="preference/description", metavar="USER/ITEM",
                       help="the retriever variant whose candidates are ranked")
        p.add_argument("--prompt", default="llm++", choices=["llm", "llm+", "llm++"] + (["none"] if action == "eval" else []),
                       help="llm: titles; llm+: + preference; llm++: + preference and perception key terms"
                            + ("; none: the retriever's order" if action == "eval" else ""))
        if action == "eval":
            p.add_argument("--zero-shot", action="store_true", help="the base model, not fine-tuned")
        if action == "probe":
            p.add_argument("--train-lists", type=int, default=None, metavar="N",
                           help="train the probe on a seeded sample of N of the fine-tune's training lists "
                                "(default: all of them; each costs one forward pass)")
    return add


def cmd_ranker_train(args: Args) -> int:
    from cotrec.ranker.stage import ranker_train

    config, run = open_run(args)
    summary = ranker_train(config, run, args.retriever, args.prompt, force=args.force)
    print(f"ranker    {args.prompt} on {args.retriever}" + ("  [up to date, skipped]" if summary["skipped"] else ""))
    print(f"lists     {summary['train_lists']:,} training, {summary['held_out_lists']:,} held out "
          f"({summary['masked_positives']:,} known positives masked)")
    if "not_trained" in summary:
        print(f"result    {summary['not_trained']}")
    else:
        print(f"loss      {summary['first_epoch_loss']:.4f} (epoch 1) -> {summary['last_epoch_loss']:.4f} "
              f"(epoch {summary['epochs']}); chance {summary['letter_loss_chance']:.4f}")
        print(f"held out  ndcg@10 {summary['base_val_ndcg@10']:.4f} -> {summary['best_val_ndcg@10']:.4f} "
              f"± {summary['best_val_ndcg@10_se']:.4f} (epoch {summary['best_epoch']} kept)")
        print(f"training  {summary['num_workers']} worker(s), ZeRO-{summary['zero_stage']}, {summary['precision']}, "
              f"{summary['train_seconds']:.0f} s" + (f"; {summary['shape_note']}" if summary["shape_note"] else ""))
    print(f"folder    {summary['folder']}")
    return 0


def cmd_ranker_probe(args: Args) -> int:
    from cotrec.ranker.stage import ranker_probe
    from cotrec.reporting.tables import estimate

    config, run = open_run(args)
    found = ranker_probe(config, run, args.retriever, args.prompt, force=args.force, train_lists=args.train_lists)
    difference = found["probe_minus_zero_shot"]
    print(f"probe      {args.prompt} on {args.retriever}: {found['train_lists']:,} training lists, "
          f"{found['test_lists']:,} test lists" + ("  [up to date, skipped]" if found["skipped"] else ""))
    print(f"scorer     weight decay {found['weight_decay']:g} (cross-validated on the training lists); its NDCG@10 "
          f"on them {found['probe_train_ndcg@10']:.4f}")
    print(f"ndcg@10    probe {found['probe_ndcg@10']:.4f}, zero-shot {found['zero_shot_ndcg@10']:.4f}, difference "
          f"{estimate(difference)}")
    print(f"reading    {found['reading']}")
    print(f"folder     {found['folder']}")
    return 0


def cmd_ranker_eval(args: Args) -> int:
    from cotrec.ranker.evaluate import ranker_eval

    ranker = args.prompt + ("/zero-shot" if args.zero_shot and args.prompt != "none" else "")
    config, run = open_run(args)
    m = ranker_eval(config, run, args.retriever, ranker, force=args.force)
    print(f"ranker     {ranker} on {args.retriever}" + ("  [up to date, skipped]" if m["skipped"] else ""))
    if "not_run" in m:
        print(f"result     {m['not_run']}")
        return 0
    print(f"test       ndcg@10 {m['ndcg@10']:.4f} hit@1 {m['hit@1']:.4f} hit@10 {m['hit@10']:.4f} "
          f"(retriever ndcg@10 {m['retriever_ndcg@10']:.4f})")
    if m.get("mapb") is not None:
        print(f"mapb       {m['mapb']:.4f}")
    print(f"users      {m['users']:,} ({m['ranked_users']:,} re-ranked: target among the candidates)")
    print(f"folder     {m['folder']}")
    return 0


def cmd_ranker_grid(args: Args) -> int:
    from cotrec.ranker.grid import ranker_grid
    from cotrec.reporting.console import format_table2_summary

    config, run = open_run(args)
    print(format_table2_summary(ranker_grid(config, run, force=args.force)))
    return 0


def serve_options(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--variant", default=None, metavar="USER/ITEM", help="retriever variant (default: CRM++)")
    p.add_argument("--ranker", default=None, help="ranker: none, llm, llm++, llm/zero-shot, ... (default: the last "
                                                  "ranker.grid entry)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; any but a loopback one needs API keys or --insecure")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-file", metavar="PATH",
                   help="API keys, one a line (# comments): clients send Authorization: Bearer KEY")
    p.add_argument("--api-keys-env", metavar="NAME", help="an environment variable holding API keys (comma-separated)")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without API keys (anyone who reaches it reads every user's data)")
    p.add_argument("--expose-preferences", action="store_true",
                   help="answer GET /users/ID/preference (the LLM-inferred preference text of any user); off by default")
    p.add_argument("--open-horizons", metavar="valid,test",
                   help="let clients ask for these leave-one-out horizons (evaluation data); closed by default")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="answer 504 for a request not done in this time (default 60)")


def cmd_serve(args: Args) -> int:
    from cotrec.serving import checked_access, direct_urls, serve_until_stopped, start_app

    access = {"api_keys_file": args.api_keys_file, "api_keys_env": args.api_keys_env,
              "expose_preferences": args.expose_preferences, "request_timeout_s": args.request_timeout,
              "open_horizons": [h.strip() for h in (args.open_horizons or "").split(",") if h.strip()]}
    unknown = [h for h in access["open_horizons"] if h not in ("valid", "test")]
    if unknown:
        raise CotrecError(f"--open-horizons {args.open_horizons!r}: expected valid, test or both, comma-separated")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise CotrecError(f"--request-timeout {args.request_timeout}: expected seconds above 0")
    access = checked_access(args.host, access, args.insecure)  # refused before anything is written or started
    prepared_run(args)
    config, run = open_run(args)
    url = start_app(run.root, args.variant, args.ranker, host=args.host, port=args.port, access=access,
                    insecure=args.insecure)
    keyed = bool(args.api_keys_file or args.api_keys_env)
    direct = direct_urls(args.host)
    print(f"serving {run.root} at {url} (POST /recommend" + (", GET /users/ID/preference" if args.expose_preferences
                                                            else "") + "; GET /healthz without a key); "
          + (f"without the proxy, the Ingress replica at {', '.join(direct)} (its own port: another if it is "
             "replaced); " if direct else "")
          + ("API keys required" if keyed else "NO API KEYS: anyone who reaches the port reads every user's data")
          + "; Ctrl-C or SIGTERM stops", flush=True)
    serve_until_stopped()
    return 0


def evaluate_options(p: Parser) -> None:
    add_run_options(p)
    p.add_argument("--via-serve", action="store_true", help="send every test user through POST /recommend")
    p.add_argument("--url", default=None, help="a running app (default: start one locally, then stop it)")
    p.add_argument("--variant", default=None, metavar="USER/ITEM", help="retriever variant (default: CRM++)")
    p.add_argument("--ranker", default="none", help="none (retrieval only) or a ranker name: llm, llm++, ...")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")


def cmd_evaluate(args: Args) -> int:
    from cotrec.serving import evaluate_via_serve, format_evaluation, free_port, start_app, stop_app

    if not args.via_serve:
        raise CotrecError("only --via-serve is implemented here; offline metrics come from `cotrec retriever train` "
                          "and `cotrec ranker eval`")
    prepared_run(args)
    config, run = open_run(args)
    variant = args.variant or config.ranker.default_retriever
    url = args.url
    started = url is None
    if started:
        url = start_app(run.root, variant, args.ranker, port=free_port(), access={"open_horizons": ["test"]})
    try:
        result = evaluate_via_serve(run, url, variant, args.ranker, concurrency=args.concurrency)
    finally:
        if started:
            stop_app()
    print(format_evaluation(result))
    return 0 if result.get("equal", True) else 1


def extract_options(what: str) -> Callable[[Parser], None]:
    def add(p: Parser) -> None:
        add_run_options(p)
        p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N rows (a trial run)")
        if what == "users":
            p.add_argument("--incremental", action="store_true",
                           help="continue each changed user's stored recurrence instead of starting it again")
        if what == "perceptions":
            p.add_argument("--pairs", type=Path, default=None, metavar="FILE",
                           help="parquet/CSV of user_idx, horizon, item_idx; default: the retriever's candidates "
                                "(extract.perception_candidates)")
    return add


def cmd_extract(args: Args) -> int:
    from cotrec.extract import extract_items, extract_perceptions, extract_users, format_summary as format_extract
    from cotrec.extract.stage import read_pairs

    config, run = open_run(args)
    if args.what == "items":
        summary = extract_items(config, run, force=args.force, limit=args.limit)
    elif args.what == "users":
        summary = extract_users(config, run, force=args.force, limit=args.limit, incremental=args.incremental)
    else:
        from cotrec.ranker.lists import candidate_pairs

        if args.pairs is not None:
            pairs, source = read_pairs(args.pairs), str(args.pairs)
        else:
            pairs, source = candidate_pairs(run, config)
        summary = extract_perceptions(config, run, pairs, source, force=args.force, limit=args.limit)
    print(format_extract(summary))
    return 0


def cmd_model_prepare(args: Args) -> int:
    from cotrec.llm.embedded import resolve_model

    config = load_config(args.config, args.overrides)
    print(f"{config.llm.model}: {resolve_model(config.llm.model)}")
    return 0


def llm_serve_options(p: Parser) -> None:
    add_config_options(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", dest="served_name", default="embedded")


def cmd_llm_serve(args: Args) -> int:
    from cotrec.llm.server import start_vllm_server

    config = load_config(args.config, args.overrides)
    server = start_vllm_server(config.llm, args.port, served_name=args.served_name, host=args.host)
    print(f"serving {config.llm.model} as {args.served_name!r} at {server.base_url} (log: {server.log_path}); "
          "Ctrl-C stops it")
    try:
        server.process.wait()
    finally:
        server.stop()
    return 0


def plan_options(p: Parser) -> None:
    add_config_options(p, run_dir="a finished run whose work per user is measured; default: runs/<config name>")
    p.add_argument("--users", type=int, required=True, help="users to plan for")
    p.add_argument("--items", type=int, help="catalogue size to plan for (default: the run's)")
    p.add_argument("--models", default="bench/models.json", help="`cotrec bench models` output (per-worker throughput)")
    p.add_argument("--throughput", action="append", default=[], metavar="KEY=VALUE",
                   help="a per-worker rate to use instead, e.g. llm.generated_tokens_per_s=2500 (repeatable)")
    p.add_argument("--out", help="also write the plan as JSON here")


def cmd_plan(args: Args) -> int:
    from cotrec.plan import format_plan, parse_throughput, plan, write_plan

    config = load_config(args.config, args.overrides)
    root = run_path(run_dir_of(args))
    if not (root / "data" / "stats.json").is_file():
        raise CotrecError(f"{root}: not a prepared run directory (no data/stats.json); the plan reads the work "
                          "per user from a finished run (`cotrec run`), passed as --run-dir")
    result = plan(config, RunDir(root), args.users, args.items, Path(args.models), parse_throughput(args.throughput))
    write_plan(result, Path(args.out) if args.out else None)
    print(format_plan(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def no_config_help(p: Parser) -> None:
    add_config_options(p, config_help="")


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("ranker", "eval"): `cotrec ranker eval`
    help: str
    options: Callable[[Parser], None]
    handler: Callable[[Args], int]


# The commands that take subcommands: (help, the namespace key of the one chosen, its metavar).
GROUPS = {
    "extract": ("LLM extraction on Ray Data: item descriptions, preferences, perceptions", "what", "WHAT"),
    "retriever": ("SASRec retriever: train one variant or the Table 1 grid", "retriever_command", "ACTION"),
    "ranker": ("LLM ranker: fine-tune (LoRA + DeepSpeed), evaluate, Table 2", "ranker_command", "ACTION"),
    "bench": ("benchmarks; figures written to JSON", "bench_command", "BENCH"),
    "model": ("the LLM's weights", "model_command", "ACTION"),
    "llm": ("the LLM engine", "llm_command", "ACTION"),
}

# In the order `cotrec --help` lists them.
COMMANDS = [
    Command(("run",), "the main job: prepare, extract, embed, retriever grid, perceptions, ranker grid, report; "
            "finished stages are skipped", add_run_options, cmd_run),
    Command(("report",), "render <run>/reports/: Table 1, Table 2, plots, time and tokens per stage", report_options,
            cmd_report),
    Command(("prepare",), "load, k-core filter and split the dataset", add_run_options, cmd_prepare),
    Command(("config",), "print the resolved configuration", no_config_help, cmd_config),
    Command(("embed",), "Encode & Map: embed captions, descriptions, preferences", embed_options, cmd_embed),
    Command(("extract", "items"), "an objective description of every item", extract_options("items"), cmd_extract),
    Command(("extract", "users"), "the preference recurrence of every user (train / valid / test horizons)",
            extract_options("users"), cmd_extract),
    Command(("extract", "perceptions"), "role-played review + key terms per (user, candidate) pair",
            extract_options("perceptions"), cmd_extract),
    Command(("retriever", "train"), "train and evaluate one user/item variant", retriever_train_options,
            cmd_retriever_train),
    Command(("retriever", "grid"), "Table 1: every retriever.grid variant x seeds", retriever_grid_options,
            cmd_retriever_grid),
    Command(("ranker", "train"), "fine-tune a LoRA ranker on a retriever's training lists and merge it",
            ranker_options("train"), cmd_ranker_train),
    Command(("ranker", "eval"), "rank a retriever's test lists: NDCG@10 over all users, MAPB", ranker_options("eval"),
            cmd_ranker_eval),
    Command(("ranker", "probe"), "a frozen-feature probe of the base model against its zero-shot ranking "
            "(is the model or the recipe the limit?)", ranker_options("probe"), cmd_ranker_probe),
    Command(("ranker", "grid"), "Table 2: ranker.grid x ranker.retrievers", add_run_options, cmd_ranker_grid),
    Command(("serve",), "the Ray Serve app (retriever -> ranker) over a run directory", serve_options, cmd_serve),
    Command(("evaluate",), "scaled evaluation: every test user through the Serve chain", evaluate_options,
            cmd_evaluate),
    *(Command(("bench", name), bench.help, bench.add_options, bench.run) for name, bench in BENCHES.items()),
    Command(("plan",), "worker-hours per stage for N users: a run's measured work per user over `bench models` "
            "throughput (parameters for GPU stages it did not measure on a GPU)", plan_options, cmd_plan),
    Command(("model", "prepare"), "fetch and convert the configured model ahead of time", add_config_options,
            cmd_model_prepare),
    Command(("llm", "serve"), "an OpenAI-compatible vLLM server over the configured model", llm_serve_options,
            cmd_llm_serve),
]


def build_parser() -> Parser:
    parser = Parser(prog="cotrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cotrec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        under, name = commands, command.path[0]
        if len(command.path) == 2:
            if name not in groups:
                text, dest, metavar = GROUPS[name]
                groups[name] = commands.add_parser(name, help=text).add_subparsers(dest=dest, required=True,
                                                                                   metavar=metavar)
            under, name = groups[name], command.path[1]
        sub = under.add_parser(name, help=command.help)
        command.options(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Read when Ray is imported, which a command's stage imports do: in a local run the only worker
    # lines left on the terminal are cotrec's own, so Ray's "(pid=N)" prefix is noise there.
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    try:
        return args.handler(args)
    except CotrecError as exc:
        print(f"cotrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cotrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
