"""`cotrec plan --users N --config PRESET --run-dir RUN`: worker-hours per stage for N users.

A team sizes its cluster before it submits: the work per user is measured in a finished run (any
size: the demo will do), the throughput of one worker in `cotrec bench models`, and the plan
multiplies out. Per stage:

  items, preferences,   LLM prompt and generated tokens per item / per user, summed from the run's
  perceptions           extraction shards; seconds = prompt tokens / prefill rate + generated
                        tokens / decode rate of one engine
  embed                 texts encoded per user (preference horizons) and per item (caption,
                        description), from the run's embed/*/meta.json
  retriever training    windows per user (the run's histories cut as the target config cuts them)
                        x the run's mean epochs x grid rows x seeds; the full softmax's cost per
                        window is linear in the catalogue, interpolated between the bench's two
  retriever evaluation  a valid query per user per epoch, and the final valid and test queries
  ranker fine-tune      examples per user x epochs, at the run's examples/s per Train worker
  ranker scoring        lists scored per user (evaluation and the MAPB probe), at the run's lists/s

A measured rate is used only for a stage placed as it was measured: a part the bench ran on a GPU
(its JSON says "device": "cuda") for a stage the target config puts on a GPU, a CPU-measured part
for a CPU stage. A GPU stage with no GPU-measured part takes a PARAMETER (GPU_PARAMETERS, or
`--throughput key=value`); a CPU stage with only a GPU-measured part is an error. Every row names its
source. Wall hours assume the config's worker count with perfect scaling: a lower bound.

When the config fine-tunes a ranker, the plan also prints the memory one fine-tune worker and the
merge need, per GPU and per host, from the base model's parameter count (`cotrec/ranker/memory.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypedDict

import numpy as np

from cotrec.config import Config, parse_ranker
from cotrec.errors import CotrecError, DataError
from cotrec.rundir import RunDir, read_stats, read_table, write_json
from cotrec.storage import as_path

if TYPE_CHECKING:  # torch and the ranker load only where a plan needs them
    from cotrec.bench.common import Machine
    from cotrec.bench.models import ModelsReport, Where
    from cotrec.ranker.memory import FinetuneMemory, MergeMemory

# One worker's throughput on one data-centre GPU (H100 class) for the gpu-cluster preset's models:
# assumptions of the right order, not measurements. Used only where the models JSON has no part
# measured on a GPU: `bench models` on a GPU replaces the encoder and SASRec rows, and the LLM's
# once its llm part runs there (CUDA vLLM); the ranker's rows come from the run, read for CPUs only.
GPU_PARAMETERS = {
    "llm.prompt_tokens_per_s": 20_000.0,       # 7B bf16 through vLLM, prefill at large batch
    "llm.generated_tokens_per_s": 2_500.0,     # the same engine decoding a few hundred sequences
    "encoder.texts_per_s": 5_000.0,            # a MiniLM-size sentence encoder
    "sasrec.train_windows_per_s": 20_000.0,    # a 2-layer, 64-wide SASRec, full softmax, 20k items
    "sasrec.eval_queries_per_s": 50_000.0,
    "ranker.finetune_examples_per_s": 2.0,     # LoRA on a 7B model, ~500-token lists
    "ranker.scoring_lists_per_s": 40.0,        # prefill-bound: ~500 tokens per list
}
THROUGHPUT_KEYS = tuple(GPU_PARAMETERS)


def parse_throughput(pairs: list[str]) -> dict[str, float]:
    """`--throughput key=value` overrides; a key outside THROUGHPUT_KEYS is a one-line error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in GPU_PARAMETERS:
            raise CotrecError(f"--throughput {pair!r}: expected KEY=VALUE with KEY one of {', '.join(THROUGHPUT_KEYS)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise CotrecError(f"--throughput {pair!r}: {value!r} is not a number") from None
        if out[key] <= 0:
            raise CotrecError(f"--throughput {pair!r}: must be positive")
    return out


class PlanRow(TypedDict):
    """One stage's work at the planned size: per user (or item), in all, at one worker's rate."""

    stage: str
    work: str
    per: str
    per_unit: float
    total: float
    rate_per_worker: float
    rate_unit: str
    source: str
    worker_hours: float
    workers: int
    wall_hours: float


class PlanCheck(TypedDict):
    """The plan at the run's own size beside the wall time the run recorded for one stage."""

    stage: str
    planned_s: float
    run_s: float
    run_over_planned: Optional[float]


class MeasuredIn(TypedDict):
    """Where the plan's work per user and its rates were measured."""

    run: str
    users: int
    items: int
    models: str
    models_machine: Machine


class MemorySettings(TypedDict):
    """The ranker settings the memory estimate depends on."""

    zero_stage: int
    num_workers: int
    gradient_checkpointing: bool
    micro_batch: int
    merged_dtype: str


class RankerMemory(TypedDict, total=False):
    """`ranker_memory`: what a fine-tune worker and the merge hold, or why the model's size is unknown."""

    model: str
    unknown: str
    parameters: int
    source: str
    precision: str
    settings: MemorySettings
    finetune: FinetuneMemory
    merge: MergeMemory


class Plan(TypedDict):
    """`plan`'s result (and `--out`'s JSON)."""

    plan: str
    users: int
    items: int
    measured_in: MeasuredIn
    rows: list[PlanRow]
    worker_hours: float
    wall_hours: float
    check: list[PlanCheck]
    memory: Optional[RankerMemory]


def read_models(path: Path) -> ModelsReport:
    if not path.is_file():
        raise CotrecError(f"--models {path}: no such file; run `cotrec bench models --out {path}` first")
    try:
        models = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CotrecError(f"--models {path}: not JSON ({exc})") from None
    if models.get("bench") != "models":
        raise CotrecError(f"--models {path}: not a `cotrec bench models` output")
    return models


def measured_on_gpu(part: Optional[Where]) -> bool:
    """Whether a bench part ran on a GPU (older JSONs, all CPU-measured, name no such device)."""
    return bool(part) and str(part.get("device", "cpu")).startswith("cuda")


class Throughputs:
    """One worker's rates for the target config: measured where the bench ran the part on the same
    kind of device as the config places the stage, else (GPU stages) parameters."""

    def __init__(self, config: Config, models: ModelsReport, models_path: Path, overrides: dict[str, float]):
        self.config, self.models, self.path, self.overrides = config, models, models_path, overrides

    def _pick(self, key: str, on_gpu: bool, measured: Optional[float], what: str,
              part: Optional[Where] = None) -> tuple[float, str]:
        """`part`: the bench's JSON for `measured`, whose device must match the stage's (None: the
        run's own figure, measured where the run placed it)."""
        if key in self.overrides:
            return self.overrides[key], "given (--throughput)"
        gpu_figure = measured_on_gpu(part)
        if on_gpu:
            if measured is not None and gpu_figure:
                return measured, f"measured ({what}, {part.get('gpu') or 'GPU'})"
            return GPU_PARAMETERS[key], "parameter (GPU, not measured)"
        if measured is not None and gpu_figure:
            raise CotrecError(f"--models {self.path}: its {what} ran on a GPU ({part.get('gpu') or 'cuda'}) and the "
                              f"config runs the stage on CPUs; place the stage on a GPU, bench a CPU worker "
                              f"(`cotrec bench models --parts {what.split()[0]}`) or pass --throughput {key}=VALUE")
        if measured is None:
            raise CotrecError(f"--models {self.path}: has no {what}; run `cotrec bench models --parts "
                              f"{what.split()[0]}` or pass --throughput {key}=VALUE")
        return measured, f"measured ({what})"

    def llm(self) -> tuple[float, float, str]:
        on_gpu = self.config.llm.device == "cuda"
        part = self.models.get("llm")
        prompt, source = self._pick("llm.prompt_tokens_per_s", on_gpu, part and part["prompt_tokens_per_s"],
                                    "llm bench", part)
        generated, _ = self._pick("llm.generated_tokens_per_s", on_gpu, part and part["generated_tokens_per_s"],
                                  "llm bench", part)
        if source.startswith("measured") and part["model"] != self.config.llm.model:
            source += f"; measured with {part['model']}, the config names {self.config.llm.model}"
        return prompt, generated, source

    def encoder(self) -> tuple[float, str]:
        part = self.models.get("encoder")
        rate, source = self._pick("encoder.texts_per_s", self.config.embed.device.startswith("cuda"),
                                  part and part["texts_per_s"], "encoder bench", part)
        if source.startswith("measured") and part["model"] != self.config.embed.model:
            source += f"; measured with {part['model']}, the config names {self.config.embed.model}"
        return rate, source

    def sasrec(self, key: str, items: int) -> tuple[float, str]:
        """Linear in items: seconds per window (query) = a + b * items through the bench's two catalogues."""
        part = self.models.get("sasrec")
        measured = None
        if part:
            field = key.split(".", 1)[1]
            (x0, y0), (x1, y1) = [(c["items"], 1.0 / c[field]) for c in part["catalogues"][:2]]
            if y1 < y0:  # a larger catalogue never costs less: a measured drop is noise, so take the slower figure
                seconds = y0
            else:
                seconds = y0 + (y1 - y0) * (items - x0) / (x1 - x0)
            measured = 1.0 / max(seconds, min(y0, y1) * 0.5)
        return self._pick(key, self.config.retriever.gpus_per_worker > 0, measured, "sasrec bench", part)

    def from_run(self, key: str, on_gpu: bool, measured: Optional[float], what: str) -> tuple[float, str]:
        if key in self.overrides or on_gpu or measured is not None:
            return self._pick(key, on_gpu, measured, what)
        raise CotrecError(f"the run has no {what}: finish that stage once, or pass --throughput {key}=VALUE")


def _row(stage: str, work: str, each: float, total: float, rate: float, unit: str, source: str,
         workers: int, per: str = "user") -> PlanRow:
    worker_hours = total / rate / 3600.0
    return PlanRow(stage=stage, work=work, per=per, per_unit=each, total=total, rate_per_worker=rate, rate_unit=unit,
                   source=source, worker_hours=worker_hours, workers=workers, wall_hours=worker_hours / workers)


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    path = as_path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _llm_rows(config: Config, run: RunDir, users: int, items: int, run_users: int, run_items: int,
              rates: Throughputs) -> list[PlanRow]:
    from cotrec.report import extraction_usage

    usage = extraction_usage(run)
    if config.llm.backend == "zero-latency":
        return []
    prompt_rate, generated_rate, source = rates.llm()
    rows = []
    for stage, per in (("items", "item"), ("preferences", "user"), ("perceptions", "user")):
        if stage not in usage:
            continue
        count, run_count = (items, run_items) if per == "item" else (users, run_users)
        prompt, generated = usage[stage]["prompt_tokens"] / run_count, usage[stage]["completion_tokens"] / run_count
        seconds_each = prompt / prompt_rate + generated / generated_rate
        row = _row(stage, f"LLM tokens per {per} ({prompt:,.0f} prompt + {generated:,.0f} generated)",
                   prompt + generated, (prompt + generated) * count, (prompt + generated) / seconds_each,
                   "tokens/s", source, config.extract.max_actors, per)
        rows.append(row)
    return rows


def _embed_row(config: Config, run: RunDir, users: int, items: int, run_users: int, run_items: int,
               rates: Throughputs) -> list[PlanRow]:
    per_user = per_item = 0.0
    for kind in ("caption", "description", "preference"):
        meta = _read_json(run / "embed" / kind / "meta.json")
        if meta is None:
            continue
        if kind == "preference":
            per_user += meta["rows"] / run_users
        else:
            per_item += meta["rows"] / run_items
    if not per_user and not per_item:
        return []
    rate, source = rates.encoder()
    total = per_user * users + per_item * items
    return [_row("embed", f"texts encoded ({per_user:.1f} per user, {per_item:.1f} per item)", total / users, total,
                 rate, "texts/s", source, config.embed.max_actors)]


def _retriever_rows(config: Config, run: RunDir, users: int, items: int, run_users: int,
                    rates: Throughputs) -> list[PlanRow]:
    from cotrec.retriever.data import Sequences, training_rows
    from cotrec.retriever.stage import dense_user_table_too_large, full_softmax_too_wide
    from cotrec.retriever.variants import parse_variant, variant_dir

    rc = config.retriever
    seqs = Sequences.from_interactions(read_table(run, "interactions"), num_items=len(read_table(run, "items")))
    windows = len(training_rows(seqs, rc.max_len, user_token=True, stride=rc.train_stride)["users"]) / run_users
    epochs = []
    for name in rc.grid:
        user, item = parse_variant(name)
        for seed in range(config.seed, config.seed + rc.grid_seeds):
            metrics = _read_json(run / variant_dir(config, user, item, seed) / "metrics.json")
            if metrics is not None:
                epochs.append(metrics["epochs"])
    mean_epochs, epochs_source = ((float(np.mean(epochs)), f"the run's mean over {len(epochs)} trained variant(s)")
                                  if epochs else (float(rc.max_epochs), "retriever.max_epochs: none trained in the run"))
    trainings = len(rc.grid) * rc.grid_seeds
    train_rate, train_source = rates.sasrec("sasrec.train_windows_per_s", items)
    eval_rate, eval_source = rates.sasrec("sasrec.eval_queries_per_s", items)
    advice = (f"; {items:,} items is past retriever.sampled_above_items: loss=sampled would make a window's "
              f"cost independent of the catalogue" if full_softmax_too_wide(rc, items) else "")
    if any(dense_user_table_too_large(rc, parse_variant(name)[0], users) for name in rc.grid):
        advice += (f"; {users:,} users: sparse_user_updates=true would make a step's cost independent of the "
                   f"user table (these rates were measured on small tables)")
    per_user_train = windows * mean_epochs * trainings
    per_user_eval = (mean_epochs + 2) * trainings
    return [
        _row("retriever training", f"windows ({windows:.1f} per user x {mean_epochs:.1f} epochs ({epochs_source}) "
             f"x {trainings} trainings){advice}", per_user_train, per_user_train * users, train_rate, "windows/s",
             train_source, rc.num_workers),
        _row("retriever evaluation", f"queries ({mean_epochs:.1f} valid epochs + valid + test) x {trainings} trainings",
             per_user_eval, per_user_eval * users, eval_rate, "queries/s", eval_source, rc.num_workers),
    ]


def _ranker_rows(config: Config, run: RunDir, users: int, run_users: int, rates: Throughputs) -> list[PlanRow]:
    from cotrec.ranker.stage import ranker_folder

    rk = config.ranker
    on_gpu = rk.gpus_per_worker > 0
    examples_per_user, finetune_rates, lists_per_user, scoring_rates = 0.0, [], 0.0, []
    for variant in dict.fromkeys(rk.retrievers.values()):
        for ranker in rk.grid:
            prompt, fine_tuned = parse_ranker(ranker)
            if prompt in ("none", "random", "position"):
                continue
            if fine_tuned:
                train = _read_json(run / ranker_folder(variant, prompt) / "model" / "train.json")
                if train is not None:
                    examples_per_user += train["examples_per_epoch"] / run_users * rk.epochs
                    finetune_rates.append(train["examples_per_s"] / max(1, train.get("num_workers", 1)))
            scored = _read_json(run / ranker_folder(variant, ranker) / "eval" / "metrics.json")
            if scored is not None:
                lists_per_user += scored["lists_per_second"] * scored["seconds"] / run_users
                scoring_rates.append(scored["lists_per_second"] / max(1, scored.get("scoring_actors", 1)))
    rows = []
    if examples_per_user:
        rate, source = rates.from_run("ranker.finetune_examples_per_s", on_gpu,
                                      float(np.mean(finetune_rates)) if finetune_rates else None,
                                      "fine-tune examples/s (its train.json)")
        rows.append(_row("ranker fine-tune", f"examples x {rk.epochs} epochs, every fine-tuned ranker",
                         examples_per_user, examples_per_user * users, rate, "examples/s", source, rk.num_workers))
    if lists_per_user:
        rate, source = rates.from_run("ranker.scoring_lists_per_s", config.extract.gpus_per_actor > 0,
                                      float(np.mean(scoring_rates)) if scoring_rates else None,
                                      "scoring lists/s (its eval/metrics.json)")
        rows.append(_row("ranker scoring", "lists scored (evaluation and MAPB probe), every LLM ranker",
                         lists_per_user, lists_per_user * users, rate, "lists/s", source, config.extract.max_actors))
    return rows


def plan(config: Config, run: RunDir, users: int, items: Optional[int], models_path: Path,
         overrides: dict[str, float]) -> Plan:
    """Worker-hours per stage of `config`'s main job for `users` users (and `items` items: by
    default the run's catalogue), from the work per user measured in `run`."""
    if users < 1 or (items is not None and items < 1):
        raise CotrecError("--users and --items must be positive")
    stats = read_stats(run)
    run_users, run_items = int(stats["users"]), int(stats["items"])
    items = run_items if items is None else items
    rates = Throughputs(config, read_models(models_path), models_path, overrides)
    if not (run.root / "extract").is_dir():
        raise DataError(f"{run.root}: no extract/; the plan reads the work per user from a run that has "
                        f"finished its stages (`cotrec run`)")
    rows = _rows(config, run, users, items, run_users, run_items, rates)
    return Plan(plan=config.name, users=users, items=items,
                measured_in=MeasuredIn(run=str(run.root), users=run_users, items=run_items, models=str(models_path),
                                       models_machine=rates.models.get("machine", {})),
                rows=rows, worker_hours=sum(r["worker_hours"] for r in rows),
                wall_hours=sum(r["wall_hours"] for r in rows),
                check=_check_against_the_run(run, rates, run_users, run_items), memory=ranker_memory(config))


def ranker_memory(config: Config) -> Optional[RankerMemory]:
    """Per GPU and per host, what a fine-tune worker and the merge hold (None: nothing is fine-tuned)."""
    from cotrec.ranker.finetune import resolve_precision
    from cotrec.ranker.memory import finetune_memory, merge_memory, model_shape

    rk = config.ranker
    if not any(parse_ranker(name)[1] for name in rk.grid):
        return None
    shape = model_shape(config.llm.model)
    if shape is None:
        return {"model": config.llm.model, "unknown": "its size: no config.json on this machine and none in its name "
                                                      "(`cotrec model prepare` fetches it)"}
    precision = resolve_precision(rk.precision, rk.gpus_per_worker > 0)
    return {"model": config.llm.model, "parameters": shape.parameters, "source": shape.source, "precision": precision,
            "settings": rk.model_dump(include={"zero_stage", "num_workers", "gradient_checkpointing", "micro_batch",
                                               "merged_dtype"}),
            "finetune": finetune_memory(shape, rk, config.llm.max_model_len, precision),
            "merge": merge_memory(shape, rk.merged_dtype, rk.gpus_per_worker > 0)}


def format_memory(memory: RankerMemory) -> str:
    if "unknown" in memory:
        return f"memory: {memory['model']}: unknown, {memory['unknown']}"

    def gib(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value / 1024 ** 3:,.1f} GiB"

    ft, merge, rk = memory["finetune"], memory["merge"], memory["settings"]
    activations = ("activations unknown (no config.json: the size is from the name)" if ft["activation_bytes"] is None
                   else f"{gib(ft['activation_bytes'])} activations")
    return (f"memory: {memory['model']}, {memory['parameters'] / 1e9:,.2f}B parameters (from {memory['source']})\n"
            f"  ranker fine-tune, per worker ({memory['precision']}, ZeRO-{rk['zero_stage']} over {rk['num_workers']}, LoRA "
            f"{ft['lora_parameters'] / 1e6:,.1f}M parameters, gradient checkpointing "
            f"{'on' if rk['gradient_checkpointing'] else 'off'}, micro-batch {rk['micro_batch']} x {ft['tokens']:,} tokens): "
            f"{gib(ft['base_bytes'])} weights + {gib(ft['lora_state_bytes'])} LoRA and optimiser + {activations}; "
            f"per GPU {gib(ft['gpu_bytes'])}, host {gib(ft['host_bytes'])}\n"
            f"  merge (float32, saved in {rk['merged_dtype']}): per GPU {gib(merge['gpu_bytes'])}, "
            f"host {gib(merge['host_bytes'])}")


def _rows(config: Config, run: RunDir, users: int, items: int, run_users: int, run_items: int,
          rates: Throughputs) -> list[PlanRow]:
    return (_llm_rows(config, run, users, items, run_users, run_items, rates)
            + _embed_row(config, run, users, items, run_users, run_items, rates)
            + _retriever_rows(config, run, users, items, run_users, rates)
            + _ranker_rows(config, run, users, run_users, rates))


# The main job's stage each plan row belongs to (the rest have the same name).
PIPELINE_STAGE = {"retriever training": "retriever", "retriever evaluation": "retriever",
                  "ranker fine-tune": "ranker", "ranker scoring": "ranker"}


def _check_against_the_run(run: RunDir, rates: Throughputs, run_users: int, run_items: int) -> list[PlanCheck]:
    """The plan at the run's own size and settings beside the wall time the run recorded per stage:
    how far the model is from one real case (engine start-up, prefix caching and idle workers are
    not in it)."""
    from cotrec.config import load_config
    from cotrec.reporting.stages import finished_stage_seconds, stage_records

    recorded = finished_stage_seconds(stage_records(run))
    if not recorded or not (run.root / "config.yaml").is_file():
        return []
    own = Throughputs(load_config(str(run.root / "config.yaml")), rates.models, rates.path, rates.overrides)
    try:
        rows = _rows(own.config, run, run_users, run_items, run_users, run_items, own)
    except CotrecError:
        return []
    planned: dict[str, float] = {}
    for row in rows:
        stage = PIPELINE_STAGE.get(row["stage"], row["stage"])
        planned[stage] = planned.get(stage, 0.0) + row["wall_hours"] * 3600
    return [PlanCheck(stage=stage, planned_s=round(seconds, 1), run_s=recorded[stage],
                      run_over_planned=round(recorded[stage] / seconds, 2) if seconds else None)
            for stage, seconds in planned.items() if stage in recorded]


def write_plan(result: Plan, out: Optional[Path]) -> None:
    if out is not None:
        write_json(out, result)


def format_plan(result: Plan) -> str:
    m = result["measured_in"]
    lines = [f"plan for {result['users']:,} users and {result['items']:,} items ({result['plan']}); "
             f"work per user measured in {m['run']} ({m['users']:,} users), throughput from {m['models']}",
             f"{'stage':<21}{'each':>14}{'total':>16}{'per worker/s':>14}{'worker-h':>11}{'workers':>9}{'wall h':>9}"
             f"  source"]
    for r in result["rows"]:
        lines.append(f"{r['stage']:<21}{r['per_unit']:>9,.1f}/{r['per']:<4}{r['total']:>16,.0f}{r['rate_per_worker']:>14,.1f}"
                     f"{r['worker_hours']:>11,.2f}{r['workers']:>9}{r['wall_hours']:>9,.2f}  {r['source']}")
    lines.append(f"{'total':<21}{'':>14}{'':>16}{'':>14}{result['worker_hours']:>11,.2f}{'':>9}"
                 f"{result['wall_hours']:>9,.2f}  (wall: perfect scaling over the config's workers, a lower bound)")
    lines.append("work: " + "; ".join(f"{r['stage']}: {r['work']}" for r in result["rows"]))
    if result["check"]:
        lines.append(f"check at the run's own size ({m['users']:,} users, its config): " + "; ".join(
            f"{c['stage']} planned {c['planned_s']:,.0f} s, took {c['run_s']:,.0f} s" for c in result["check"]))
    if result.get("memory"):
        lines.append(format_memory(result["memory"]))
    return "\n".join(lines)
