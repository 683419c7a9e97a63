"""SASRec retriever: model, windows, losses, evaluation, variants, Table 1 grid and Ray Train.

Most tests use a small synthetic catalogue (tests/retriever_data.py) where users mostly walk
item k -> k+1, so a working SASRec must learn it in a few seconds; the Description / Preference
variants use SYNTHETIC extraction outputs written by the test. One test runs the grid on the real
demo preset; one module-scoped Ray session serves the Ray Train tests.
"""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cotrec.errors import CotrecError
from cotrec.metrics import hit_at_k, ndcg_at_k, ndcg_gains, paired_bootstrap, ranking_metrics
from cotrec.retriever import retriever_grid, train_variant
from cotrec.retriever.data import Sequences, eval_queries, training_rows
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.loss import SampledSoftmax, full_softmax_loss
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.retriever.variants import parse_variant
from retriever_data import FAST_RETRIEVER, fake_extraction, synthetic_run

SMALL = FAST_RETRIEVER + ("retriever.grid_seeds=1",)


def small_run(tmp_path, *extra):
    return synthetic_run(tmp_path / "run", config_overrides=SMALL + tuple(extra))


def test_metrics_from_ranks():
    ranks = np.array([0, 1, 9, 10, 500])
    assert hit_at_k(ranks, 10) == pytest.approx(3 / 5)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5)
    assert ranking_metrics(ranks, [1, 10]) == {"hit@1": 0.2, "ndcg@1": 0.2, "hit@10": 0.6,
                                               "ndcg@10": pytest.approx(ndcg_at_k(ranks, 10))}


def _bootstrap_by_users(values, rounds, rng):
    """The textbook paired bootstrap: each round draws seeds, then users, one by one."""
    seeds, users = values.shape
    means = [values[rng.integers(seeds, size=seeds)][:, rng.integers(users, size=users)].mean() for _ in range(rounds)]
    return np.percentile(means, [2.5, 97.5])


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_paired_bootstrap_drawing_counts_per_distinct_difference_matches_drawing_users(seeds):
    # Differences of NDCG@10 repeat a few values across many users: the interval drawn from their
    # counts must be the one drawn from the users themselves (to Monte Carlo error).
    rng = np.random.default_rng(5)
    users = 4000
    treatment = ndcg_gains(rng.choice([0, 3, 50], p=[0.3, 0.3, 0.4], size=(seeds, users)), 10)
    baseline = ndcg_gains(rng.choice([0, 3, 50], p=[0.25, 0.3, 0.45], size=(seeds, users)), 10)
    differences = (treatment - baseline).squeeze()
    result = paired_bootstrap(differences, seed=1)
    assert result["mean"] == pytest.approx(differences.mean())
    assert (result["seeds"], result["users"]) == (seeds, users)
    low, high = _bootstrap_by_users(np.atleast_2d(differences), 2000, np.random.default_rng(2))
    width = high - low
    assert result["low"] == pytest.approx(low, abs=0.1 * width)
    assert result["high"] == pytest.approx(high, abs=0.1 * width)
    assert 0 < result["low"] < result["mean"] < result["high"]  # a real shift: the interval excludes 0
    noise = paired_bootstrap(ndcg_gains(rng.integers(0, 20, size=users), 10)
                             - ndcg_gains(rng.integers(0, 20, size=users), 10), seed=1)
    assert noise["low"] < 0 < noise["high"]  # no signal: the interval holds 0


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_training_rows_train_every_target_once_with_its_preceding_items_and_no_held_out_target(tmp_path, stride):
    """Each train target is trained exactly once per epoch, reading exactly the items before it (the
    last max_len of them, and at least max_len - stride + 1 where it has them)."""
    config, run = small_run(tmp_path)
    inter = pd.read_parquet(tmp_path / "run" / "data" / "interactions.parquet")
    seqs = Sequences.from_interactions(inter, num_items=80)
    max_len = 8
    for user_token in (False, True):
        rows = training_rows(seqs, max_len=max_len, user_token=user_token, stride=stride)
        trained = {}  # (user, target index in its train items) -> the items the row showed before it
        for items, targets, user in zip(rows["items"], rows["targets"], rows["users"]):
            history = list(seqs.train[user])  # a user's items are distinct: an item names its place
            shown = [int(i) - 1 for i in items if i]
            for position in np.flatnonzero(targets):
                j = history.index(int(targets[position]) - 1)
                context = shown[:position + 1 - int(user_token)]
                assert context == history[j - len(context):j], "a target must read the items right before it"
                assert (int(user), j) not in trained, "a target trained twice in one epoch"
                trained[(int(user), j)] = context
        first = 0 if user_token else 1
        assert set(trained) == {(u, j) for u, s in enumerate(seqs.train) for j in range(first, len(s))}
        for (user, j), context in trained.items():
            assert min(j, max_len - stride + 1) <= len(context) <= max_len
        held_out = {(u, int(seqs.valid[u])) for u in range(seqs.num_users)} | {(u, int(seqs.test[u])) for u in range(seqs.num_users)}
        assert not any((int(u), int(t) - 1) in held_out for u, ts in zip(rows["users"], rows["targets"]) for t in ts if t)
    assert len(training_rows(seqs, max_len, False, stride=max_len)["users"]) < len(training_rows(seqs, max_len, False, 1)["users"])
    q = eval_queries(seqs, "test", max_len=8)
    assert (q["targets"] == seqs.test).all() and q["lengths"].max() == 8
    assert q["seen_indptr"][-1] == sum(len(s) + 1 for s in seqs.train)     # train + valid items are masked


def test_the_flat_histories_are_each_users_train_items_in_order_whatever_the_row_order(tmp_path):
    """`sequence_arrays` (what the driver ships) holds each user's train items chronologically and
    the two targets, from a table in any row order; a user without a test target is an error."""
    from cotrec.errors import DataError
    from cotrec.retriever.data import sequence_arrays

    small_run(tmp_path)
    inter = pd.read_parquet(tmp_path / "run" / "data" / "interactions.parquet")
    shuffled = inter.sample(frac=1.0, random_state=0)
    arrays = sequence_arrays(shuffled, num_items=80)
    for user, rows in inter.groupby("user_idx"):
        rows = rows.sort_values("position")
        train = arrays["train_items"][arrays["train_indptr"][user]:arrays["train_indptr"][user + 1]]
        assert train.tolist() == rows[rows.split == "train"].item_idx.tolist()
        assert arrays["valid"][user] == rows[rows.split == "valid"].item_idx.item()
        assert arrays["test"][user] == rows[rows.split == "test"].item_idx.item()
    seqs = Sequences.from_arrays(arrays)
    assert seqs.num_users == inter.user_idx.nunique() and len(seqs.train) == seqs.num_users
    with pytest.raises(DataError, match="valid and one test target"):
        sequence_arrays(inter[~((inter.user_idx == 3) & (inter.split == "test"))], num_items=80)


def test_sasrec_is_causal_ignores_padding_and_uses_the_user_token():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, num_users=4, dim=16, max_len=6, dropout=0.0)).eval()
    items = torch.tensor([[3, 4, 5, 6, 0, 0]])
    users = torch.tensor([1])
    h = model(items, users)
    assert h.shape == (1, 7, 16)                                  # user token + 6 positions
    changed = torch.tensor([[3, 4, 9, 6, 0, 0]])
    h2 = model(changed, users)
    assert torch.allclose(h[:, :3], h2[:, :3], atol=1e-6)          # the future does not leak back
    assert not torch.allclose(h[:, 3], h2[:, 3])
    assert not torch.allclose(h, model(items, torch.tensor([2])))  # the user token matters
    plain = SASRec(SASRecConfig(num_items=30, dim=16, max_len=6, dropout=0.0)).eval()
    short = plain(torch.tensor([[3, 4, 0, 0, 0, 0]]))
    assert torch.allclose(short[:, :2], plain(torch.tensor([[3, 4, 7, 8, 0, 0]]))[:, :2], atol=1e-6)


def test_sampled_softmax_with_logq_converges_to_the_full_softmax():
    torch.manual_seed(0)
    table = torch.randn(300, 8) * 0.5
    targets = torch.randint(1, 301, (256,))
    counts = np.random.default_rng(0).zipf(1.5, 300).clip(max=5000)   # a skewed popularity

    def loss_and_grad(loss_fn):
        hidden = torch.randn(256, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss = loss_fn(hidden)
        loss.backward()
        return float(loss.detach()), hidden.grad.flatten()

    full, full_grad = loss_and_grad(lambda h: full_softmax_loss(h, table, targets))
    found = {}
    for logq in (True, False):
        sampled = SampledSoftmax(counts, negatives=2000, sampler="popularity", logq=logq)
        loss, grad = loss_and_grad(lambda h: sampled(h, table, targets, torch.Generator().manual_seed(2)))
        found[logq] = (abs(loss - full), float(torch.nn.functional.cosine_similarity(full_grad, grad, dim=0)))
    # corrected: the loss and its gradient track the full softmax; uncorrected: biased by popularity
    assert found[True][0] < 0.3 and found[False][0] > 1.0
    assert found[True][1] > 0.93 and found[True][1] > found[False][1]


def test_train_variant_writes_metrics_and_candidates_that_agree(tmp_path):
    config, run = small_run(tmp_path)
    train_variant(config, run, "none/random")
    folder = tmp_path / "run" / "retriever" / "none-random"
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("hit@10", "ndcg@10", "split", "users", "seed", "wall_seconds", "mask_history", "best_epoch"):
        assert key in metrics
    assert metrics["split"] == "test" and metrics["users"] == 60 and metrics["mask_history"] is True
    assert metrics["ndcg@10"] > 0.3                # the k -> k+1 walk is learnt (random is ~0.07)
    assert (folder / "model.pt").exists() and not (folder / ".ray").exists()
    cands = pd.read_parquet(folder / "candidates.parquet")
    assert sorted(cands.split.unique()) == ["test", "valid"] and len(cands) == 120
    assert all(len(c) == 10 for c in cands.candidates)
    for split, m in (("test", metrics), ("valid", metrics["valid"])):
        part = cands[cands.split == split]
        # the target's position among the candidates gives back Hit@10 / NDCG@10 ...
        pos = np.array([list(c).index(t) if t in list(c) else 99 for c, t in zip(part.candidates, part.target_item)])
        assert hit_at_k(pos, 10) == pytest.approx(m["hit@10"]) and ndcg_at_k(pos, 10) == pytest.approx(m["ndcg@10"])
        assert (part.target_in_candidates == (pos < 10)).all()
        # ... and the recorded full-ranking rank gives back the larger K
        assert ndcg_at_k(part.target_rank.to_numpy(), 20) == pytest.approx(m["ndcg@20"])
    # history masking: no candidate was already seen before the target
    inter = pd.read_parquet(tmp_path / "run" / "data" / "interactions.parquet")
    seen = inter[inter.split != "test"].groupby("user_idx").item_idx.apply(set)
    test = cands[cands.split == "test"]
    assert not any(set(c) & seen[u] for u, c in zip(test.user_idx, test.candidates))
    # same inputs: skipped; another seed: its own folder
    assert train_variant(config, run, "none/random")["skipped"]
    other = train_variant(config, run, "none/random", seed=1)
    assert other["seed"] == 1 and (tmp_path / "run" / "retriever" / "none-random-seed1" / "metrics.json").exists()


def test_seeds_are_honoured(tmp_path):
    config, run = small_run(tmp_path, "retriever.max_epochs=3")
    first = train_variant(config, run, "random/random", seed=3)
    first_history = json.loads((tmp_path / "run" / "retriever" / "random-random-seed3" / "history.json").read_text())
    again = train_variant(config, run, "random/random", seed=3, force=True)
    assert first["ndcg@10"] == again["ndcg@10"] and first["valid"]["ndcg@10"] == again["valid"]["ndcg@10"]
    history = json.loads((tmp_path / "run" / "retriever" / "random-random-seed3" / "history.json").read_text())
    assert [h["loss"] for h in history] == [h["loss"] for h in first_history]


def test_history_masking_is_configurable_and_recorded(tmp_path):
    """Unmasked, the seen items compete with the target: its rank can only grow, the candidates hold
    seen items, and the run records which way it was evaluated."""
    config, run = small_run(tmp_path, "retriever.mask_history=false", "retriever.max_epochs=3")
    metrics = train_variant(config, run, "none/random")
    assert metrics["mask_history"] is False
    folder = tmp_path / "run" / "retriever" / "none-random"
    state = torch.load(folder / "model.pt", weights_only=False)
    model = SASRec(SASRecConfig(**state["sasrec"]))
    model.load_state_dict(state["model"])
    inter = pd.read_parquet(tmp_path / "run" / "data" / "interactions.parquet")
    queries = eval_queries(Sequences.from_interactions(inter, num_items=80), "test", max_len=8)
    rows = np.arange(len(queries["users"]))
    masked = score_queries(model, queries, rows, mask_history=True, top_m=10)
    unmasked = score_queries(model, queries, rows, mask_history=False, top_m=10)
    assert (unmasked["ranks"] >= masked["ranks"]).all() and (unmasked["ranks"] > masked["ranks"]).any()
    test = pd.read_parquet(folder / "candidates.parquet").query("split == 'test'")
    assert (test.target_rank.to_numpy() == unmasked["ranks"]).all()   # the stored run is the unmasked one
    seen = inter[inter.split != "test"].groupby("user_idx").item_idx.apply(set)
    assert any(set(c) & seen[u] for u, c in zip(test.user_idx, test.candidates))


def _two_steps(sparse: bool):
    """A model after a step on users 0, 1 and another on users 2, 3: (model, optimiser, the user
    table after each step)."""
    from cotrec.retriever.train import RetrieverOptimizer, train_step

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, num_users=8, dim=16, max_len=6, dropout=0.0, sparse_users=sparse))
    optim = RetrieverOptimizer(model, lr=0.01)
    items, targets = torch.randint(1, 31, (2, 6)), torch.randint(1, 31, (2, 7))
    tables = []
    for users in ([0, 1], [2, 3]):
        train_step(model, model, optim, items, torch.tensor(users), targets)
        tables.append(model.user_emb.weight.detach().clone())
    return model, optim, tables


def test_sparse_user_updates_move_only_the_batchs_users_and_their_state_resumes():
    """`sparse_user_updates`: the user table's gradient is sparse and SparseAdam moves only the
    batch's rows, so a step's cost does not grow with the users; dense Adam keeps moving the rows of
    users from earlier steps (their momentum). The optimiser's state round-trips, as a resumed
    Ray Train worker needs."""
    from cotrec.config import load_config
    from cotrec.errors import ConfigError
    from cotrec.retriever.train import RetrieverOptimizer, train_step

    model, optim, (first, second) = _two_steps(sparse=True)
    assert model.user_emb.weight.grad.is_sparse
    assert torch.equal(first[[0, 1]], second[[0, 1]]) and not torch.equal(first[[2, 3]], second[[2, 3]])
    _, _, (dense_first, dense_second) = _two_steps(sparse=False)
    assert not torch.equal(dense_first[[0, 1]], dense_second[[0, 1]])
    checkpoint = io.BytesIO()  # a state dict shares the live tensors: save it, as a checkpoint does
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, checkpoint)
    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=False)
    resumed = SASRec(model.cfg)
    resumed.load_state_dict(saved["model"])
    resumed_optim = RetrieverOptimizer(resumed, lr=0.01)
    resumed_optim.load_state_dict(saved["optim"])
    items, targets, users = torch.randint(1, 31, (2, 6)), torch.randint(1, 31, (2, 7)), torch.tensor([1, 2])
    for m, o in ((model, optim), (resumed, resumed_optim)):
        train_step(m, m, o, items, users, targets)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ConfigError, match="retriever: .*sparse_user_updates.*weight_decay"):
        load_config("demo", ["retriever.sparse_user_updates=true", "retriever.weight_decay=0.01"])


def test_sampled_softmax_option_trains(tmp_path):
    config, run = small_run(tmp_path, "retriever.loss=sampled", "retriever.negatives=20")
    metrics = train_variant(config, run, "none/random")
    assert metrics["loss"] == "sampled" and metrics["ndcg@10"] > 0.2
    sparse_config, sparse_run = synthetic_run(tmp_path / "sparse", config_overrides=SMALL + (
        "retriever.loss=sampled", "retriever.negatives=20", "retriever.sparse_user_updates=true"))
    assert train_variant(sparse_config, sparse_run, "random/random")["ndcg@10"] > 0.2


def test_variants_needing_extraction_fail_clearly_and_others_do_not(tmp_path):
    config, run = small_run(tmp_path)
    with pytest.raises(CotrecError, match="extract/item_descriptions"):
        train_variant(config, run, "none/description")
    with pytest.raises(CotrecError, match="extract/preferences"):
        train_variant(config, run, "preference/caption")
    with pytest.raises(CotrecError, match="variant 'users/items'"):
        parse_variant("users/items")
    with pytest.raises(CotrecError, match="extract/"):          # the grid checks before training anything
        retriever_grid(config, run)
    assert not (tmp_path / "run" / "retriever").exists()


@pytest.mark.slow
def test_grid_on_the_demo_preset_writes_table1_with_seven_rows(tmp_path, cli):
    """The real demo data (the demo's ml-100k users); descriptions / preferences are SYNTHETIC stand-ins."""
    run_dir = str(tmp_path / "run")
    assert cli("prepare", "--config", "demo", "--run-dir", run_dir).returncode == 0
    fake_extraction(tmp_path / "run")
    args = ["retriever", "grid", "--config", "demo", "--run-dir", run_dir, "--seeds", "2",
            "--set", "retriever.trainer=local", "--set", "retriever.max_epochs=3"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "run" / "reports" / "table1.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "±" in line]
    assert [r.split("|")[1].strip() + "/" + r.split("|")[2].strip() for r in rows] == [
        "None/Random", "None/Caption", "None/Description", "Random/Caption", "Random/Description",
        "Preference/Caption", "Preference/Description"]
    users = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())["users"]
    assert "2 seed(s)" in table and f"({users} test users)" in table
    pref = json.loads((tmp_path / "run" / "retriever" / "preference-description-seed1" / "metrics.json").read_text())
    assert pref["user_init_horizon"] == "train" and pref["users_with_preference"] == users
    assert pref["seed"] == 1 and pref["users"] == users
    again = cli(*args)
    assert again.returncode == 0 and "up to date" in again.stdout
    # one more seed trains only the new seed
    more = cli(*[a if a != "2" else "3" for a in args])
    assert more.returncode == 0, more.stderr
    assert more.stderr.count("up to date; skipped") == 14 and "3 seed(s)" in (
        tmp_path / "run" / "reports" / "table1.md").read_text()


# --- Ray Train ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_train_two_workers_match_one(tmp_path, ray_session):
    """2 DDP workers (gloo) reach the quality of 1 (same effective batch), under Ray Train."""
    results = {}
    for workers in (1, 2):
        config, run = synthetic_run(tmp_path / f"run{workers}", config_overrides=SMALL + (
            "retriever.trainer=ray", f"retriever.num_workers={workers}", "retriever.cpus_per_worker=1",
            "retriever.max_epochs=25"))
        results[workers] = train_variant(config, run, "none/random")
        assert results[workers]["trainer"] == "ray" and results[workers]["num_workers"] == workers
    assert results[1]["ndcg@10"] > 0.3 and results[2]["ndcg@10"] > 0.3
    assert abs(results[1]["ndcg@10"] - results[2]["ndcg@10"]) < 0.15


def test_ray_train_workers_read_equal_shards_of_the_training_rows_dataset(tmp_path, monkeypatch, ray_session):
    """The Ray trainer's rows come from a Ray Dataset: the dataset holds exactly the rows cut in
    process, in the same order on every build, and each of 2 workers trains on an equal half of
    the dataset it is given (a cut one here), whatever the histories would give."""
    import cotrec.retriever.histories as histories_module

    config, run = small_run(tmp_path, "retriever.trainer=ray", "retriever.num_workers=2",
                            "retriever.cpus_per_worker=1", "retriever.max_epochs=2", "retriever.patience=2")
    rc = config.retriever
    histories = histories_module.Histories(run)
    dataset = histories.training_rows(rc.max_len, False, rc.train_stride)
    assert histories.training_rows(rc.max_len, False, rc.train_stride) is dataset  # built once per layout
    in_process = training_rows(Sequences.from_arrays(histories.arrays()), rc.max_len, False, rc.train_stride)

    def as_rows(columns):
        rows = np.column_stack([np.asarray(columns["items"]), np.asarray(columns["targets"]), columns["users"]])
        return rows[np.lexsort(rows.T[::-1])]

    first = dataset.take_batch(dataset.count(), batch_format="numpy")
    assert np.array_equal(as_rows(first), as_rows(in_process))
    again = histories_module.Histories(run).training_rows(rc.max_len, False, rc.train_stride)
    assert np.array_equal(np.asarray(again.take_batch(again.count(), batch_format="numpy")["items"]), first["items"])

    kept = 101
    monkeypatch.setattr(histories_module.Histories, "training_rows",
                        lambda self, *layout: dataset.limit(kept).materialize())
    result = train_variant(config, run, "none/random")
    history = json.loads((Path(result["folder"]) / "history.json").read_text())
    per_worker = -(-rc.batch_size // 2)
    assert [h["rows_read"] for h in history] == [kept // 2] * 2    # rank 0's equal half, every epoch
    assert [h["steps"] for h in history] == [-(-(kept // 2) // per_worker)] * 2


def test_the_grid_trains_two_at_once_and_each_learns_what_it_learns_alone(tmp_path, monkeypatch, ray_session):
    """With `concurrent_trainings: 2` Table 1's trainings overlap in time (each its own Ray Train
    worker group) and the driver reads the histories once for both; a seed trained beside another
    gives the same model, metrics and candidates as the same seed trained alone."""
    import cotrec.retriever.histories as histories_module

    reads = []
    read_sequences = histories_module.read_sequences
    monkeypatch.setattr(histories_module, "read_sequences", lambda run: reads.append(run) or read_sequences(run))
    settings = SMALL + ("retriever.trainer=ray", "retriever.max_epochs=8", "retriever.grid=[none/random]")
    config, run = synthetic_run(tmp_path / "grid", config_overrides=settings + (
        "retriever.grid_seeds=2", "retriever.concurrent_trainings=2"))
    retriever_grid(config, run)
    folders = [tmp_path / "grid" / "retriever" / name for name in ("none-random", "none-random-seed1")]
    first, second = (json.loads((folder / "metrics.json").read_text()) for folder in folders)
    assert second["started_at"] < first["started_at"] + first["wall_seconds"]   # they overlapped
    assert first["started_at"] < second["started_at"] + second["wall_seconds"]
    assert len(reads) == 1
    alone_config, alone_run = synthetic_run(tmp_path / "alone", config_overrides=settings)
    alone = train_variant(alone_config, alone_run, "none/random", seed=1)
    assert {k: alone[k] for k in ("ndcg@10", "hit@10", "best_epoch")} == {
        k: second[k] for k in ("ndcg@10", "hit@10", "best_epoch")}
    assert pd.read_parquet(Path(alone["folder"]) / "candidates.parquet").equals(
        pd.read_parquet(folders[1] / "candidates.parquet"))


def test_concurrent_trainings_stop_at_the_first_failure(tmp_path, monkeypatch):
    """Orchestration only, with fake trainings: once a training fails while an earlier one still
    runs, the trainings not yet started never start, and the failure is raised."""
    import time as clock

    import cotrec.retriever.grid as grid_module

    config, run = small_run(tmp_path, "retriever.trainer=ray", "retriever.concurrent_trainings=2")
    started = []

    def fake_training(config, run, name, seed, force, histories):
        started.append(seed)
        if seed == 1:
            raise CotrecError("seed 1 failed")
        clock.sleep(1)  # seed 0 outlasts the failure
        return {"seed": seed}

    monkeypatch.setattr(grid_module, "train_variant", fake_training)
    monkeypatch.setattr(grid_module, "ensure_ray", lambda: None)
    with pytest.raises(CotrecError, match="seed 1 failed"):
        grid_module.train_each(config, run, [("none/random", seed) for seed in range(4)])
    assert sorted(started) == [0, 1]


def test_a_train_worker_killed_mid_fit_resumes_from_its_last_checkpoint(tmp_path, ray_session):
    """SIGKILL the Ray Train worker once a checkpoint is in: the group restarts and the loop carries on
    after that checkpoint's epoch (the history runs on without a gap or a restart from epoch 0)."""
    from cotrec.bench.faults import train_worker_killed

    config, run = small_run(tmp_path, "retriever.max_epochs=16", "retriever.patience=16")
    result = train_worker_killed(config, run)
    assert result["killed"] and "RayTrainWorker" in result["killed"]["title"]
    assert result["resumed_at_epoch"] and result["resumed_at_epoch"] > 0 and result["epochs"] == 16 and result["ok"]


@pytest.mark.slow
def test_in_a_ray_job_evaluation_runs_on_actors_and_its_results_do_not_depend_on_their_number(tmp_path, monkeypatch,
                                                                                             ray_session):
    """The driver builds no SASRec and no queries: actors load model.pt, cut their blocks' queries
    from the flat histories and rank them; the candidates table and the ranks are the same on 1 or
    2 actors, equal those of the same model scored in process, and are what the stage wrote."""
    import cotrec.retriever.scoring as scoring
    from cotrec.retriever.histories import Histories

    config, run = small_run(tmp_path, "retriever.eval_batch_size=16")
    result = train_variant(config, run, "none/random")
    assert result["scoring_actors"] == 1  # in a Ray job the evaluation went to an actor
    histories = Histories(run)
    sequences = histories.arrays()
    users = int(sequences["num_users"])
    model_path = Path(result["folder"]) / "model.pt"
    here, _ = scoring.rank_and_write(config.retriever, model_path, users, sequences, tmp_path / "here.parquet",
                                     on_actors=False)

    def not_in_the_driver(*_, **__):
        raise AssertionError("the driver built a model or queries")

    monkeypatch.setattr(scoring, "load_model", not_in_the_driver)  # this process only; actors load their own
    monkeypatch.setattr(scoring, "eval_queries", not_in_the_driver)
    two = config.retriever.model_copy(update={"num_workers": 2})
    # the histories by object-store reference (as the stage ships them) or by value: the same
    on_one, actors_one = scoring.rank_and_write(config.retriever, model_path, users, histories.for_ray_workers(),
                                                tmp_path / "one.parquet", on_actors=True)
    on_two, actors_two = scoring.rank_and_write(two, model_path, users, sequences, tmp_path / "two.parquet",
                                                on_actors=True)
    assert (actors_one, actors_two) == (1, 2)
    tables = {name: pd.read_parquet(tmp_path / f"{name}.parquet") for name in ("here", "one", "two")}
    assert tables["one"].equals(tables["two"])  # the same rows in the same order
    assert len(tables["one"]) == 2 * users
    for split in ("valid", "test"):
        assert np.array_equal(on_one[split], on_two[split]) and np.array_equal(on_one[split], here[split])
        assert (on_one[split] >= 0).all()
    # In process the model may run on more threads than an actor's one: the ranks and the top
    # scores agree, the order of near-equal candidates need not.
    same = ["user_idx", "split", "target_item", "target_rank"]
    assert tables["one"][same].equals(tables["here"][same])
    assert np.allclose(np.stack(tables["one"].scores), np.stack(tables["here"].scores), atol=1e-5)
    written = pd.read_parquet(Path(result["folder"]) / "candidates.parquet")
    assert written.equals(tables["one"])
    test = written[written.split == "test"]
    assert test.user_idx.tolist() == sorted(test.user_idx) and test.target_rank.tolist() == on_one["test"].tolist()


def test_a_catalogue_past_the_threshold_with_the_full_softmax_is_advised_to_sample(tmp_path, capsys):
    config, run = small_run(tmp_path, "retriever.sampled_above_items=50", "retriever.max_epochs=1")
    assert not train_variant(config, run, "none/random")["skipped"]
    err = capsys.readouterr().err
    assert "80 items is past retriever.sampled_above_items (50)" in err and "set retriever.loss=sampled" in err
    # the threshold is advice, not a setting of the model: changing it retrains nothing
    quiet = config.model_copy(update={"retriever": config.retriever.model_copy(update={"sampled_above_items": None})})
    assert train_variant(quiet, run, "none/random")["skipped"]
    assert "sampled_above_items" not in capsys.readouterr().err


def test_a_user_table_past_the_threshold_with_dense_updates_is_advised_to_go_sparse(tmp_path, capsys, monkeypatch):
    import cotrec.retriever.stage as stage

    monkeypatch.setattr(stage, "SPARSE_USERS_ADVISED_ABOVE", 50)
    config, run = small_run(tmp_path, "retriever.max_epochs=1")
    train_variant(config, run, "random/random")
    assert "60 users is past 50" in capsys.readouterr().err
    train_variant(config, run, "none/random")   # no user token, no table to update
    assert "sparse_user_updates" not in capsys.readouterr().err


class RunsCode:
    """A pickle that runs code when unpickled: what someone who can write a run directory could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_crafted_pickle_in_a_run_directory_is_refused_and_nothing_in_it_runs(tmp_path):
    from cotrec.retriever.scoring import load_model

    marker = tmp_path / "ran.txt"
    planted = tmp_path / "model.pt"
    torch.save({"sasrec": {}, "model": RunsCode(marker)}, planted)
    with pytest.raises(CotrecError, match=r"model\.pt: refused"):
        load_model(planted)
    assert not marker.exists()
    with pytest.raises(CotrecError, match="not a readable torch state file"):
        (tmp_path / "torn.pt").write_bytes(planted.read_bytes()[:40])
        load_model(tmp_path / "torn.pt")
    # the unsafe load the files were read with before runs it
    torch.load(planted, weights_only=False)
    assert marker.read_text() == "ran"
