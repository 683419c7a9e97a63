"""Connecting to Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a local one.

`ray.init()` with no address joins any cluster already running on the machine, whoever started
it; a local run must not, so without RAY_ADDRESS we ask for `address="local"` explicitly.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator, Optional

from cotrec.errors import CotrecError
from cotrec.progress import RUN_LOG_ENV, run_log, send_output_to_run_log, send_ray_messages_to_run_log


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
        if run_log() is not None:  # the workers' output to the run's log (cotrec.progress)
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), RUN_LOG_ENV: str(run_log())}
            import ray.data  # noqa: F401  (configures its loggers on import: before they are redirected)

            send_ray_messages_to_run_log()
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)
    return True


# Ray Train's placement-group cleaner (a detached actor beside each fit) asks the State API for its
# controller's state every second and warns when it cannot; a local session has no dashboard, so
# no State API, and it would warn on every check for as long as a fit runs.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_session() -> None:
    """Every worker's set-up in a local session (`ensure_ray`): the cleaner's warnings off (its
    cleaning is not needed there: the placement groups end with the session, which ends with the
    driver), and the worker's output to the run's log when the driver names one."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    send_output_to_run_log()


def in_ray_job() -> bool:
    """Whether this process is a Ray driver (Ray initialised, or a cluster named by RAY_ADDRESS)."""
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


SHARED_CHECK = ".cotrec-reach"  # the marker folder under the run directory (removed after the check)


def _write_where_scheduled(root: str, token: str) -> dict[str, Any]:
    """A task's half of `check_run_dir_shared`: read the driver's marker, write its own beside it."""
    import ray

    from cotrec.storage import run_path

    folder = run_path(root) / SHARED_CHECK
    node = ray.get_runtime_context().get_node_id()
    seen = (folder / f"{token}-driver").is_file()
    (folder / f"{token}-worker").write_text(node)
    return {"node": node, "ip": ray.util.get_node_ip_address(), "saw_driver": seen}


def check_run_dir_shared(root: Any) -> None:
    """On a cluster (RAY_ADDRESS set, as `ray job submit` sets it): a task placed where tasks run (the
    launcher's and KubeRay's heads offer no CPU, so a worker node) reads a marker the driver wrote under
    the run directory and writes one back, which the driver reads. A run directory the nodes do not
    share (a node-local folder, a bucket without the workers' credentials) is refused here, in one
    line, instead of when a stage cannot find what its workers wrote."""
    if not os.environ.get("RAY_ADDRESS"):
        return
    import uuid

    import ray
    from ray.exceptions import RayError

    from cotrec.storage import location, remove_tree, run_path

    started_ray = ensure_ray()
    root = run_path(location(root))
    folder, token = root / SHARED_CHECK, uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{token}-driver").write_text(ray.get_runtime_context().get_node_id())
    advice = ("a run directory must be where every node reads and writes it: a volume every node mounts "
              "(cluster/README.md) or a bucket (--run-dir s3://bucket/runs/NAME)")
    try:
        # a sliver of a CPU: placed only on a node that offers CPUs, and never waits behind a stage
        task = ray.remote(num_cpus=0.01, max_retries=0)(_write_where_scheduled)
        try:
            found = ray.get(task.remote(location(root), token))
        except RayError as exc:
            cause = " ".join(str(getattr(exc, "cause", None) or exc).split())[-300:]
            raise CotrecError(f"{root}: a task on a worker node cannot use the run directory ({cause}); {advice}") from None
        here = ray.get_runtime_context().get_node_id()
        if not found["saw_driver"] or not (folder / f"{token}-worker").is_file():
            raise CotrecError(f"{root}: not shared between the nodes: the driver's node ({here[:12]}) and node "
                              f"{found['node'][:12]} ({found['ip']}) do not see each other's marker in "
                              f"{SHARED_CHECK}/; {advice}")
    finally:
        for name in (f"{token}-driver", f"{token}-worker"):
            (folder / name).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            remove_tree(folder)
        if started_ray:  # as found: a command connects again with its own runtime env (Serve's PYTHONPATH)
            ray.shutdown()


def from_object_store(value: Any) -> Any:
    """`value`, or what it refers to when it is an object-store reference (large inputs that several
    Ray workers read are put there once and passed by reference)."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


def map_on_actors(blocks: list[Any], worker: type, constructor_kwargs: dict[str, Any], *, actors: int,
                  cpus: float, gpus: float, in_format: str, out_format: str, min_actors: int = 1,
                  preserve_order: bool = False, resources: Optional[dict[str, float]] = None) -> Iterator[Any]:
    """Map `blocks` through a Ray Data pool of up to `actors` `worker` actors, each with `cpus`, `gpus`
    and the custom `resources`; yields the output batches as they come.

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
            num_cpus=cpus, num_gpus=gpus, resources=resources or None)
        yield from dataset.iter_batches(batch_size=None, batch_format=out_format)
    except RayError as exc:
        error = user_error_in(exc)
        if error is None:
            raise
        raise error from None
    finally:
        if started_ray:
            ray.shutdown()


# What a training loop raised that a restarted worker group would raise again: the user's errors and
# the program's own (a bad value, a missing key). A worker that died, or one whose peer died inside a
# collective (RuntimeError, OSError), is what Ray Train's restart from the last checkpoint is for.
NOT_RETRYABLE = (CotrecError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError,
                 NotImplementedError, AssertionError, ZeroDivisionError)
FAILED_MARKER = "cotrec-loop-failed.json"  # in the fit's storage folder: the first rank's error


class FailingOnce:
    """A training loop whose errors that no restart can fix end the fit without one.

    Ray Train retries every error a worker raises, so such an error is returned instead: the worker
    records it beside the fit's checkpoints (shared by every worker, like them), leaves the process
    group so a peer waiting in a collective fails at once instead of at its timeout, and returns it;
    a peer whose collective then fails finds the record and returns it too. The driver raises it
    (`raise_loop_failure`). Any other error is raised, for Ray Train to restart the group."""

    def __init__(self, loop: Any, marker: str):
        self.loop, self.marker = loop, marker
        self.__name__ = getattr(loop, "__name__", "train_loop")

    def __call__(self, config: Any) -> Any:
        import traceback

        from cotrec.storage import as_path

        marker = as_path(self.marker)
        try:
            return self.loop(config)
        except NOT_RETRYABLE as exc:
            failure = {"user_error": isinstance(exc, CotrecError), "message": str(exc), "type": type(exc).__name__,
                       "traceback": traceback.format_exc()}
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps(failure))
            _leave_process_group()
            return {FAILED_MARKER: failure}
        except (RuntimeError, OSError):
            if marker.exists():  # a peer failed for good and left the group: this is only its echo
                return {FAILED_MARKER: json.loads(marker.read_text())}
            raise


def _leave_process_group() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def raise_loop_failure(value: Any, name: str) -> None:
    """Raise in the driver what `FailingOnce` returned: a user's error as itself (one line), any other
    as a RuntimeError carrying the worker's traceback."""
    failure = value.get(FAILED_MARKER) if isinstance(value, dict) else None
    if failure is None:
        return
    if failure["user_error"]:
        raise CotrecError(failure["message"])
    raise RuntimeError(f"{name}: the training loop raised {failure['type']}, which a restart would raise again "
                       f"(not retried); the worker's traceback:\n{failure['traceback']}")


def fit_torch_trainer(loop: Any, loop_config: Any, *, name: str, storage: str, num_workers: int,
                      cpus_per_worker: float, gpus_per_worker: float, max_failures: int = 0,
                      datasets: Optional[dict[str, Any]] = None, resources: Optional[dict[str, float]] = None) -> Any:
    """Run `loop` on a Ray Train TorchTrainer (gloo on CPU, nccl on GPU), keeping one checkpoint;
    a worker that dies restarts the group up to `max_failures` times, the loop resuming from the
    last checkpoint it reported. An error that a restart would raise again (`NOT_RETRYABLE`) ends the
    fit at once (`FailingOnce`): a user's error reaches the caller as itself, one line. `datasets`:
    Ray Datasets each worker reads its equal split of (`ray.train.get_dataset_shard(name)`), in the
    datasets' own order. `resources`: custom resources each worker asks for besides its CPUs and GPUs.

    Returns Ray Train's result (its `.checkpoint` and `.return_value`); shared by every recipe.
    """
    from ray.data import DataContext
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cotrec.storage import as_path

    ensure_ray()
    use_gpu = gpus_per_worker > 0
    resources = {**(resources or {}), "CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    # the driver's Ray Data options (copied: constructing them anew warns of deprecated fields), in
    # order, so a seeded run reads its rows in the same order every time
    ingest = copy.deepcopy(DataContext.get_current().execution_options)
    ingest.preserve_order = True
    marker = as_path(storage) / name / FAILED_MARKER
    if marker.exists():  # an earlier fit's, in a folder a killed run left behind
        marker.unlink()
    trainer = TorchTrainer(
        FailingOnce(loop, str(marker)), train_loop_config=loop_config, datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    raise_loop_failure(result.return_value, name)
    if marker.exists():  # a rank other than the first failed while the first finished
        raise_loop_failure({FAILED_MARKER: json.loads(marker.read_text())}, name)
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    return result
