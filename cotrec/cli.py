"""`cotrec <stage> [--config NAME|PATH] [--run-dir DIR] [--set key=value ...]`

Every stage command loads and validates the config, records it in the run directory and calls
the same stage function the job drivers and the tests call. Errors the user can cause end in
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from cotrec import __version__
from cotrec.cluster import check_run_dir_shared
from cotrec.config import Config, config_name, load_config, preset_names
from cotrec.data.prepare import format_summary, prepare
from cotrec.errors import CotrecError
from cotrec.progress import send_native_errors_to_run_log, use_run_log
from cotrec.rundir import RunDir
from cotrec.storage import run_path


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="NAME|PATH",
                        help=f"preset ({', '.join(preset_names())}) or YAML file; default: demo")
    parser.add_argument("--run-dir", "-r", metavar="DIR",
                        help="run directory; default: runs/<config name>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.k_core=10 (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo stages even when up to date")


def open_run(args: argparse.Namespace) -> tuple[Config, RunDir]:
    """Resolve the config and the run directory, and record the resolved config there."""
    config = load_config(args.config, args.overrides)
    run = RunDir(args.run_dir or Path("runs") / config_name(args.config))
    check_run_dir_shared(run.root)  # a cluster job: refused at its start if a worker node cannot see it
    run.write_config(config)
    use_run_log(run.root)  # what the run's processes print, but cotrec's progress (cotrec.progress)
    send_native_errors_to_run_log()
    return config, run


def cmd_prepare(args: argparse.Namespace) -> int:
    config, run = open_run(args)
    summary = prepare(config, run, force=args.force)
    print(format_summary(summary))
    print(f"wrote {run / 'data'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
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


def prepared_run(args: argparse.Namespace) -> Path:
    """The run directory a command reads (report, serve, evaluate): a one-line error, before anything
    is written there, when it holds no prepared run."""
    root = run_path(args.run_dir or Path("runs") / config_name(args.config))
    if not (root / "data").is_dir():
        raise CotrecError(f"{root}: not a prepared run directory (no data/); run `cotrec run` or "
                          "`cotrec prepare` first")
    return root


def cmd_report(args: argparse.Namespace) -> int:
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
    from cotrec.ranker.table2 import MANIFEST, check_report
    from cotrec.reporting.tables import table2_markdown

    if not (folder / MANIFEST).is_file():
        raise CotrecError(f"{folder}: no {MANIFEST} (a report folder written by `cotrec report` or `cotrec run`)")
    differs = check_report(folder, table2_markdown)
    if differs is not None:
        raise CotrecError(f"{folder / 'table2.md'}: not what its per-list outputs give: {differs}")
    print(f"{folder / 'table2.md'}: every figure recomputed from {folder / MANIFEST} and its rankings")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from cotrec.embed import embed, format_summary as format_embed

    config, run = open_run(args)
    print(format_embed(embed(config, run, force=args.force, kinds=args.kinds or None)))
    return 0


def cmd_retriever_train(args: argparse.Namespace) -> int:
    from cotrec.retriever import format_train_summary, train_variant

    config, run = open_run(args)
    print(format_train_summary(train_variant(config, run, args.variant, seed=args.seed, force=args.force)))
    return 0


def cmd_retriever_grid(args: argparse.Namespace) -> int:
    from cotrec.retriever import format_grid_summary, retriever_grid

    if args.seeds is not None:
        args.overrides.append(f"retriever.grid_seeds={args.seeds}")
    config, run = open_run(args)
    print(format_grid_summary(retriever_grid(config, run, force=args.force)))
    return 0


def cmd_ranker_train(args: argparse.Namespace) -> int:
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


def cmd_ranker_probe(args: argparse.Namespace) -> int:
    from cotrec.ranker.stage import ranker_probe
    from cotrec.reporting.tables import estimate

    config, run = open_run(args)
    found = ranker_probe(config, run, args.retriever, args.prompt, force=args.force)
    difference = found["probe_minus_zero_shot"]
    print(f"probe      {args.prompt} on {args.retriever}: {found['train_lists']:,} training lists, "
          f"{found['test_lists']:,} test lists" + ("  [up to date, skipped]" if found["skipped"] else ""))
    print(f"ndcg@10    probe {found['probe_ndcg@10']:.4f}, zero-shot {found['zero_shot_ndcg@10']:.4f}, difference "
          f"{estimate(difference)}")
    print(f"reading    {found['reading']}")
    print(f"folder     {found['folder']}")
    return 0


def cmd_ranker_eval(args: argparse.Namespace) -> int:
    from cotrec.ranker.stage import ranker_eval

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


def cmd_ranker_grid(args: argparse.Namespace) -> int:
    from cotrec.ranker.stage import format_summary as format_table2
    from cotrec.ranker.stage import ranker_grid

    config, run = open_run(args)
    print(format_table2(ranker_grid(config, run, force=args.force)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cotrec.serving import checked_access, serve_until_stopped, start_app

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
    print(f"serving {run.root} at {url} (POST /recommend" + (", GET /users/ID/preference" if args.expose_preferences
                                                            else "") + "; GET /healthz without a key); "
          + ("API keys required" if keyed else "NO API KEYS: anyone who reaches the port reads every user's data")
          + "; Ctrl-C or SIGTERM stops", flush=True)
    serve_until_stopped()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
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


def cmd_bench_retriever(args: argparse.Namespace) -> int:
    from cotrec.bench.retriever import bench_retriever, format_bench, scheme_settings

    config, run = open_run(args)
    schemes = tuple(x.strip() for x in args.schemes.split(",") if x.strip())
    for scheme in schemes:
        try:
            scheme_settings(scheme, config.retriever.max_len)
        except ValueError as exc:
            raise CotrecError(f"--schemes: {exc}") from None
    masks = tuple(m.strip() for m in args.masks.split(",") if m.strip())
    if not masks or any(m not in ("masked", "unmasked") for m in masks):
        raise CotrecError(f"--masks {args.masks!r}: expected masked, unmasked or both, comma-separated")
    masks = tuple(m == "masked" for m in masks)
    print(format_bench(bench_retriever(config, run, args.variant, schemes, masks, args.seeds, args.out)))
    print(f"wrote {args.out}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
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


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="NAME|PATH", help="preset or YAML file; default: demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from cotrec.llm.embedded import resolve_model

    config = load_config(args.config, args.overrides)
    print(f"{config.llm.model}: {resolve_model(config.llm.model)}")
    return 0


def cmd_llm_serve(args: argparse.Namespace) -> int:
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


def cmd_bench_llm(args: argparse.Namespace) -> int:
    from cotrec.bench.llm import bench_llm, format_bench

    config = load_config(args.config, args.overrides)
    backends = tuple(b.strip() for b in args.backends.split(","))
    print(format_bench(bench_llm(config, args.out, args.prompts, args.max_tokens, backends, args.rounds)))
    print(f"wrote {args.out}")
    return 0


def cmd_bench_extract(args: argparse.Namespace) -> int:
    from cotrec.bench.extract import bench_config, bench_extract, format_bench

    config = bench_config(args.config, args.overrides)
    run = RunDir(args.run_dir or Path("runs") / config_name(args.config))
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    report = bench_extract(config, run, args.out, parts, users=args.users, naive_users=args.naive_users,
                           waves_users=args.waves_users, waves_max_windows=args.waves_max_windows,
                           scale_users=args.scale_users, overrides=args.overrides)
    print(format_bench(report))
    print(f"wrote {args.out}")
    return 0


def cmd_bench_ranker(args: argparse.Namespace) -> int:
    from cotrec.bench.ranker import bench_ranker, format_bench

    config = load_config(args.config, args.overrides)
    run = RunDir(args.run_dir or Path("runs") / config_name(args.config))
    print(format_bench(bench_ranker(config, run, args.variant, args.lists, args.out)))
    print(f"wrote {args.out}")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from cotrec.bench.serve import bench_serve, format_bench

    config = load_config(args.config, args.overrides)
    run = RunDir(args.run_dir or Path("runs") / config_name(args.config))
    try:
        levels = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise CotrecError(f"--concurrency {args.concurrency!r}: expected comma-separated integers, e.g. 1,8,32") from None
    print(format_bench(bench_serve(config, run, args.variant, args.ranker, levels, args.requests,
                                   args.rerank_requests, args.out, args.sustain, args.config, args.rounds,
                                   args.floor)))
    print(f"wrote {args.out}")
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
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


def cmd_bench_models(args: argparse.Namespace) -> int:
    from cotrec.bench.models import bench_models, format_bench

    config = load_config(args.config, args.overrides)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    print(format_bench(bench_models(config, args.out, parts, args.rounds, texts=args.texts,
                                    sasrec_steps=args.sasrec_steps)))
    print(f"wrote {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from cotrec.plan import format_plan, parse_throughput, plan, write_plan

    config = load_config(args.config, args.overrides)
    root = run_path(args.run_dir or Path("runs") / config_name(args.config))
    if not (root / "data" / "stats.json").is_file():
        raise CotrecError(f"{root}: not a prepared run directory (no data/stats.json); the plan reads the work "
                          "per user from a finished run (`cotrec run`), passed as --run-dir")
    result = plan(config, RunDir(root), args.users, args.items, Path(args.models), parse_throughput(args.throughput))
    write_plan(result, Path(args.out) if args.out else None)
    print(format_plan(result))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_bench_faults(args: argparse.Namespace) -> int:
    from cotrec.bench.faults import SCENARIOS, bench_faults, format_bench

    config, run = open_run(args)
    scenarios = SCENARIOS if args.scenarios is None else tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise CotrecError(f"--scenarios {args.scenarios!r}: expected some of {', '.join(SCENARIOS)}")
    print(format_bench(bench_faults(config, run, scenarios, args.variant, args.actor_users, args.out)))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cotrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cotrec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the main job: prepare, extract, embed, retriever grid, perceptions, ranker grid, "
                                         "report; finished stages are skipped")
    _add_run_options(run)
    run.set_defaults(handler=cmd_run)

    rep = commands.add_parser("report", help="render <run>/reports/: Table 1, Table 2, plots, time and tokens per stage")
    _add_run_options(rep)
    rep.add_argument("--check", metavar="FOLDER",
                     help="recompute a report folder's table2.md from its per-list outputs (table2.json, "
                          "rankings/) and compare, instead of rendering a run")
    rep.set_defaults(handler=cmd_report)

    prep = commands.add_parser("prepare", help="load, k-core filter and split the dataset")
    _add_run_options(prep)
    prep.set_defaults(handler=cmd_prepare)

    show = commands.add_parser("config", help="print the resolved configuration")
    show.add_argument("--config", "-c", metavar="NAME|PATH")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(handler=cmd_config)

    emb = commands.add_parser("embed", help="Encode & Map: embed captions, descriptions, preferences")
    _add_run_options(emb)
    emb.add_argument("--kind", dest="kinds", action="append", choices=["caption", "description", "preference"],
                     help="embed only this kind (repeatable); default: every kind whose source exists")
    emb.set_defaults(handler=cmd_embed)

    ext = commands.add_parser("extract", help="LLM extraction on Ray Data: item descriptions, preferences, perceptions")
    ext_commands = ext.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, text in (("items", "an objective description of every item"),
                       ("users", "the preference recurrence of every user (train / valid / test horizons)"),
                       ("perceptions", "role-played review + key terms per (user, candidate) pair")):
        sub = ext_commands.add_parser(what, help=text)
        _add_run_options(sub)
        sub.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N rows (a trial run)")
        if what == "users":
            sub.add_argument("--incremental", action="store_true",
                             help="continue each changed user's stored recurrence instead of starting it again")
        if what == "perceptions":
            sub.add_argument("--pairs", type=Path, default=None, metavar="FILE",
                             help="parquet/CSV of user_idx, horizon, item_idx; default: the retriever's candidates "
                                  "(extract.perception_candidates)")
        sub.set_defaults(handler=cmd_extract, what=what)

    retr = commands.add_parser("retriever", help="SASRec retriever: train one variant or the Table 1 grid")
    retr_commands = retr.add_subparsers(dest="retriever_command", required=True, metavar="ACTION")
    retr_train = retr_commands.add_parser("train", help="train and evaluate one user/item variant")
    _add_run_options(retr_train)
    retr_train.add_argument("--variant", default="none/random", metavar="USER/ITEM",
                            help="user init none|random|preference / item init random|caption|description")
    retr_train.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    retr_train.set_defaults(handler=cmd_retriever_train)
    retr_grid = retr_commands.add_parser("grid", help="Table 1: every retriever.grid variant x seeds")
    _add_run_options(retr_grid)
    retr_grid.add_argument("--seeds", type=int, default=None, help="seeds per variant (retriever.grid_seeds)")
    retr_grid.set_defaults(handler=cmd_retriever_grid)

    rank = commands.add_parser("ranker", help="LLM ranker: fine-tune (LoRA + DeepSpeed), evaluate, Table 2")
    rank_commands = rank.add_subparsers(dest="ranker_command", required=True, metavar="ACTION")
    handlers = {"train": cmd_ranker_train, "eval": cmd_ranker_eval, "probe": cmd_ranker_probe}
    for action, text in (("train", "fine-tune a LoRA ranker on a retriever's training lists and merge it"),
                         ("eval", "rank a retriever's test lists: NDCG@10 over all users, MAPB"),
                         ("probe", "a frozen-feature probe of the base model against its zero-shot ranking "
                                   "(is the model or the recipe the limit?)")):
        sub = rank_commands.add_parser(action, help=text)
        _add_run_options(sub)
        sub.add_argument("--retriever", default="preference/description", metavar="USER/ITEM",
                         help="the retriever variant whose candidates are ranked")
        sub.add_argument("--prompt", default="llm++", choices=["llm", "llm+", "llm++"] + (["none"] if action == "eval" else []),
                         help="llm: titles; llm+: + preference; llm++: + preference and perception key terms"
                              + ("; none: the retriever's order" if action == "eval" else ""))
        if action == "eval":
            sub.add_argument("--zero-shot", action="store_true", help="the base model, not fine-tuned")
        sub.set_defaults(handler=handlers[action])
    rank_grid = rank_commands.add_parser("grid", help="Table 2: ranker.grid x ranker.retrievers")
    _add_run_options(rank_grid)
    rank_grid.set_defaults(handler=cmd_ranker_grid)

    srv = commands.add_parser("serve", help="the Ray Serve app (retriever -> ranker) over a run directory")
    _add_run_options(srv)
    srv.add_argument("--variant", default=None, metavar="USER/ITEM", help="retriever variant (default: CRM++)")
    srv.add_argument("--ranker", default=None, help="ranker: none, llm, llm++, llm/zero-shot, ... (default: the last "
                                                    "ranker.grid entry)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind; any but a loopback one needs API keys or --insecure")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-keys-file", metavar="PATH",
                     help="API keys, one a line (# comments): clients send Authorization: Bearer KEY")
    srv.add_argument("--api-keys-env", metavar="NAME", help="an environment variable holding API keys (comma-separated)")
    srv.add_argument("--insecure", action="store_true",
                     help="serve a non-loopback address without API keys (anyone who reaches it reads every user's data)")
    srv.add_argument("--expose-preferences", action="store_true",
                     help="answer GET /users/ID/preference (the LLM-inferred preference text of any user); off by default")
    srv.add_argument("--open-horizons", metavar="valid,test",
                     help="let clients ask for these leave-one-out horizons (evaluation data); closed by default")
    srv.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                     help="answer 504 for a request not done in this time (default 60)")
    srv.set_defaults(handler=cmd_serve)
    ev = commands.add_parser("evaluate", help="scaled evaluation: every test user through the Serve chain")
    _add_run_options(ev)
    ev.add_argument("--via-serve", action="store_true", help="send every test user through POST /recommend")
    ev.add_argument("--url", default=None, help="a running app (default: start one locally, then stop it)")
    ev.add_argument("--variant", default=None, metavar="USER/ITEM", help="retriever variant (default: CRM++)")
    ev.add_argument("--ranker", default="none", help="none (retrieval only) or a ranker name: llm, llm++, ...")
    ev.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ev.set_defaults(handler=cmd_evaluate)

    bench = commands.add_parser("bench", help="benchmarks; figures written to JSON")
    benches = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    bench_retr = benches.add_parser("retriever", help="training-row schemes over seeds, masked and unmasked: "
                                                      "NDCG@10, Hit@10, best epoch, time to it, targets/s")
    _add_run_options(bench_retr)
    bench_retr.add_argument("--variant", default="none/random", metavar="USER/ITEM")
    bench_retr.add_argument("--schemes", default="previous,disjoint,stride8,stride4,prefix",
                            help="comma-separated: previous (the earlier default), disjoint, prefix, stride<N>")
    bench_retr.add_argument("--masks", default="unmasked,masked", help="comma-separated: unmasked, masked")
    bench_retr.add_argument("--seeds", type=int, default=3, help="seeds per scheme (config seed, +1, ...)")
    bench_retr.add_argument("--out", default="bench/retriever.json", help="JSON output path")
    bench_retr.set_defaults(handler=cmd_bench_retriever)
    bench_llm = benches.add_parser("llm", help="the same prompts through each LLM backend: tokens/s, load time")
    _add_config_options(bench_llm)
    bench_llm.add_argument("--backends", default="vllm:eager,vllm:compiled,transformers",
                           help="comma-separated: backends, vllm:eager, vllm:compiled (plain vllm: as llm.enforce_eager says)")
    bench_llm.add_argument("--prompts", type=int, default=64)
    bench_llm.add_argument("--max-tokens", type=int, default=64)
    bench_llm.add_argument("--rounds", type=int, default=3, help="timed rounds per backend; figures are their median")
    bench_llm.add_argument("--out", default="bench/llm.json", help="JSON output path")
    bench_llm.set_defaults(handler=cmd_bench_llm)
    bench_ext = benches.add_parser("extract", help="users job vs engine ceiling, naive, stage-per-step; 1M-user overhead")
    _add_config_options(bench_ext)
    bench_ext.add_argument("--run-dir", "-r", metavar="DIR",
                           help="run directory whose prepared data is copied (not modified); default: runs/<config name>")
    bench_ext.add_argument("--parts", default="users,ceiling,naive,waves,stages,scale",
                           help="comma-separated: users,ceiling,naive,waves,stages,scale (ceiling needs users)")
    bench_ext.add_argument("--users", type=int, default=48,
                           help="users in the users job, first by user_idx (default 48)")
    bench_ext.add_argument("--naive-users", type=int, default=4,
                           help="users run one at a time on transformers (default 4)")
    bench_ext.add_argument("--waves-users", type=int, default=None,
                           help="users in the stage-per-step / async comparisons, first by user_idx (default: all)")
    bench_ext.add_argument("--waves-max-windows", type=int, default=0,
                           help="extract.max_windows of those comparisons (default 0: no cap, whole histories)")
    bench_ext.add_argument("--scale-users", type=int, default=1_000_000,
                           help="synthetic users in the scale part (default 1,000,000)")
    bench_ext.add_argument("--out", default="bench/extract.json", help="JSON output path")
    bench_ext.set_defaults(handler=cmd_bench_extract)
    bench_rank = benches.add_parser("ranker", help="lists ranked per second: vLLM choice scoring vs one list at a "
                                                   "time through transformers")
    _add_config_options(bench_rank)
    bench_rank.add_argument("--run-dir", "-r", metavar="DIR",
                            help="run directory with prepared data and the variant's retriever candidates (read "
                                 "only); default: runs/<config name>")
    bench_rank.add_argument("--variant", default="none/random", metavar="USER/ITEM",
                            help="retriever variant whose test candidate lists are ranked")
    bench_rank.add_argument("--lists", type=int, default=64,
                            help="lists ranked by each path, test lists with the target first (default 64)")
    bench_rank.add_argument("--out", default="bench/ranker.json", help="JSON output path")
    bench_rank.set_defaults(handler=cmd_bench_ranker)
    bench_srv = benches.add_parser("serve", help="the Serve app under load: latency percentiles, requests/s, "
                                                 "errors and replica counts per concurrency level")
    _add_config_options(bench_srv)
    bench_srv.add_argument("--run-dir", "-r", metavar="DIR",
                           help="run directory with prepared data and a trained retriever (read only); "
                                "default: runs/<config name>")
    bench_srv.add_argument("--variant", default="none/random", metavar="USER/ITEM", help="retriever variant served")
    bench_srv.add_argument("--ranker", default="llm/zero-shot",
                           help="ranker served: none (retrieval only), llm, llm++, llm/zero-shot, ... "
                                "(default llm/zero-shot)")
    bench_srv.add_argument("--concurrency", default="1,8,32", help="comma-separated requests in flight per level")
    bench_srv.add_argument("--requests", type=int, default=200, help="retrieval-only requests per level (default 200)")
    bench_srv.add_argument("--rerank-requests", type=int, default=40,
                           help="retrieval + re-ranking requests per level (default 40; 0 skips them)")
    bench_srv.add_argument("--sustain", type=float, default=None, metavar="SECONDS",
                           help="the retrieval-only level at the highest concurrency runs at least this long so "
                                "Serve's autoscaler can act (default: the longest upscale_delay_s + 15 s)")
    bench_srv.add_argument("--rounds", type=int, default=1,
                           help="times each retrieval level runs, on the bare process and on Serve (default 1)")
    bench_srv.add_argument("--no-floor", dest="floor", action="store_false",
                           help="skip the bare-process floor (one FastAPI + uvicorn process holding the retriever)")
    bench_srv.add_argument("--out", default="bench/serve.json", help="JSON output path")
    bench_srv.set_defaults(handler=cmd_bench_serve)

    bench_faults = benches.add_parser("faults", help="kill an extraction actor, an engine, a Train worker (SASRec, the "
                                                     "fine-tune), a Serve replica, the driver; count what was lost")
    _add_run_options(bench_faults)
    bench_faults.add_argument("--scenarios", default=None,
                              help="comma-separated: actor, engine, train, finetune, replica, driver (default: all)")
    bench_faults.add_argument("--variant", default="none/random", metavar="USER/ITEM",
                              help="the retriever variant trained (train) and served (replica)")
    bench_faults.add_argument("--actor-users", type=int, default=200_000,
                              help="SYNTHETIC users in the actor scenario (default 200,000)")
    bench_faults.add_argument("--out", default="bench/faults.json", help="JSON output path")
    bench_faults.set_defaults(handler=cmd_bench_faults)

    bench_scale = benches.add_parser("scale", help="the main job on SYNTHETIC users with the zero-latency engine and "
                                                   "the zero-cost encoder: per stage, wall, users/s, CPU and memory")
    bench_scale.add_argument("--config", "-c", metavar="NAME|PATH", help="the base preset (default: ml-100k)")
    bench_scale.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config key after the bench's own settings (repeatable)")
    bench_scale.add_argument("--users", default="10000,100000,1000000", help="comma-separated sizes")
    bench_scale.add_argument("--run-root", default="runs/scale", help="where each size's run directory goes")
    bench_scale.add_argument("--keep", action="store_true", help="keep each size's run directory")
    bench_scale.add_argument("--until", metavar="STAGE", help="run the job up to this stage only (e.g. preferences: "
                             "the users extraction without the training after it); default: every stage")
    bench_scale.add_argument("--out", default="bench/scale.json", help="JSON output path (the plot beside it)")
    bench_scale.set_defaults(handler=cmd_bench_scale)
    bench_models = benches.add_parser("models", help="the real models' throughput per worker on this machine: LLM "
                                      "prompt/generated tokens/s, encoder texts/s, SASRec windows/s (what `plan` uses)")
    _add_config_options(bench_models)
    bench_models.add_argument("--parts", default="llm,encoder,sasrec",
                              help="comma-separated: llm, encoder, sasrec, users (user tables of 100k and 1M rows)")
    bench_models.add_argument("--rounds", type=int, default=3, help="timed rounds per part; figures are their median")
    bench_models.add_argument("--texts", type=int, default=256, help="texts the encoder part encodes per round")
    bench_models.add_argument("--sasrec-steps", type=int, default=20,
                              help="training steps per round of the sasrec part (the users part takes half); "
                                   "more on a GPU, so that a round runs well past start-up")
    bench_models.add_argument("--out", default="bench/models.json", help="JSON output path")
    bench_models.set_defaults(handler=cmd_bench_models)

    pln = commands.add_parser("plan", help="worker-hours per stage for N users: a run's measured work per user over "
                                           "`bench models` throughput (parameters for GPU stages it did not measure on a GPU)")
    _add_config_options(pln)
    pln.add_argument("--run-dir", "-r", metavar="DIR", help="a finished run whose work per user is measured; "
                     "default: runs/<config name>")
    pln.add_argument("--users", type=int, required=True, help="users to plan for")
    pln.add_argument("--items", type=int, help="catalogue size to plan for (default: the run's)")
    pln.add_argument("--models", default="bench/models.json", help="`cotrec bench models` output (per-worker throughput)")
    pln.add_argument("--throughput", action="append", default=[], metavar="KEY=VALUE",
                     help="a per-worker rate to use instead, e.g. llm.generated_tokens_per_s=2500 (repeatable)")
    pln.add_argument("--out", help="also write the plan as JSON here")
    pln.set_defaults(handler=cmd_plan)

    model = commands.add_parser("model", help="the LLM's weights")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    model_prepare = model_commands.add_parser("prepare", help="fetch and convert the configured model ahead of time")
    _add_config_options(model_prepare)
    model_prepare.set_defaults(handler=cmd_model_prepare)

    llm = commands.add_parser("llm", help="the LLM engine")
    llm_commands = llm.add_subparsers(dest="llm_command", required=True, metavar="ACTION")
    llm_serve = llm_commands.add_parser("serve", help="an OpenAI-compatible vLLM server over the configured model")
    _add_config_options(llm_serve)
    llm_serve.add_argument("--host", default="127.0.0.1")
    llm_serve.add_argument("--port", type=int, default=8000)
    llm_serve.add_argument("--served-model-name", dest="served_name", default="embedded")
    llm_serve.set_defaults(handler=cmd_llm_serve)
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
