"""Connecting to Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a local one.

`ray.init()` with no address joins any cluster already running on the machine, whoever started
it; a local run must not, so without RAY_ADDRESS we ask for `address="local"` explicitly.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Iterator, Optional


def ensure_ray(**init_kwargs: Any) -> bool:
    """Initialise Ray once per process; returns True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray starts its workers at nice 15, which starves them on a busy machine; the variable is read
    # by the local Ray that ray.init starts below.
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if address == "local":
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs)
    if address == "local" and not kwargs["include_dashboard"]:  # no State API: see quiet_local_session
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env.setdefault("worker_process_setup_hook", "cotrec.cluster.quiet_local_session")
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)
    return True


# Ray Train's placement-group cleaner (a detached actor beside each fit) asks the State API for its
# controller's state every second and warns when it cannot; a local session has no dashboard, so
# no State API, and it would warn on every check for as long as a fit runs.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_session() -> None:
    """Every worker's set-up in a local session (`ensure_ray`): the cleaner's warnings off. Its
    cleaning is not needed there: the placement groups end with the session, which ends with the
    driver."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def in_ray_job() -> bool:
    """Whether this process is a Ray driver (Ray initialised, or a cluster named by RAY_ADDRESS)."""
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def from_object_store(value: Any) -> Any:
    """`value`, or what it refers to when it is an object-store reference (large inputs that several
    Ray workers read are put there once and passed by reference)."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


def map_on_actors(blocks: list[Any], worker: type, constructor_kwargs: dict[str, Any], *, actors: int,
                  cpus: float, gpus: float, in_format: str, out_format: str, min_actors: int = 1,
                  preserve_order: bool = False) -> Iterator[Any]:
    """Map `blocks` through a Ray Data pool of up to `actors` `worker` actors; yields the output
    batches as they come.

    Each block is one batch (`batch_size=None`), so what a row is computed beside never depends on
    the pool's size (and with `preserve_order` neither does the order they come back in); the
    dataset is made in the driver (`from_blocks` keeps the blocks as cut and
    runs no metadata task, which would wait for a free CPU on a busy cluster). An actor that failed
    on the user's input (a model that cannot be loaded) surfaces as that one-line error, not as a
    dead actor. Starts Ray when needed and stops it when done.
    """
    import ray
    from ray.exceptions import RayError

    from cotrec.errors import user_error_in

    started_ray = ensure_ray()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = preserve_order
        dataset = ray.data.from_blocks(blocks).map_batches(
            worker, batch_size=None, batch_format=in_format, fn_constructor_kwargs=constructor_kwargs,
            compute=ray.data.ActorPoolStrategy(min_size=min(min_actors, actors), max_size=actors),
            num_cpus=cpus, num_gpus=gpus)
        yield from dataset.iter_batches(batch_size=None, batch_format=out_format)
    except RayError as exc:
        error = user_error_in(exc)
        if error is None:
            raise
        raise error from None
    finally:
        if started_ray:
            ray.shutdown()


def fit_torch_trainer(loop: Any, loop_config: dict[str, Any], *, name: str, storage: str, num_workers: int,
                      cpus_per_worker: float, gpus_per_worker: float, max_failures: int = 0,
                      datasets: Optional[dict[str, Any]] = None) -> Any:
    """Run `loop` on a Ray Train TorchTrainer (gloo on CPU, nccl on GPU), keeping one checkpoint;
    a worker that dies restarts the group up to `max_failures` times, the loop resuming from the
    last checkpoint it reported. `datasets`: Ray Datasets each worker reads its equal split of
    (`ray.train.get_dataset_shard(name)`), in the datasets' own order.

    Returns Ray Train's result (its `.checkpoint` and `.return_value`); shared by every recipe.
    """
    from ray.data import DataContext
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray()
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    # the driver's Ray Data options (copied: constructing them anew warns of deprecated fields), in
    # order, so a seeded run reads its rows in the same order every time
    ingest = copy.deepcopy(DataContext.get_current().execution_options)
    ingest.preserve_order = True
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets, dataset_config=DataConfig(execution_options=ingest),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    return result
