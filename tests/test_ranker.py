"""The LLM-as-Ranker: lists, MAPB, NDCG over all users, LoRA + DeepSpeed fine-tuning, Table 2.

Runs on the small synthetic run of the retriever tests (a learnable k -> k+1 walk, so most
targets are among the top-10 candidates) with SYNTHETIC extraction outputs standing in for the
LLM-written preferences and perceptions; the ranker itself is the real embedded model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cotrec.extract.programs import PROGRAMS
from cotrec.extract.shards import write_shard
from cotrec.metrics import ndcg_at_k
from cotrec.ranker.letters import LetterRanker, evaluate_ranker
from cotrec.ranker.lists import (CandidateList, attach_prompt_inputs, candidate_pairs, load_lists, ranked_lists,
                                 shown_order, training_lists)
from cotrec.ranker.mapb import mapb, predicted_ranks, probe_orders, sample_bias
from cotrec.ranker.evaluate import ranker_eval
from cotrec.ranker.grid import ranker_grid
from cotrec.retriever import train_variant
from retriever_data import FAST_RETRIEVER, fake_extraction, synthetic_run

SMALL = FAST_RETRIEVER


def lists_of(n: int, m: int = 10, seed: int = 0) -> list[CandidateList]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n):
        candidates = [int(i) for i in rng.choice(1000, size=m, replace=False)]
        target = candidates[int(rng.integers(m))] if u % 4 else 5000 + u  # every 4th list misses
        out.append(CandidateList(u, "test", [1, 2, 3], candidates, target,
                                 candidates.index(target) if target in candidates else 10 + u))
    return out


class OrderIgnoringScorer:
    """Scores each candidate by its item id alone: where it is shown cannot matter."""

    def score(self, queries):
        return np.stack([np.array([np.sin(lst.candidates[i]) for i in order]) for lst, order in queries])


class FirstLetterScorer:
    """Always prefers the earlier letters, whatever sits there: pure position bias."""

    def score(self, queries):
        return np.stack([np.linspace(1.0, 0.1, len(order)) for _, order in queries])


def test_a_probe_record_recomputes_from_its_per_list_ranks(tmp_path):
    """`cotrec report --check` holds a frozen-feature probe's figures against the per-list ranks kept
    beside them: the same ranks give the same figures; one list's rank changed is named."""
    from cotrec.ranker.probe import check_probe, probe_figures
    from cotrec.rundir import write_json

    rng = np.random.default_rng(0)
    lists = pd.DataFrame({"user_idx": np.arange(60), "shown_at": rng.integers(0, 10, 60),
                          "probe_rank": rng.integers(0, 10, 60), "zero_shot_rank": rng.integers(0, 10, 60)})
    lists.to_parquet(tmp_path / "lists.parquet")
    write_json(tmp_path / "probe.json", {"seed": 3, "train_lists": 100, **probe_figures(lists, seed=3)})
    assert check_probe(tmp_path / "probe.json", tmp_path / "lists.parquet") is None
    lists.loc[0, "probe_rank"] = (lists.loc[0, "probe_rank"] + 5) % 10
    lists.to_parquet(tmp_path / "lists.parquet")
    assert check_probe(tmp_path / "probe.json", tmp_path / "lists.parquet").startswith("probe_ndcg@10: ")


def test_the_committed_ml100k_table2_report_recomputes_and_a_changed_probe_list_is_refused(cli, tmp_path):
    """`cotrec report --check` on docs/reports/ml-100k-table2: Table 2 and the probe kept beside it
    recompute from their per-list outputs; a copy with one probe list's rank changed exits 2 in one line."""
    from conftest import REPO

    report = REPO / "docs" / "reports" / "ml-100k-table2"
    good = cli("report", "--check", str(report))
    assert good.returncode == 0, good.stderr
    assert "table2.md: every figure recomputed" in good.stdout and "probe-crm++-llm.json: every figure" in good.stdout
    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    lists = pd.read_parquet(copy / "probe-crm++-llm-lists.parquet")
    lists.loc[0, "probe_rank"] = 9 if lists.loc[0, "probe_rank"] == 0 else 0
    lists.to_parquet(copy / "probe-crm++-llm-lists.parquet")
    bad = cli("report", "--check", str(copy))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "probe-crm++-llm.json: not what" in bad.stderr


def test_probe_places_the_target_at_every_position_and_keeps_the_others_in_order():
    shown = np.array([3, 0, 7, 1, 9, 2, 8, 4, 6, 5])
    orders = probe_orders(shown, target_index=7)
    assert len(orders) == 10
    for j, order in enumerate(orders):
        assert order[j] == 7 and sorted(order) == list(range(10))
        assert [i for i in order if i != 7] == [i for i in shown if i != 7]
    assert any(np.array_equal(o, shown) for o in orders)  # the shown order is one of them
    assert list(predicted_ranks(np.array([0.1, 0.5, 0.5, 0.2]))) == [3, 0, 1, 2]  # ties: earlier first
    assert sample_bias(np.arange(10)) == pytest.approx(2.5) and mapb(np.zeros((3, 10))) == 0.0


def test_mapb_is_zero_for_an_order_ignoring_ranker_and_large_for_a_position_biased_one():
    lists = lists_of(40)
    ignoring, rows = evaluate_ranker(lists, OrderIgnoringScorer(), seed=0, with_mapb=True, lists_per_call=25)
    assert ignoring["mapb"] == 0.0 and ignoring["ranked_users"] == 30 and ignoring["users"] == 40
    ranked = rows[rows.probs.map(len) > 0]
    assert ranked.ranks_by_position.map(len).eq(10).all()       # all M positions probed
    biased, rows = evaluate_ranker(lists, FirstLetterScorer(), seed=0, with_mapb=True)
    assert biased["mapb"] == pytest.approx(2.5)                   # rank == position: mean |j - 4.5|
    assert biased["mean_rank_by_position"] == pytest.approx(list(range(10)))
    # NDCG is over all users: the misses keep their retriever rank (>= 10) and count 0.
    ranks = rows.set_index("user_idx").target_rank
    expected = [list(shown_order(l, 0)).index(l.candidates.index(l.target)) if l.hit else l.retriever_rank
                for l in lists]
    assert ranks.loc[[l.user_idx for l in lists]].tolist() == expected
    assert biased["ndcg@10"] == pytest.approx(ndcg_at_k(np.array(expected), 10))
    # without the probe, the same ranks from one prompt per list
    single, _ = evaluate_ranker(lists, FirstLetterScorer(), seed=0, with_mapb=False)
    assert single["ndcg@10"] == biased["ndcg@10"] and "mapb" not in single


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory):
    """A synthetic run with a trained retriever, preferences and SYNTHETIC perceptions."""
    root = tmp_path_factory.mktemp("ranker")
    config, run = synthetic_run(root / "run", config_overrides=SMALL)
    train_variant(config, run, "none/random")
    fake_extraction(run)
    items = pd.read_parquet(run / "data" / "items.parquet").set_index("item_idx")
    folder = run / PROGRAMS["perceptions"].folder
    folder.mkdir(parents=True, exist_ok=True)
    # every (user, horizon, item) a list can show: the test and valid horizons and the train walk's states
    records = [{"user_idx": u, "horizon": horizon, "item_idx": int(i), "review": "",
                "key_terms": [items.genres[i], f"number {i}"], "status": "ok", "created_at": 0.0}
               for u in range(60) for horizon in ("valid", "test", "train@8", "train@16") for i in items.index]
    write_shard(folder, records, PROGRAMS["perceptions"].schema)
    return config, run


def test_lists_carry_history_preference_and_key_terms(ranked_run):
    config, run = ranked_run
    lists, notes = load_lists(config, run, "none/random", "test", "llm++")
    assert len(lists) == 60 and notes["hits"] == sum(l.hit for l in lists) > 30
    inter = pd.read_parquet(run / "data" / "interactions.parquet").sort_values(["user_idx", "position"])
    first = lists[0]
    seen = inter[(inter.user_idx == first.user_idx) & (inter.split != "test")].item_idx.tolist()
    assert first.history == seen[-config.ranker.history_items:] and first.target not in first.history
    hit = next(l for l in lists if l.hit)
    assert hit.preference and len(hit.key_terms) == 10 and hit.key_terms[0][1] == f"number {hit.candidates[0]}"


def test_perception_pairs_are_exactly_the_lists_the_ranker_reads(ranked_run):
    config, run = ranked_run
    config = config.model_copy(deep=True)
    config.ranker.retrievers, config.ranker.grid = {"CRM": "none/random"}, ["none", "llm++"]
    config.ranker.max_train_users, config.ranker.max_eval_users, config.ranker.prefix_lists = 5, 12, 2
    pairs, _ = candidate_pairs(run, config)
    test = [lst for lst in ranked_lists(config, run, "none/random", "llm")[0] if lst.hit]  # 12 sampled users' hits
    trained = training_lists(config, run, "none/random").every  # valid and prefix lists of 5 sampled users
    expected = {(lst.user_idx, lst.horizon, c) for lst in test + trained for c in lst.candidates}
    assert set(zip(pairs.user_idx, pairs.horizon, pairs.item_idx)) == expected
    assert 0 < len(test) <= 12 and {lst.user_idx for lst in trained} <= set(range(60)) and len(trained) > 5
    assert {lst.horizon for lst in trained if lst.split == "prefix"} <= {f"train@{e}" for e in range(8, 24, 8)}
    config.extract.perception_only_hits = False  # every test list, misses included
    assert candidate_pairs(run, config)[0].query("horizon == 'test'").user_idx.nunique() == 12
    config.ranker.grid = ["none", "llm++/zero-shot"]  # no llm++ fine-tune: no training lists to role-play
    assert set(candidate_pairs(run, config)[0].horizon) == {"test"}


def test_training_lists_never_show_a_known_positive_as_a_wrong_answer(ranked_run):
    """The retriever was trained on every training item, so for a target inside the history it ranks
    the user's later items high: those (and a valid list's test item) are masked and the list is
    refilled from the retriever's next items; only lists where it found the target are kept, and a
    prefix list's preference is the walk's state from before its target."""
    config, run = ranked_run
    config = config.model_copy(deep=True)
    config.ranker.prefix_lists, config.ranker.max_train_users, config.ranker.val_lists = 3, 20, 10
    config.ranker.grid = ["none", "llm+"]
    found = training_lists(config, run, "none/random")
    inter = pd.read_parquet(run / "data" / "interactions.parquet").sort_values(["user_idx", "position"])
    sequence = {u: g.item_idx.tolist() for u, g in inter.groupby("user_idx")}
    assert found.notes["masked_positives"] > 0  # the retriever did rank them among its top 10
    for lst in found.every:
        items = sequence[lst.user_idx]
        assert lst.hit and not (set(lst.candidates) & (set(items) - {lst.target})), (lst.user_idx, lst.split)
        assert len(set(lst.candidates)) == 10
        if lst.split == "prefix":
            assert items[lst.position] == lst.target and lst.position < len(items) - 2
            assert lst.history == items[:lst.position][-config.ranker.history_items:]
            assert lst.horizon == f"train@{max(e for e in range(8, 24, 8) if e <= lst.position)}"
    assert found.notes["prefix_lists"] == sum(lst.split == "prefix" for lst in found.every) > 20
    assert found.notes["targets_inserted"] == 0 and found.notes["prefix_misses"] > 0
    held = {lst.user_idx for lst in found.held_out}  # whole users held out, at least val_lists lists
    assert not held & {lst.user_idx for lst in found.train} and len(found.held_out) >= 10
    # the prompt shows the state before the target: no preference names what comes after it
    attach_prompt_inputs(run, found.every, "llm+", config)
    for lst in found.every:
        if lst.split == "prefix":
            genres = pd.read_parquet(run / "data" / "items.parquet").genres.tolist()
            state = int(lst.horizon.split("@")[1])
            seen = pd.Series([genres[i] for i in sequence[lst.user_idx][:state]]).value_counts().index[:2]
            assert lst.preference == ", ".join(seen)


def test_reference_rankers_measure_what_no_signal_scores(ranked_run):
    config, run = ranked_run
    rows = {name: ranker_eval(config, run, "none/random", name) for name in ("position", "random")}
    assert rows["position"]["mapb"] == pytest.approx(2.5)  # rank == position, whatever the list
    assert 1.8 < rows["random"]["mapb"] < 2.8 and rows["random"]["ranked_users"] == rows["position"]["ranked_users"]


def test_the_none_ranker_equals_the_retriever(ranked_run):
    config, run = ranked_run
    result = ranker_eval(config, run, "none/random", "none")
    retriever = json.loads((run / "retriever" / "none-random" / "metrics.json").read_text())
    assert result["ndcg@10"] == retriever["ndcg@10"] and result["hit@10"] == retriever["hit@10"]
    assert "mapb" not in result and result["users"] == 60
    assert (run / "ranker" / "none-random--none" / "eval" / "rankings.parquet").exists()


def test_the_none_rankings_are_what_a_plan_without_prompts_gives(ranked_run):
    """The column-wise `none` path (no object per list) writes what the per-list path would, sampled
    the same way."""
    from cotrec.ranker.letters import unranked
    from cotrec.ranker.lists import candidate_rows

    config, run = ranked_run
    config = config.model_copy(deep=True)  # the fixture's config is shared
    for limit in (None, 17):
        config.ranker.max_eval_users = limit
        lists, _ = load_lists(config, run, "none/random", "test", "llm", limit=limit)
        expected_metrics, expected = evaluate_ranker(lists, None, seed=0)
        metrics, rankings = unranked(candidate_rows(config, run, "none/random", "test", limit=limit), 0.0)
        assert {k: v for k, v in metrics.items() if k != "seconds"} == \
            {k: v for k, v in expected_metrics.items() if k != "seconds"}
        assert list(rankings.columns) == list(expected.columns) and len(rankings) == len(lists)
        for column in rankings.columns:
            assert [list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v for v in rankings[column]] == \
                   [list(v) if hasattr(v, "__len__") and not isinstance(v, str) else v for v in expected[column]], column


@pytest.mark.slow
def test_an_llm_ranker_is_scored_on_a_ray_data_actor_pool_not_in_the_driver(ranked_run, transformers_engine, monkeypatch):
    """The driver starts no engine: the prompts go to a Ray Data actor that holds one, and each
    list's letter probabilities are the ones the same model gives in process."""
    import ray

    import cotrec.llm

    config, run = ranked_run
    config = config.model_copy(deep=True)
    # the session engine's backend and numerics (transformers starts fastest; the path is the same)
    config.llm.backend, config.llm.dtype = "transformers", "float32"
    config.ranker.max_eval_users, config.ranker.mapb, config.ranker.lists_per_call = 5, False, 2

    def no_engine_here(*_, **__):
        raise AssertionError("the driver started an engine")

    monkeypatch.setattr(cotrec.llm, "make_engine", no_engine_here)  # this process only; actors import their own
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = ranker_eval(config, run, "none/random", "llm/zero-shot", force=True)
    finally:
        ray.shutdown()
    assert result["scoring_actors"] == 1
    rankings = pd.read_parquet(run / "ranker" / "none-random--llm-zero-shot" / "eval" / "rankings.parquet")
    ranked = rankings[rankings.probs.map(len) > 0]
    assert len(ranked) == result["ranked_users"] > 0
    lists = {lst.user_idx: lst for lst in ranked_lists(config, run, "none/random", "llm")[0]}
    letter_ranker = LetterRanker.for_run(run, "llm", transformers_engine)
    queries = [(lists[u], np.array([lists[u].candidates.index(i) for i in shown]))
               for u, shown in zip(ranked.user_idx, ranked.shown)]
    assert np.allclose(np.stack(ranked.probs.to_list()), letter_ranker.score(queries), atol=1e-4)


@pytest.mark.slow
def test_cotrec_ranker_probe_as_a_command_on_a_sample_of_the_training_lists(ranked_run, cli, tmp_path):
    """`cotrec ranker probe` as a user runs it: refused in one line until the zero-shot evaluation it
    compares with exists; then on a seeded `--train-lists` sample of the fine-tune's lists, writing
    its record and the per-list ranks `cotrec report --check` recomputes it from; a rerun is skipped."""
    from cotrec.ranker.probe import check_probe

    root = tmp_path / "run"
    shutil.copytree(ranked_run[1].root, root)
    shutil.rmtree(root / "ranker", ignore_errors=True)  # no evaluation another test of the module left
    sets = [a for s in (*SMALL, "llm.backend=transformers", "ranker.mapb=false", "ranker.max_eval_users=12",
                        "ranker.max_train_users=8", "ranker.val_lists=2") for a in ("--set", s)]
    lists = ["--run-dir", str(root), "--retriever", "none/random", "--prompt", "llm", *sets]
    refused = cli("ranker", "probe", *lists, "--train-lists", "4")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "cotrec ranker eval --retriever none/random --prompt llm --zero-shot" in refused.stderr
    evaluated = cli("ranker", "eval", *lists, "--zero-shot")
    assert evaluated.returncode == 0, evaluated.stderr
    probed = cli("ranker", "probe", *lists, "--train-lists", "4")
    assert probed.returncode == 0, probed.stderr
    folder = root / "ranker" / "none-random--llm-probe"
    record = json.loads((folder / "probe.json").read_text())
    per_list = pd.read_parquet(folder / "lists.parquet")
    assert record["train_lists"] == 4 and "4 training lists" in probed.stdout
    assert len(per_list) == record["test_lists"] > 0 and record["retriever"] == "none/random"
    assert check_probe(folder / "probe.json", folder / "lists.parquet") is None
    again = cli("ranker", "probe", *lists, "--train-lists", "4")
    assert again.returncode == 0 and "[up to date, skipped]" in again.stdout, again.stderr
    too_few = cli("ranker", "probe", *lists, "--train-lists", "1")
    assert too_few.returncode == 2 and "--train-lists 1" in too_few.stderr, too_few.stderr


def test_llm_plus_plus_without_perceptions_fails_in_one_line(tmp_path, cli):
    config, run = synthetic_run(tmp_path / "run", config_overrides=SMALL)
    train_variant(config, run, "none/random")
    fake_extraction(run)
    out = cli("ranker", "eval", "--run-dir", str(run.root), "--retriever", "none/random", "--prompt", "llm++",
              "--zero-shot", *[a for s in SMALL for a in ("--set", s)])
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "extract/perceptions" in out.stderr and "cotrec extract perceptions" in out.stderr


def test_too_few_lists_are_not_fine_tuned_and_table2_says_why(ranked_run):
    config, run = ranked_run
    config = config.model_copy(deep=True)
    config.ranker.retrievers, config.ranker.grid = {"CRM": "none/random"}, ["none", "llm"]
    config.ranker.min_train_lists, config.ranker.max_eval_users = 1000, 12
    summary = ranker_grid(config, run)
    row = summary["rows"][1]
    assert row["not_run"].startswith("not fine-tuned: the retriever found the target of ")
    assert "ranker.min_train_lists 1000" in row["not_run"]
    table = (run / "reports" / "table2.md").read_text()
    assert "| CRM (none/random) | LLM | not fine-tuned: the retriever found the target of" in table
    assert not (run / "ranker" / "none-random--llm" / "model" / "merged").exists()


def _demo_sized(config, **overrides):
    """The demo preset's ranker settings on the synthetic run, on fewer lists than 2 workers with
    micro-batches of 2 ask for."""
    config = config.model_copy(deep=True)
    demo = config.ranker.model_copy()
    assert (demo.num_workers, demo.micro_batch, demo.zero_stage, demo.trainer) == (2, 2, 2, "ray")
    for key, value in {"retrievers": {"CRM": "none/random"}, "grid": ["none", "llm++"], "epochs": 1,
                       "max_train_users": 6, "prefix_lists": 0, "val_lists": 3, "min_train_lists": 2, "lr": 2e-3,
                       "max_eval_users": 12, **overrides}.items():
        setattr(config.ranker, key, value)
    return config


@pytest.mark.slow
def test_table2_fine_tunes_with_deepspeed_on_two_ray_workers_and_ranks_with_vllm(ranked_run):
    """The demo's ranker stage in small and in the precision `auto` picks on this CPU (bfloat16 where
    it computes it natively, as `make demo` does): LoRA + DeepSpeed ZeRO-2 on Ray Train workers, the
    merged model served by vLLM; with fewer training examples than 2 workers with micro-batches of 2
    ask for, the fine-tune runs on fewer, and the report says so."""
    from cotrec.llm.placement import cpu_has_bf16

    config, run = ranked_run
    config = _demo_sized(config, precision="auto")
    config.llm.dtype = "auto"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        summary = ranker_grid(config, run, force=True)
    finally:
        ray.shutdown()
    train = json.loads((run / "ranker" / "none-random--llm++" / "model" / "train.json").read_text())
    assert train["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert train["zero_stage"] == 2 and train["train_lists"] < 4  # 2 workers x micro-batches of 2
    assert (train["num_workers"], train["micro_batch"]) != (2, 2) and "instead of 2 with 2" in train["shape_note"]
    assert [c["epoch"] for c in train["curve"]] == [0, 1] and all(c["val_lists"] >= 3 for c in train["curve"])
    assert train["letter_loss_chance"] == pytest.approx(np.log(10))
    folder = run / "ranker" / "none-random--llm++"
    assert (folder / "model" / "adapter" / "adapter_config.json").exists()
    assert (folder / "model" / "merged" / "model.safetensors").exists()
    none_row, llm_row = summary["rows"]
    assert none_row["ranker"] == "none" and llm_row["model"].endswith("merged") and llm_row["backend"] == "vllm"
    rankings = pd.read_parquet(folder / "eval" / "rankings.parquet")
    ranked = rankings[rankings.probs.map(len) > 0]
    assert len(ranked) == llm_row["ranked"] > 0
    assert np.allclose(ranked.probs.map(sum), 1.0, atol=1e-6)
    assert ranked.ranks_by_position.map(len).eq(10).all()
    # MAPB is the mean over the re-ranked lists of their bias over the ten positions
    assert llm_row["mapb"]["mean"] == pytest.approx(np.mean([sample_bias(r) for r in ranked.ranks_by_position]))
    # the sampled users' None row is the retriever's rank on those users, and NDCG counts every user
    plain = pd.read_parquet(run / "ranker" / "none-random--none" / "eval" / "rankings.parquet")
    assert (plain.target_rank == plain.retriever_rank).all() and len(plain) == none_row["users"] == 12
    assert none_row["ndcg@10"] == pytest.approx(ndcg_at_k(plain.retriever_rank.to_numpy(), 10))
    assert llm_row["ndcg@10"] == pytest.approx(ndcg_at_k(rankings.target_rank.to_numpy(), 10))
    table = (run / "reports" / "table2.md").read_text()
    assert "| CRM (none/random) | None |" in table and "| CRM (none/random) | LLM++ |" in table
    assert "(no interval: " in table and train["shape_note"] in table  # 12 users: too few for an interval
    # the report keeps its per-list outputs, and its table recomputes from them (and only from them)
    from cotrec.ranker.table2 import check_report
    from cotrec.reporting.tables import table2_markdown

    assert check_report(run / "reports", table2_markdown) is None
    kept = run / "reports" / "rankings" / "none-random--llm++.parquet"
    frame = pd.read_parquet(kept)
    first = frame.index[frame.ranks_by_position.notna()][0]
    frame.at[first, "ranks_by_position"] = [0] * 10  # one list's ranks changed
    frame.to_parquet(kept)
    assert "LLM++" in check_report(run / "reports", table2_markdown)


@pytest.mark.slow
def test_a_float32_fine_tune_on_two_ray_workers_moves_the_model_and_the_merge_keeps_it(ranked_run):
    """The same stage in float32 (what `auto` picks on a CPU without native bfloat16): the adapter moves
    the held-out lists' letter probabilities away from the base model's (that it learns is
    test_finetune's), and the float32 merge keeps what the adapter does."""
    from cotrec.llm.placement import cpu_has_bf16
    from cotrec.ranker.stage import ranker_train

    if not cpu_has_bf16():
        pytest.skip("auto is float32 on this CPU: the test above ran it")
    config, run = ranked_run
    config = _demo_sized(config, precision="fp32", epochs=2)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        train = ranker_train(config, run, "none/random", "llm", force=True)
    finally:
        ray.shutdown()
    assert train["precision"] == "fp32" and train["num_workers"] * train["micro_batch"] < 4
    assert [c["epoch"] for c in train["curve"]] == [0, 1, 2]
    assert train["curve"][0]["val_mean_abs_dp"] == 0 and train["curve"][-1]["val_mean_abs_dp"] > 1e-3
    assert train["update_kept"]["merged_saved"]["max_abs_dp"] < 1e-3


def test_the_position_free_ndcg_of_any_position_only_ranker_is_0_4544_and_of_a_content_ranker_1():
    from cotrec.metrics import POSITION_ONLY_NDCG
    from cotrec.ranker.table2 import list_bias, position_free_ndcg

    shown_at = pd.Series([list(range(10)), [9 - p for p in range(10)]])  # ranks by position, either way round
    assert np.allclose(position_free_ndcg(shown_at), POSITION_ONLY_NDCG) and round(POSITION_ONLY_NDCG, 4) == 0.4544
    assert np.allclose(list_bias(shown_at), 2.5)
    always_first = pd.Series([[0] * 10])
    assert position_free_ndcg(always_first).tolist() == [1.0] and list_bias(always_first).tolist() == [0.0]


def test_too_few_paired_lists_get_no_interval_because_it_would_hold_a_zero_effect_too_rarely():
    from cotrec.metrics import MIN_PAIRED_LISTS, bootstrap_coverage, paired_difference

    assert bootstrap_coverage(7, replicates=300, rounds=500) < 0.9  # a percentile interval over 7 lists
    assert bootstrap_coverage(MIN_PAIRED_LISTS * 2, replicates=300, rounds=500) >= 0.93
    few = paired_difference(np.full(MIN_PAIRED_LISTS - 1, 0.1))
    assert few["interval"] is None and few["mean"] == pytest.approx(0.1) and "fewer than" in few["why"]
    enough = paired_difference(np.random.default_rng(0).normal(0.1, 0.01, MIN_PAIRED_LISTS))
    assert enough["interval"] and enough["low"] > 0
