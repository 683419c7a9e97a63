"""The training recipe: one loop that runs under Ray Train (TorchTrainer, DDP) or in-process.

`train_loop(job)` is the per-worker function. Under Ray Train each worker reads its equal shard
of the training rows' Ray Dataset (`ray.train.get_dataset_shard("train")`, built and materialised
by the stage: `ingest.training_dataset`) in chunks it shuffles with a generator seeded per epoch;
in process it takes one seeded permutation of the rows it cut itself. The per-worker batch is batch_size /
workers, so the effective batch and the number of steps do not depend on the worker count. After
the steps the workers evaluate valid NDCG@10 on disjoint slices of the users and all-reduce the
sums, so they all take the same early-stopping decision.
The loop stops after `patience` epochs without improvement or at `max_epochs`.

Every `checkpoint_every` epochs and at the end, rank 0 reports a checkpoint holding the training
state (weights, optimiser, epoch, early-stopping counters, history) and the best state so far.
When a worker dies, Ray Train restarts the group (`max_failures`) and every worker resumes from
that checkpoint (`ray.train.get_checkpoint`), not from epoch 0. At the end rank 0 saves the best
state as `model.pt` in the stage's folder (on disk or on a store), so the weights never pass
through the driver.

`fit(job, rcfg, storage, model_out, train_rows)` launches it: Ray Train's TorchTrainer with the rows'
dataset (workers, CPUs and GPUs per worker from the config; gloo on CPU, nccl on GPU) or, with
`trainer: local`, a plain call.
"""

from __future__ import annotations

import copy
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cotrec.cluster import fit_torch_trainer, from_object_store
from cotrec.config import RetrieverConfig
from cotrec.metrics import ranking_metrics
from cotrec.progress import worker_log
from cotrec.retriever.data import Sequences, eval_queries, training_rows
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.ingest import epoch_batches, shuffled_batches
from cotrec.retriever.loss import SampledSoftmax, full_softmax_loss
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.safeload import load_state
from cotrec.storage import as_path, location

CHECKPOINT_FILE = "model.pt"
EPOCH_LINE_EVERY = 5.0  # seconds between two epochs' progress lines


def peak_memory_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Local:
    """The single-process stand-in for Ray Train's context, report() and get_checkpoint()."""

    world_rank, world_size = 0, 1

    def report(self, metrics: dict[str, Any], state: Optional[dict[str, Any]]) -> None:
        pass

    def resume_state(self) -> Optional[dict[str, Any]]:
        return None


class _RayTrain:
    def __init__(self):
        import ray.train

        self.train = ray.train
        context = ray.train.get_context()
        self.world_rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def training_shard(self) -> Any:
        """This worker's equal split of the training rows' dataset."""
        return self.train.get_dataset_shard("train")

    def report(self, metrics: dict[str, Any], state: Optional[dict[str, Any]]) -> None:
        if state is None:
            self.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(folder))

    def resume_state(self) -> Optional[dict[str, Any]]:
        """The last checkpoint of this run, when the worker group was restarted after a failure."""
        checkpoint = self.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_state(Path(folder) / CHECKPOINT_FILE)


def _valid_sums(model: SASRec, queries: dict[str, np.ndarray], rank: int, world: int, job: dict[str, Any],
                device: torch.device) -> torch.Tensor:
    """(hit@10 sum, ndcg@10 sum, users) over this worker's slice of the valid users."""
    rows = np.arange(len(queries["users"]))[rank::world]
    out = score_queries(model, queries, rows, job["mask_history"], top_m=1,
                        batch_size=job["eval_batch_size"], device=device)
    m = ranking_metrics(out["ranks"], [10])
    n = len(rows)
    return torch.tensor([m["hit@10"] * n, m["ndcg@10"] * n, float(n)], dtype=torch.float64)


class RetrieverOptimizer:
    """Adam over the model; with a sparse user table, SparseAdam over that table (the batch's rows
    only), so a step's cost does not grow with the number of users. One step, one state dict."""

    def __init__(self, model: SASRec, lr: float, weight_decay: float = 0.0):
        sparse = [model.user_emb.weight] if model.user_emb is not None and model.cfg.sparse_users else []
        dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
        self.parts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay)]
        if sparse:
            self.parts.append(torch.optim.SparseAdam(sparse, lr=lr))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part, saved in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(saved)


def train_step(model: SASRec, wrapped: torch.nn.Module, optim: RetrieverOptimizer, items: torch.Tensor,
               users: Optional[torch.Tensor], targets: torch.Tensor, sampled: Optional[SampledSoftmax] = None,
               generator: Optional[torch.Generator] = None) -> float:
    """One optimiser step on a batch of training rows (`wrapped`: the model, or its DDP wrapper);
    returns the loss. Shared by the training loop and `bench models`."""
    hidden = wrapped(items, users)
    table = model.item_table()
    loss = (sampled(hidden, table, targets, generator) if sampled is not None
            else full_softmax_loss(hidden, table, targets))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss.detach().item()


def train_loop(job: dict[str, Any]) -> dict[str, Any]:
    """One worker's training. Returns (on every rank) the per-epoch history and the best epoch."""
    ctx = _Local() if job.get("local") else _RayTrain()
    rank, world = ctx.world_rank, ctx.world_size
    if job.get("local"):
        device = torch.device("cuda" if job.get("use_gpu") and torch.cuda.is_available() else "cpu")
    else:
        import ray.train.torch

        device = ray.train.torch.get_device()
    seed = int(job["seed"])
    # One intra-op thread per CPU the worker was given: a small model gains nothing from more, and
    # oversubscribed threads on a busy machine stall every tiny op.
    torch.set_num_threads(max(1, int(job.get("cpus_per_worker", 1))))
    # Same seed on every worker for the initial weights (DDP also broadcasts rank 0's), then a
    # per-rank stream for dropout and negative sampling.
    torch.manual_seed(seed)
    cfg = SASRecConfig(**job["model"])
    to_tensor = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    model = SASRec(cfg, to_tensor(job.get("item_init")), to_tensor(job.get("user_init"))).to(device)
    torch.manual_seed(seed * 1009 + rank + 1)
    generator = torch.Generator().manual_seed(seed * 7919 + rank)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optim = RetrieverOptimizer(model, job["lr"], job["weight_decay"])
    sampled = (SampledSoftmax(job["item_counts"], job["negatives"], job["sampler"])
               if job["loss"] == "sampled" else None)

    seqs = Sequences.from_arrays(from_object_store(job["sequences"]))
    queries = eval_queries(seqs, "valid", cfg.max_len)
    per_worker = max(1, math.ceil(job["batch_size"] / world))
    if job.get("local"):
        windows = training_rows(seqs, cfg.max_len, user_token=cfg.user_token, stride=job["train_stride"])
        rows = len(windows["users"])
        batches = lambda epoch: shuffled_batches(  # noqa: E731
            windows, per_worker, np.random.default_rng(seed * 100_003 + epoch), device)
    else:  # equal shards (Ray Train's split): the same number of steps on every worker
        shard, rows = ctx.training_shard(), job["train_rows"]
        batches = lambda epoch: epoch_batches(shard, per_worker, seed, epoch, rank, device)  # noqa: E731
    del seqs
    if rank == 0 and job.get("log"):
        worker_log(f"[retriever {job.get('name', '')} seed {job.get('seed')}] {rows:,} training rows per epoch")
    use_users = cfg.user_token

    history: list[dict[str, Any]] = []
    best, best_epoch, since_best, first_epoch = -1.0, -1, 0, 0
    best_state: Optional[dict[str, Any]] = None
    resumed = ctx.resume_state()
    if resumed is not None:  # a worker died: carry on from the last checkpoint, on every rank
        model.load_state_dict(resumed["model"])
        optim.load_state_dict(resumed["optim"])
        best, best_epoch, since_best = resumed["best"], resumed["best_epoch"], resumed["since_best"]
        best_state, history, first_epoch = resumed["best_state"], resumed["history"], resumed["epoch"] + 1
        if rank == 0:
            worker_log(f"[retriever {job.get('name', '')}] resuming after epoch {resumed['epoch']} from its checkpoint")
    started = time.perf_counter() - (history[-1]["elapsed"] if history else 0.0)
    last_line = -float("inf")
    for epoch in range(first_epoch, job["max_epochs"]):
        t0 = time.perf_counter()
        model.train()
        total_loss, steps, rows_read = 0.0, 0, 0
        for items, targets, users in batches(epoch):
            total_loss += train_step(model, wrapped, optim, items, users if use_users else None, targets, sampled,
                                     generator)
            steps, rows_read = steps + 1, rows_read + len(targets)
        train_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        sums = _valid_sums(model, queries, rank, world, job, device)
        if world > 1:
            torch.distributed.all_reduce(sums)
        hit, ndcg = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        eval_seconds = time.perf_counter() - t1
        improved = ndcg > best
        if improved:
            best, best_epoch, since_best = ndcg, epoch, 0
        else:
            since_best += 1
        record = {"epoch": epoch, "loss": total_loss / max(steps, 1), "steps": steps, "rows_read": rows_read,
                  "valid_hit@10": hit,
                  "valid_ndcg@10": ndcg, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                  "eval_users": int(sums[2]), "elapsed": time.perf_counter() - started,
                  "peak_memory_mb": peak_memory_mb(), "improved": improved,
                  **({"resumed": True} if resumed is not None and epoch == first_epoch else {})}
        history.append(record)
        if improved and rank == 0:
            best_state = {"model": copy.deepcopy(model.state_dict()), "sasrec": job["model"], "epoch": epoch,
                          "valid_ndcg@10": ndcg}
        stop = since_best >= job["patience"] or epoch == job["max_epochs"] - 1
        # Every rank takes the same decision (the metrics were all-reduced), as report() is collective.
        # Not every epoch: a Ray Train report blocks until the controller polls it.
        if stop or (epoch + 1) % job.get("checkpoint_every", 10) == 0:
            state = None
            if rank == 0:
                state = {"model": model.state_dict(), "optim": optim.state_dict(), "epoch": epoch, "best": best,
                         "best_epoch": best_epoch, "since_best": since_best, "best_state": best_state,
                         "history": history}
            ctx.report({k: v for k, v in record.items() if k not in ("improved", "resumed")}, state)
        # an epoch's line at most every few seconds (an in-process epoch on a small sample is a
        # fraction of a second), and always the last one
        if job.get("log") and rank == 0 and (stop or time.perf_counter() - last_line >= EPOCH_LINE_EVERY):
            last_line = time.perf_counter()
            mark = " *" if improved else ""
            worker_log(f"[retriever {job.get('name', '')} seed {job.get('seed')}] epoch {epoch:3d} "
                       f"loss {record['loss']:.4f} "
                       f"valid ndcg@10 {ndcg:.4f} hit@10 {hit:.4f} ({train_seconds:.1f}+{eval_seconds:.1f} s){mark}")
        if stop:
            break
    if rank == 0:  # the trained model goes where the stage publishes it, not back through the driver
        save_model(best_state, job["model_out"])
    return {"history": history, "best_epoch": best_epoch, "best_valid_ndcg@10": best, "world_size": world,
            "seconds": time.perf_counter() - started,
            "resumed_after_epoch": None if resumed is None else resumed["epoch"]}


def save_model(state: dict[str, Any], path: str) -> None:
    """`model.pt` ({"model": state dict, "sasrec": config fields, "epoch", "valid_ndcg@10"}), on disk
    or on a store: what the evaluation actors and `load_retriever` load."""
    with as_path(path).open("wb") as out:
        torch.save(state, out)


def fit(job: dict[str, Any], rcfg: RetrieverConfig, storage: Path, model_out: Path,
        train_rows: Any = None) -> dict[str, Any]:
    """Train with the configured trainer; the best epoch's model is saved at `model_out` (by the
    worker of rank 0: the driver never holds the weights); returns the loop's result.
    `train_rows`: the rows' Ray Dataset (`ingest.training_dataset`), which the Ray trainer needs."""
    use_gpu = rcfg.gpus_per_worker > 0
    job = {**job, "model_out": location(model_out)}
    if rcfg.trainer == "local":
        threads = torch.get_num_threads()
        try:
            return train_loop({**job, "local": True, "use_gpu": use_gpu})
        finally:
            torch.set_num_threads(threads)
    if train_rows is None:
        raise ValueError("the Ray trainer reads its rows from a Ray Dataset: pass train_rows")
    job = {**job, "train_rows": train_rows.count()}
    result = fit_torch_trainer(train_loop, job, name="train", storage=location(storage),
                               datasets={"train": train_rows},
                               num_workers=rcfg.num_workers, cpus_per_worker=rcfg.cpus_per_worker,
                               gpus_per_worker=rcfg.gpus_per_worker, max_failures=rcfg.max_failures)
    return result.return_value
