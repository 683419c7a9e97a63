"""The training recipe: one loop that runs under Ray Train (TorchTrainer, DDP) or in-process.

`train_loop(job)` is the per-worker function, `job` a `TrainingJob`. Under Ray Train each worker reads its equal shard
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

`fit(job, histories, storage, model_out)` launches it through the harness (`cotrec.training.fit_loop`):
Ray Train's TorchTrainer with the rows' dataset (the job's workers, CPUs and GPUs per worker; gloo
on CPU, nccl on GPU) or, with `trainer: local`, a plain call; it returns a `TrainingResult`. The
loop's context (rank, device, resume state, reports) is the harness's `training_context`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import time
from pathlib import Path
from typing import Any, Optional, TypedDict, Union

import numpy as np
import torch

from cotrec.cluster import ensure_ray, from_object_store
from cotrec.config import RetrieverConfig
from cotrec.metrics import ranking_metrics
from cotrec.progress import worker_log
from cotrec.retriever.data import Sequences, eval_queries, training_rows
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.histories import Histories
from cotrec.retriever.ingest import epoch_batches, shuffled_batches
from cotrec.retriever.loss import SampledSoftmax, full_softmax_loss
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.storage import as_path, location
from cotrec.training import fit_loop, training_context

CHECKPOINT_FILE = "model.pt"
# the per-epoch record of `TrainingResult.history` and history.json: JSON values by name
Epoch = dict[str, Union[int, float, bool]]
# `model.pt`: the best epoch's weights, the SASRecConfig's fields, that epoch and its valid NDCG@10
BestState = TypedDict("BestState", {"model": dict[str, torch.Tensor], "sasrec": dict[str, Union[int, float, bool]],
                                    "epoch": int, "valid_ndcg@10": float})


class Checkpoint(TypedDict):
    """What rank 0 reports every `checkpoint_every` epochs: a restarted group resumes from it."""

    model: dict[str, torch.Tensor]
    optim: dict[str, list[Any]]  # `RetrieverOptimizer.state_dict`
    epoch: int
    best: float
    best_epoch: int
    since_best: int
    best_state: Optional[BestState]
    history: list[Epoch]
EPOCH_LINE_EVERY = 5.0  # seconds between two epochs' progress lines


def peak_memory_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """One (variant, seed) training, everything its loop reads: one field per knob, so each
    setting travels from `RetrieverConfig` to where it acts under its own name."""

    name: str
    seed: int
    model: SASRecConfig
    sequences: Any  # the histories' arrays (`read_sequences`), or an object-store reference to them
    item_counts: np.ndarray  # training occurrences per item: the sampled softmax's negatives
    item_init: Optional[np.ndarray]
    user_init: Optional[np.ndarray]
    train_stride: int
    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    loss: str
    negatives: int
    sampler: str
    mask_history: bool
    eval_batch_size: int
    checkpoint_every: int
    trainer: str
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    resources: dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources per worker
    log: bool = True
    model_out: str = ""  # set by `fit`: where rank 0 saves the best state
    train_rows: int = 0  # set by `fit` for the Ray trainer: the rows in the dataset the workers split

    @classmethod
    def from_config(cls, rc: RetrieverConfig, *, name: str, seed: int, num_users: int, sequences: dict[str, np.ndarray],
                    item_init: Optional[np.ndarray], user_init: Optional[np.ndarray]) -> TrainingJob:
        """The job of one variant (`num_users`: 0 without a user token) on `sequences`."""
        num_items = int(sequences["num_items"])
        model = SASRecConfig(num_items=num_items, num_users=num_users, dim=rc.dim, max_len=rc.max_len,
                             layers=rc.layers, heads=rc.heads, ffn_mult=rc.ffn_mult, dropout=rc.dropout,
                             sparse_users=rc.sparse_user_updates)
        return cls(name=name, seed=seed, model=model, sequences=sequences,
                   item_counts=np.bincount(sequences["train_items"], minlength=num_items),
                   item_init=item_init, user_init=user_init, train_stride=rc.train_stride, lr=rc.lr,
                   weight_decay=rc.weight_decay, batch_size=rc.batch_size, max_epochs=rc.max_epochs,
                   patience=rc.patience, loss=rc.loss, negatives=rc.negatives, sampler=rc.sampler,
                   mask_history=rc.mask_history, eval_batch_size=rc.eval_batch_size,
                   checkpoint_every=rc.checkpoint_every, trainer=rc.trainer, num_workers=rc.num_workers,
                   cpus_per_worker=rc.cpus_per_worker, gpus_per_worker=rc.gpus_per_worker,
                   max_failures=rc.max_failures, resources=dict(rc.resources))

    @property
    def local(self) -> bool:
        return self.trainer == "local"

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


@dataclasses.dataclass(frozen=True)
class TrainingResult:
    """What a training loop returns (the same on every rank)."""

    history: list[Epoch]
    best_epoch: int
    best_valid_ndcg: float  # valid NDCG@10 of the best epoch
    world_size: int
    seconds: float
    resumed_after_epoch: Optional[int]  # the checkpoint's epoch a restarted group went on from; None: not restarted


def _valid_sums(model: SASRec, queries: dict[str, np.ndarray], rank: int, world: int, job: TrainingJob,
                device: torch.device) -> torch.Tensor:
    """(hit@10 sum, ndcg@10 sum, users) over this worker's slice of the valid users."""
    rows = np.arange(len(queries["users"]))[rank::world]
    out = score_queries(model, queries, rows, job.mask_history, top_m=1,
                        batch_size=job.eval_batch_size, device=device)
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

    def state_dict(self) -> dict[str, list[Any]]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
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


def train_loop(job: TrainingJob) -> TrainingResult:
    """One worker's training. Returns (on every rank) the per-epoch history and the best epoch."""
    ctx = training_context(job.local, job.use_gpu, CHECKPOINT_FILE)
    rank, world, device = ctx.world_rank, ctx.world_size, ctx.device
    seed = job.seed
    # One intra-op thread per CPU the worker was given: a small model gains nothing from more, and
    # oversubscribed threads on a busy machine stall every tiny op.
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    # Same seed on every worker for the initial weights (DDP also broadcasts rank 0's), then a
    # per-rank stream for dropout and negative sampling.
    torch.manual_seed(seed)
    cfg = job.model
    to_tensor = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    model = SASRec(cfg, to_tensor(job.item_init), to_tensor(job.user_init)).to(device)
    torch.manual_seed(seed * 1009 + rank + 1)
    generator = torch.Generator().manual_seed(seed * 7919 + rank)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optim = RetrieverOptimizer(model, job.lr, job.weight_decay)
    sampled = SampledSoftmax(job.item_counts, job.negatives, job.sampler) if job.loss == "sampled" else None

    seqs = Sequences.from_arrays(from_object_store(job.sequences))
    queries = eval_queries(seqs, "valid", cfg.max_len)
    per_worker = max(1, math.ceil(job.batch_size / world))
    if job.local:
        windows = training_rows(seqs, cfg.max_len, user_token=cfg.user_token, stride=job.train_stride)
        rows = len(windows["users"])
        batches = lambda epoch: shuffled_batches(  # noqa: E731
            windows, per_worker, np.random.default_rng(seed * 100_003 + epoch), device)
    else:  # equal shards (Ray Train's split): the same number of steps on every worker
        shard, rows = ctx.dataset_shard("train"), job.train_rows
        batches = lambda epoch: epoch_batches(shard, per_worker, seed, epoch, rank, device)  # noqa: E731
    del seqs
    if rank == 0 and job.log:
        worker_log(f"[retriever {job.name} seed {job.seed}] {rows:,} training rows per epoch")
    use_users = cfg.user_token

    history: list[Epoch] = []
    best, best_epoch, since_best, first_epoch = -1.0, -1, 0, 0
    best_state: Optional[BestState] = None
    resumed = ctx.resume_state()
    if resumed is not None:  # a worker died: carry on from the last checkpoint, on every rank
        model.load_state_dict(resumed["model"])
        optim.load_state_dict(resumed["optim"])
        best, best_epoch, since_best = resumed["best"], resumed["best_epoch"], resumed["since_best"]
        best_state, history, first_epoch = resumed["best_state"], resumed["history"], resumed["epoch"] + 1
        if rank == 0:
            worker_log(f"[retriever {job.name}] resuming after epoch {resumed['epoch']} from its checkpoint")
    started = time.perf_counter() - (history[-1]["elapsed"] if history else 0.0)
    last_line = -float("inf")
    for epoch in range(first_epoch, job.max_epochs):
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
            best_state = {"model": copy.deepcopy(model.state_dict()), "sasrec": dataclasses.asdict(cfg), "epoch": epoch,
                          "valid_ndcg@10": ndcg}
        stop = since_best >= job.patience or epoch == job.max_epochs - 1
        # Every rank takes the same decision (the metrics were all-reduced), as report() is collective.
        # Not every epoch: a Ray Train report blocks until the controller polls it.
        if stop or (epoch + 1) % job.checkpoint_every == 0:
            state: Optional[Checkpoint] = None
            if rank == 0:
                state = {"model": model.state_dict(), "optim": optim.state_dict(), "epoch": epoch, "best": best,
                         "best_epoch": best_epoch, "since_best": since_best, "best_state": best_state,
                         "history": history}
            ctx.report({k: v for k, v in record.items() if k not in ("improved", "resumed")}, state)
        # an epoch's line at most every few seconds (an in-process epoch on a small sample is a
        # fraction of a second), and always the last one
        if job.log and rank == 0 and (stop or time.perf_counter() - last_line >= EPOCH_LINE_EVERY):
            last_line = time.perf_counter()
            mark = " *" if improved else ""
            worker_log(f"[retriever {job.name} seed {job.seed}] epoch {epoch:3d} "
                       f"loss {record['loss']:.4f} "
                       f"valid ndcg@10 {ndcg:.4f} hit@10 {hit:.4f} ({train_seconds:.1f}+{eval_seconds:.1f} s){mark}")
        if stop:
            break
    if rank == 0:  # the trained model goes where the stage publishes it, not back through the driver
        save_model(best_state, job.model_out)
    return TrainingResult(history=history, best_epoch=best_epoch, best_valid_ndcg=best, world_size=world,
                          seconds=time.perf_counter() - started,
                          resumed_after_epoch=None if resumed is None else resumed["epoch"])


def save_model(state: Optional[BestState], path: str) -> None:
    """`model.pt` ({"model": state dict, "sasrec": config fields, "epoch", "valid_ndcg@10"}), on disk
    or on a store: what the evaluation actors and `load_retriever` load."""
    with as_path(path).open("wb") as out:
        torch.save(state, out)


def fit(job: TrainingJob, histories: Histories, storage: Path, model_out: Path) -> TrainingResult:
    """Train with the job's trainer on the rows `job.train_stride` cuts from `histories`: in process
    the loop cuts them, for the Ray trainer they are the histories' Ray Dataset of that layout. The
    best epoch's model is saved at `model_out` (by the worker of rank 0: the driver never holds the
    weights); returns the loop's result."""
    job = dataclasses.replace(job, model_out=location(model_out))
    datasets = None
    if not job.local:
        ensure_ray()
        train_rows = histories.training_rows(job.model.max_len, job.model.user_token, job.train_stride)
        job = dataclasses.replace(job, sequences=histories.for_ray_workers(), train_rows=train_rows.count())
        datasets = {"train": train_rows}
    return fit_loop(train_loop, job, local=job.local, name="train", storage=location(storage), datasets=datasets,
                    num_workers=job.num_workers, cpus_per_worker=job.cpus_per_worker,
                    gpus_per_worker=job.gpus_per_worker, max_failures=job.max_failures,
                    resources=job.resources).return_value
