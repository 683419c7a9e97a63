"""The training harness both trainers use: one loop, in process or on Ray Train, the same code path.

A recipe's per-worker loop (`retriever.train.train_loop`, `ranker.finetune.train_loop`) asks
`training_context` for its context, which says where it runs: its rank and the world's size, its
device, the checkpoint state to resume from (a restarted worker group's last report), and how to
report an epoch's metrics with an optional checkpoint. `Local` is the in-process stand-in (rank 0
of 1, nothing to resume from, reports dropped); `RayTrain` wraps Ray Train's context, report and
get_checkpoint. A checkpoint holds one torch state file (its name is the recipe's: the formats on
disk are the recipes' own), read back with `safeload.load_state`, so a checkpoint folder runs no code.

`fit_loop` is the entry both recipes' `fit` call: in process it runs the loop here (restoring the
driver's torch threads after it), else through `cluster.fit_torch_trainer`; both return a `Fitted`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from cotrec.cluster import fit_torch_trainer
from cotrec.safeload import load_state

if TYPE_CHECKING:
    from ray.data import Dataset

# what a loop reports each epoch (Ray Train keeps it beside the checkpoint): numbers by name
Metrics = dict[str, Optional[float]]


class Local:
    """The single-process stand-in for Ray Train's context, report() and get_checkpoint()."""

    local = True
    world_rank, world_size = 0, 1

    def __init__(self, state_file: str, use_gpu: bool):
        import torch

        self.state_file = state_file
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def report(self, metrics: Metrics, state: Optional[Any] = None) -> None:
        pass

    def report_folder(self, metrics: Metrics, folder: Optional[str]) -> None:
        pass

    def resume_state(self) -> Optional[Any]:
        return None


class RayTrain:
    """A Ray Train worker's context: reports are collective (every rank calls them in the same order),
    a checkpoint comes from the ranks that pass one (rank 0 in both recipes)."""

    local = False

    def __init__(self, state_file: str):
        import ray.train
        import ray.train.torch

        self.train, self.state_file = ray.train, state_file
        context = ray.train.get_context()
        self.world_rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def dataset_shard(self, name: str = "train") -> Any:
        """This worker's equal split of the fit's dataset `name`."""
        return self.train.get_dataset_shard(name)

    def report(self, metrics: Metrics, state: Optional[Any] = None) -> None:
        """The metrics, and `state` (when given) as the checkpoint's state file."""
        if state is None:
            self.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_state(state, folder, self.state_file)
            self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(folder))

    def report_folder(self, metrics: Metrics, folder: Optional[str]) -> None:
        """The metrics, and `folder` (when given) as the checkpoint: for a recipe whose last checkpoint
        holds more than its state file (the ranker's adapter folder)."""
        checkpoint = None if folder is None else self.train.Checkpoint.from_directory(folder)
        self.train.report(metrics, checkpoint=checkpoint)

    def resume_state(self) -> Optional[Any]:
        """The last checkpoint's state of this run, when the worker group was restarted after a failure."""
        checkpoint = self.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_state(Path(folder) / self.state_file)


Context = Any  # `Local` or `RayTrain`


def training_context(local: bool, use_gpu: bool, state_file: str) -> Context:
    """The context of the loop running here: `Local` in process, else this Ray Train worker's."""
    return Local(state_file, use_gpu) if local else RayTrain(state_file)


def save_state(state: Any, folder: str, state_file: str) -> None:
    """`state` as `folder`/`state_file`, the form `RayTrain.resume_state` reads back."""
    import torch

    torch.save(state, Path(folder) / state_file)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What a fit returns: the loop's return value (rank 0's) and, on Ray Train, its last checkpoint."""

    return_value: Any
    checkpoint: Any = None  # None in process: the loop wrote its outputs itself


def fit_loop(loop: Callable[[Any], Any], loop_config: Any, *, local: bool, name: str, storage: str,
             num_workers: int, cpus_per_worker: float, gpus_per_worker: float, max_failures: int = 0,
             datasets: Optional[dict[str, Dataset]] = None, resources: Optional[dict[str, float]] = None) -> Fitted:
    """Run `loop(loop_config)` in process (`local`) or on Ray Train (`cluster.fit_torch_trainer`, with
    the other arguments). In process the loop sets torch's threads to its worker's CPUs, so the
    driver's are put back after it."""
    if local:
        import torch

        threads = torch.get_num_threads()
        try:
            return Fitted(loop(loop_config))
        finally:
            torch.set_num_threads(threads)
    result = fit_torch_trainer(loop, loop_config, name=name, storage=storage, datasets=datasets,
                               num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, max_failures=max_failures, resources=resources)
    return Fitted(result.return_value, result.checkpoint)
