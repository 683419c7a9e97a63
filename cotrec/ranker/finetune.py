"""The fine-tuning recipe: LoRA on the ranking prompts, loss on the answer letter among the M letters.

Read top to bottom:
1. `epoch_examples` and `validation_prompts` (driver): per epoch, the (conversation, answer letter)
   of every training list in a fresh seeded order of examples and of candidates (the letter
   carries no information by itself, the model has to read the items); the held-out lists as the
   evaluation shows them (one prompt each). `batch_shape` sizes workers and micro-batches from the
   examples there are.
2. `train_loop` (each Ray Train worker, or in process), the `FinetuneRecipe`'s phases in order
   (`setup_model`, `setup_data`, `setup_optimiser`, `load_checkpoint`, then per epoch `train_epoch`,
   `validate`, `keep_best`, `save_checkpoint`, and `save`), in the harness's context
   (`cotrec.training`): load the base model, wrap it in a peft LoRA adapter, hand
   it to DeepSpeed (ZeRO stage and precision from the config, a plain torch AdamW as the client
   optimiser so no optimiser op has to be compiled) with a linear warm-up and linear decay of the
   learning rate, and step through this worker's share of each epoch in left-padded micro-batches,
   accumulating gradients up to `ranker.batch_size` examples per optimiser step over all workers.
   The loss is the cross-entropy of the answer over the M letters' logits at the last prompt
   position (`letter_loss`: chance is ln M); only that position's logits are computed. Before the
   first epoch and after each, the workers score their share of the held-out lists (NDCG@10 with
   its standard error, Hit@1; all-reduced); the adapter with the best held-out NDCG@10 is the one
   kept (the base model when no epoch beats it). Position bias (MAPB) is measured once, by the
   evaluation of the kept model. Each epoch ends with a Ray Train checkpoint (the adapter, the
   schedule's position, the curve), from which a restarted worker group resumes.
3. `fit` launches it through the harness (`training.fit_loop`): Ray Train's TorchTrainer (gloo on
   CPU, nccl on GPU), or in-process with `ranker.trainer: local` (the same loop with a plain
   optimiser and no DeepSpeed).
4. `merge_adapter` folds the adapter into a full checkpoint that any backend (vLLM) serves, merged
   in float32 and saved in `ranker.merged_dtype`, from one load of the base on the fine-tune's
   device; on held-out prompts it measures what the saved checkpoint keeps of the adapter's change
   to the letter probabilities (`update_kept` in train.json).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypedDict

import numpy as np

from cotrec.cluster import in_ray_job
from cotrec.config import RankerConfig
from cotrec.llm import letters
from cotrec.llm.base import Conversation, single_token_ids
from cotrec.llm.placement import cpu_has_bf16
from cotrec.metrics import ndcg_gains
from cotrec.progress import worker_log
from cotrec.records import Agreement, EpochRecord, MergeCheck
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import CandidateList, shown_order
from cotrec.ranker.mapb import predicted_ranks
from cotrec.storage import is_remote, local_copy, location, upload
from cotrec.training import fit_loop, save_state, training_context

if TYPE_CHECKING:
    import torch

ADAPTER_STATE = "adapter_state.pt"


def epoch_examples(lists: list[CandidateList], ranker: LetterRanker, epochs: int, seed: int) -> list[list[dict]]:
    """Per epoch, the (conversation, answer) of every list whose target is among its candidates, the
    examples in a seeded order of their own and each list's candidates in a fresh seeded order."""
    out = []
    for epoch in range(epochs):
        examples = []
        for lst in lists:
            if not lst.hit:
                continue
            order = shown_order(lst, seed, epoch=epoch + 1)  # epoch 0's order is the evaluation's
            answer = letters(len(order))[int(np.flatnonzero(order == lst.candidates.index(lst.target))[0])]
            examples.append({"conversation": ranker.conversation(lst, order), "answer": answer})
        permutation = np.random.default_rng([seed, 17, epoch]).permutation(len(examples))
        out.append([examples[i] for i in permutation])
    return out


def validation_prompts(lists: list[CandidateList], ranker: LetterRanker, seed: int) -> list[ValidationPrompt]:
    """Each held-out list as the evaluation shows it (its shown order, one prompt): the conversation,
    and the position its target is shown at."""
    prompts: list[ValidationPrompt] = []
    for lst in lists:
        order = shown_order(lst, seed)
        prompts.append({"conversation": ranker.conversation(lst, order),
                        "shown": int(np.flatnonzero(order == lst.candidates.index(lst.target))[0])})
    return prompts


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto`: bf16 on GPUs and on CPUs that compute it natively, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if use_gpu or cpu_has_bf16() else "fp32"


def learning_rate_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` optimiser steps, then linear decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass(frozen=True)
class BatchShape:
    """How an epoch's examples are cut: workers, examples per forward pass, passes per optimiser step,
    and the whole optimiser steps that fit (the remainder of an epoch is left out)."""

    workers: int
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    note: str = ""  # what was cut down from the config's ask, and why ("": nothing)

    @property
    def per_worker(self) -> int:
        """Examples each worker trains on per epoch."""
        return self.steps_per_epoch * self.micro_batch * self.accumulation


def batch_shape(examples: int, workers: int, micro_batch: int, batch_size: int) -> BatchShape:
    """The shape closest to the config's (`workers`, `micro_batch`, `batch_size` examples per optimiser
    step) that `examples` (>= 1) fill: fewer workers and smaller micro-batches when there are too few
    examples for them, so a small sample trains on what it has instead of failing."""
    world = max(1, min(workers, examples))
    micro = max(1, min(micro_batch, examples // world))
    per_worker = examples // world
    accumulation = max(1, min(math.ceil(batch_size / (micro * world)), per_worker // micro))
    steps = max(1, per_worker // (micro * accumulation))
    note = ""
    if (world, micro) != (workers, micro_batch):
        note = (f"{examples} example(s) an epoch: {world} worker(s) with micro-batches of {micro} instead of "
                f"{workers} with {micro_batch}")
    return BatchShape(world, micro, accumulation, steps, note)


class Example(TypedDict):
    """One training example: the chat messages and the target's letter."""

    conversation: Conversation
    answer: str


class ValidationPrompt(TypedDict):
    """One held-out prompt: the chat messages and the position its target is shown at."""

    conversation: Conversation
    shown: int


class ShapeFields(TypedDict):
    """A `BatchShape` as the loop's config mapping carries it."""

    workers: int
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    note: str


class LoopConfig(TypedDict):
    """What `train_loop` reads: every `FinetuneJob` field (the shape as a mapping), where the adapter
    goes, and whether the loop runs in this process and on a GPU."""

    name: str
    model_path: str
    examples: list[list[Example]]
    validation: list[ValidationPrompt]
    candidates: int
    seed: int
    shape: ShapeFields
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: list[str]
    lr: float
    warmup_ratio: float
    zero_stage: int
    precision: str
    max_tokens: int
    trainer: str
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    gradient_checkpointing: bool
    resources: dict[str, float]
    adapter_out: str
    local: bool
    use_gpu: bool




class LoopResult(TypedDict):
    """What `train_loop` returns (`FinetuneResult.from_loop` reads it)."""

    curve: list[EpochRecord]
    world_size: int
    accumulation: int
    micro_batch: int
    steps_per_epoch: int
    warmup_steps: int
    best_epoch: int
    seconds: float
    precision: str
    resumed_after_epoch: Optional[int]






@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune, everything its workers read: one field per knob, from `RankerConfig` (and the
    stage's lists) to where it acts. `fit` hands the loop `loop_config()`."""

    name: str
    model_path: str  # the base model's local folder
    examples: list[list[Example]]  # per epoch (`epoch_examples`)
    validation: list[ValidationPrompt]  # the held-out lists (`validation_prompts`)
    candidates: int  # letters per list
    seed: int
    shape: BatchShape  # `planned_shape` of the examples
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: list[str]
    lr: float
    warmup_ratio: float
    zero_stage: int
    precision: str  # resolved (`resolve_precision`): bf16 or fp32
    max_tokens: int
    trainer: str
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    gradient_checkpointing: bool
    resources: dict[str, float]  # custom Ray resources per worker

    @classmethod
    def from_config(cls, rcfg: RankerConfig, *, name: str, model_path: str, examples: list[list[Example]],
                    validation: list[ValidationPrompt], candidates: int, seed: int, max_tokens: int) -> FinetuneJob:
        return cls(name=name, model_path=model_path, examples=examples, validation=validation, candidates=candidates,
                   seed=seed, shape=planned_shape(examples, rcfg), lora_r=rcfg.lora_r, lora_alpha=rcfg.lora_alpha,
                   lora_dropout=rcfg.lora_dropout, lora_targets=list(rcfg.lora_targets), lr=rcfg.lr,
                   warmup_ratio=rcfg.warmup_ratio, zero_stage=rcfg.zero_stage,
                   precision=resolve_precision(rcfg.precision, rcfg.gpus_per_worker > 0), max_tokens=max_tokens,
                   trainer=rcfg.trainer, cpus_per_worker=rcfg.cpus_per_worker,
                   gpus_per_worker=rcfg.gpus_per_worker, max_failures=rcfg.max_failures,
                   gradient_checkpointing=rcfg.gradient_checkpointing, resources=dict(rcfg.resources))

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def loop_config(self, adapter_out: str) -> LoopConfig:
        """What `train_loop` reads (Ray Train hands each worker a config mapping)."""
        shape = self.shape
        return LoopConfig(
            name=self.name, model_path=self.model_path, examples=self.examples, validation=self.validation,
            candidates=self.candidates, seed=self.seed,
            shape=ShapeFields(workers=shape.workers, micro_batch=shape.micro_batch, accumulation=shape.accumulation,
                              steps_per_epoch=shape.steps_per_epoch, note=shape.note),
            lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            lora_targets=self.lora_targets, lr=self.lr, warmup_ratio=self.warmup_ratio, zero_stage=self.zero_stage,
            precision=self.precision, max_tokens=self.max_tokens, trainer=self.trainer,
            cpus_per_worker=self.cpus_per_worker, gpus_per_worker=self.gpus_per_worker,
            max_failures=self.max_failures, gradient_checkpointing=self.gradient_checkpointing,
            resources=self.resources, adapter_out=adapter_out, local=self.trainer == "local", use_gpu=self.use_gpu)


@dataclass(frozen=True)
class FinetuneResult:
    """What the fine-tune loop returns: the held-out curve (entry 0: the base model, then one per
    epoch), the best entry, and the shape it trained in."""

    curve: list[EpochRecord]
    best_epoch: int
    world_size: int
    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    warmup_steps: int
    precision: str
    seconds: float
    resumed_after_epoch: Optional[int]  # a restarted group's first epoch; None: not restarted

    @classmethod
    def from_loop(cls, returned: LoopResult) -> FinetuneResult:
        return cls(curve=returned["curve"], best_epoch=returned["best_epoch"], world_size=returned["world_size"],
                   micro_batch=returned["micro_batch"], accumulation=returned["accumulation"],
                   steps_per_epoch=returned["steps_per_epoch"], warmup_steps=returned["warmup_steps"],
                   precision=returned["precision"], seconds=returned["seconds"],
                   resumed_after_epoch=returned["resumed_after_epoch"])


def _deepspeed_config(job: LoopConfig, shape: BatchShape) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": shape.micro_batch,
        "gradient_accumulation_steps": shape.accumulation,
        "train_batch_size": shape.micro_batch * shape.accumulation * shape.workers,
        "zero_optimization": {"stage": job["zero_stage"]},
        "bf16": {"enabled": job["precision"] == "bf16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _start_deepspeed_on_cpu() -> None:
    # DeepSpeed's CPU backend compiles a shared-memory all-reduce op on first use, whose bf16
    # kernels need AVX-512 (without it the workers hang). Gloo does the collectives just as well
    # for a LoRA adapter's few MB of gradients, so the op is not built.
    import importlib

    # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm imports it.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class _Batcher:
    """Token ids of prompts, left-padded into micro-batches: every prompt's answer position is last,
    so one position's logits (`logits_to_keep=1`) score the whole batch."""

    def __init__(self, tokenizer: Any, max_tokens: int, device: Any):
        self.tokenizer, self.max_tokens, self.device = tokenizer, max_tokens, device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_tokens:]

    def batch(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            mask[row, width - len(sequence):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}


def _last_logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, logits_to_keep=1).logits[:, -1, :].float()


def _validate(model: Any, prompts: list[list[int]], shown: list[int], letter_ids: list[int], batcher: _Batcher,
              micro_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """This worker's held-out lists, one prompt each: the target's NDCG@10 and whether it ranked
    first (rows: lists), and the letter probabilities of every prompt."""
    import torch

    model.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(prompts), micro_batch):
            logits = _last_logits(model, batcher.batch(prompts[start:start + micro_batch]))
            probs.append(torch.softmax(logits[:, letter_ids], dim=-1).cpu().numpy())
    model.train()
    probs = np.concatenate(probs) if probs else np.zeros((0, len(letter_ids)))
    ranks = np.array([predicted_ranks(p)[j] for p, j in zip(probs, shown)], dtype=np.int64)
    return np.stack([ndcg_gains(ranks, 10), (ranks == 0).astype(np.float64)], axis=1), probs


def letter_loss(logits: Any, letter_ids: list[int], answers: Any) -> Any:
    """Cross-entropy of the answer among the M letters only: what scoring renormalises over, so its
    chance level is ln M (a loss over the whole vocabulary would first spend its steps moving mass
    onto the letters)."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:, letter_ids], answers)


STEP_LINE_EVERY = 60.0  # seconds between two progress lines within an epoch


class AdapterCheckpoint(TypedDict):
    """`adapter_state.pt`: a fine-tune's state after an epoch (`FinetuneRecipe.checkpoint_state`)."""

    adapter: dict[str, torch.Tensor]
    epoch: int
    curve: list[EpochRecord]
    best_key: Optional[float]
    best_adapter: Optional[dict[str, torch.Tensor]]


class FinetuneRecipe:
    """One worker's fine-tune cut into phases, as torchtune's recipes are: `train_loop` calls them in
    order (set up the model, the data, the optimiser; load a checkpoint; per epoch train, validate,
    keep the best adapter, save a checkpoint; save the kept adapter), each reading what the earlier
    ones set. Where it runs (in process or a Ray Train worker) is the harness's context."""

    def __init__(self, job: LoopConfig):
        import torch

        self.job, self.name = job, job.get("name", "")
        self.ctx = training_context(job.get("local", False), job.get("use_gpu", False), ADAPTER_STATE)
        self.local, self.rank, self.world, self.device = (self.ctx.local, self.ctx.world_rank, self.ctx.world_size,
                                                          self.ctx.device)
        self.resumed = self.ctx.resume_state()  # a worker died: carry on after the last finished epoch
        torch.set_num_threads(max(1, int(job["cpus_per_worker"])))
        torch.manual_seed(job["seed"])
        self.started = time.perf_counter()
        self.base_probs: list[np.ndarray] = []  # the base model's letter probabilities on this worker's lists

    def setup_model(self) -> None:
        """The base model in the job's precision wrapped in a LoRA adapter, a resumed run's adapter
        loaded into it here, before an engine partitions its parameters."""
        import torch
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM, AutoTokenizer

        job = self.job
        self.tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
        dtype = torch.bfloat16 if job["precision"] == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=dtype)
        model.config.use_cache = False
        if job.get("gradient_checkpointing"):  # layers recomputed in the backward pass: activations of one at a time
            # non-reentrant: gradients reach the adapter though the frozen embeddings' outputs need none
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"],
                                                 lora_dropout=job["lora_dropout"], target_modules=job["lora_targets"],
                                                 task_type="CAUSAL_LM"))
        if self.resumed is not None:
            set_peft_model_state_dict(model, self.resumed["adapter"])
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def setup_data(self) -> None:
        """Every epoch's examples and this worker's share of the held-out lists as token ids, once, and
        the batch shape the driver sized for this many workers (`batch_shape`)."""
        job = self.job
        self.batcher = _Batcher(self.tokenizer, job["max_tokens"], self.device)
        self.choices = letters(job["candidates"])
        self.letter_ids = single_token_ids(self.tokenizer, self.choices)
        self.epochs = [[(self.batcher.encode(e["conversation"]), self.choices.index(e["answer"])) for e in examples]
                       for examples in job["examples"]]
        mine_val = job["validation"][self.rank::self.world]
        self.val_prompts = [self.batcher.encode(v["conversation"]) for v in mine_val]
        self.val_shown = [v["shown"] for v in mine_val]
        self.shape = BatchShape(**job["shape"])

    def setup_optimiser(self) -> None:
        """A plain torch AdamW over the adapter (no optimiser op to compile) with a linear warm-up and
        decay; in process it steps itself, on Ray Train a DeepSpeed engine drives it (ZeRO stage,
        precision, accumulation and clipping from the config)."""
        import torch

        job, shape = self.job, self.shape
        self.optimiser = torch.optim.AdamW(self.trainable, lr=job["lr"], weight_decay=0.0)
        total_steps = shape.steps_per_epoch * len(self.epochs)
        warmup = self.warmup = max(1, round(job["warmup_ratio"] * total_steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, lambda step: learning_rate_factor(step, total_steps, warmup))
        self.engine = None
        if self.local:
            self.model.to(self.device)
            self.forward = self.model
            return
        if self.device.type == "cpu":
            _start_deepspeed_on_cpu()
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimiser,
                                                    model_parameters=self.trainable, lr_scheduler=self.schedule,
                                                    config=_deepspeed_config(job, shape))
        self.forward = self.engine

    def learn(self, loss: Any, micro_step: int) -> None:
        """One micro-batch's backward pass, and the optimiser step when it ends an accumulation."""
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        import torch

        (loss / self.shape.accumulation).backward()
        if (micro_step + 1) % self.shape.accumulation == 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimiser.step()
            self.schedule.step()
            self.optimiser.zero_grad(set_to_none=True)

    def gathered(self, modifier_rank: Optional[int] = None) -> Any:
        """The adapter's parameters whole on every rank (ZeRO-3 partitions them); a collective."""
        if self.local or self.job["zero_stage"] != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.trainable, modifier_rank=modifier_rank)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter's weights (every rank takes part: a collective under ZeRO-3)."""
        from peft import get_peft_model_state_dict

        with self.gathered():
            return copy.deepcopy(get_peft_model_state_dict(self.model))

    def load_checkpoint(self) -> None:
        """Where training starts: after a restarted group's last checkpoint (its curve, best adapter and
        the schedule's position; the optimiser's moments start afresh), else at epoch 0 with the base
        model scored as the curve's first entry."""
        self.curve: list[EpochRecord] = []
        self.best_key, self.best_adapter, self.first_epoch = None, None, 0
        if self.resumed is not None:
            resumed = self.resumed
            self.curve, self.best_key, self.best_adapter, self.first_epoch = (
                resumed["curve"], resumed["best_key"], resumed["best_adapter"], resumed["epoch"] + 1)
            for _ in range(self.first_epoch * self.shape.steps_per_epoch):
                self.schedule.step()  # the learning rate where the schedule stood
            return
        self.curve.append({**self.validate(0), "loss": None, "examples": 0, "learning_rate": 0.0})  # the base model
        self.best_key = self.curve[0]["val_ndcg@10"]
        if self.rank == 0:
            worker_log(f"[ranker {self.name}] base model: val ndcg@10 {self.best_key:.4f} ± "
                       f"{self.curve[0]['val_ndcg@10_se']:.4f} on {self.curve[0]['val_lists']} held-out lists "
                       f"({self.curve[0]['val_seconds']:.0f} s)")

    def validate(self, epoch: int) -> EpochRecord:
        """The held-out lists scored by the model as it stands, over all workers: NDCG@10 with its
        standard error, Hit@1, and how far the letter probabilities moved from the base model's."""
        import torch

        t0 = time.perf_counter()
        found, probs = _validate(self.forward, self.val_prompts, self.val_shown, self.letter_ids, self.batcher,
                                 self.shape.micro_batch)
        if not self.base_probs:
            self.base_probs.append(probs)
        change = float(np.abs(probs - self.base_probs[0]).sum())
        sums = torch.tensor([found[:, 0].sum(), (found[:, 0] ** 2).sum(), found[:, 1].sum(), float(len(found)),
                             change, float(probs.size)], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        lists = max(float(sums[3]), 1.0)
        mean = float(sums[0] / lists)
        spread = max(float(sums[1] / lists) - mean ** 2, 0.0)
        return {"epoch": epoch, "val_ndcg@10": mean, "val_ndcg@10_se": math.sqrt(spread / max(lists - 1, 1.0)),
                "val_hit@1": float(sums[2] / lists), "val_lists": int(sums[3]),
                "val_seconds": round(time.perf_counter() - t0, 2),
                # how far the adapter has moved the held-out lists' letter probabilities from the base model's
                "val_mean_abs_dp": float(sums[4] / max(float(sums[5]), 1.0))}

    def train_epoch(self, epoch: int) -> EpochRecord:
        """This worker's share of the epoch's examples in micro-batches; the loss and throughput over
        all workers, and the learning rate the epoch ended at."""
        import torch

        t0 = time.perf_counter()
        micro = self.shape.micro_batch
        mine = self.epochs[epoch][self.rank::self.world][:self.shape.per_worker]
        losses = []
        last_line = time.perf_counter()
        for micro_step, start in enumerate(range(0, len(mine), micro)):
            batch = mine[start:start + micro]
            logits = _last_logits(self.forward, self.batcher.batch([ids for ids, _ in batch]))
            loss = letter_loss(logits, self.letter_ids, torch.tensor([a for _, a in batch], device=self.device))
            self.learn(loss, micro_step)
            losses.append(float(loss.detach()))
            if self.rank == 0 and time.perf_counter() - last_line >= STEP_LINE_EVERY:  # an epoch can take an hour on a CPU
                last_line = time.perf_counter()
                done, rate = start + len(batch), (start + len(batch)) / (last_line - t0)
                worker_log(f"[ranker {self.name}] epoch {epoch + 1}: {done}/{len(mine)} of this worker's "
                           f"lists, letter loss so far {np.mean(losses):.4f}, {rate:.2f} lists/s, "
                           f"ETA {(len(mine) - done) / rate:.0f} s")
        train_seconds = time.perf_counter() - t0
        sums = torch.tensor([sum(losses) * micro, float(len(mine))], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        return {"loss": float(sums[0] / sums[1]), "examples": int(sums[1]),
                "optimiser_steps": self.shape.steps_per_epoch, "train_seconds": round(train_seconds, 2),
                "examples_per_s": round(float(sums[1]) / max(train_seconds, 1e-9), 3),
                "learning_rate": float(self.optimiser.param_groups[0]["lr"])}

    def keep_best(self, epoch: int, record: EpochRecord) -> dict[str, torch.Tensor]:
        """The epoch's record onto the curve, its adapter kept when its held-out NDCG@10 beats the best
        so far; returns that adapter (for the epoch's checkpoint)."""
        self.curve.append(record)
        key = record["val_ndcg@10"]
        adapter = self.adapter_state()
        if key > self.best_key:
            self.best_key, self.best_adapter = key, adapter
        if self.rank == 0:
            worker_log(f"[ranker {self.name}] epoch {epoch + 1} letter loss {record['loss']:.4f} (chance "
                       f"{math.log(len(self.choices)):.4f}) val ndcg@10 {record['val_ndcg@10']:.4f} ± "
                       f"{record['val_ndcg@10_se']:.4f} hit@1 {record['val_hit@1']:.3f} "
                       f"({record['examples_per_s']:.2f} examples/s)")
        return adapter

    def checkpoint_state(self, epoch: int, adapter: dict[str, torch.Tensor]) -> AdapterCheckpoint:
        """What a restarted group resumes from after `epoch` (`load_checkpoint`): the adapter, the
        epoch, the curve and the best so far."""
        return {"adapter": adapter, "epoch": epoch, "curve": self.curve,
                "best_key": self.best_key, "best_adapter": self.best_adapter}

    def save_checkpoint(self, epoch: int, adapter: dict[str, torch.Tensor]) -> None:
        """The epoch's checkpoint (`checkpoint_state`); in process there is none."""
        self.ctx.report({"epoch": epoch + 1, "val_ndcg@10": self.curve[-1]["val_ndcg@10"]},
                        self.checkpoint_state(epoch, adapter) if self.rank == 0 else None)

    def best_epoch(self) -> int:
        return max(range(len(self.curve)), key=lambda i: self.curve[i]["val_ndcg@10"])  # the first of equals

    def result(self) -> LoopResult:
        """What the loop returns (`FinetuneResult.from_loop`): the curve, the best entry, the shape."""
        shape = self.shape
        return {"curve": self.curve, "world_size": self.world, "accumulation": shape.accumulation,
                "micro_batch": shape.micro_batch, "steps_per_epoch": shape.steps_per_epoch,
                "warmup_steps": self.warmup, "best_epoch": self.best_epoch(),
                "seconds": time.perf_counter() - self.started, "precision": self.job["precision"],
                "resumed_after_epoch": None if self.resumed is None else self.resumed["epoch"] + 1}

    def save(self) -> None:
        """The kept adapter (the best epoch's, or a zero update when no epoch beat the base model): in
        process into `adapter_out`; on Ray Train into the run's last checkpoint, beside a finished
        state after which a restarted group has nothing left to train, for the driver to take (the
        workers' disks are not its)."""
        from peft import set_peft_model_state_dict

        finished = None if self.local else self.checkpoint_state(len(self.epochs) - 1, self.adapter_state())
        with tempfile.TemporaryDirectory() as folder:
            if finished is not None and self.rank == 0:
                save_state(finished, folder, ADAPTER_STATE)
            with self.gathered(modifier_rank=0):
                if self.rank == 0:
                    if self.best_adapter is not None:
                        set_peft_model_state_dict(self.model, self.best_adapter)
                    else:
                        for name, parameter in self.model.named_parameters():
                            if "lora_B" in name:
                                parameter.data.zero_()
                    self.model.save_pretrained(self.job["adapter_out"] if self.local else folder)
            self.ctx.report_folder({"epoch": len(self.epochs), "best_epoch": self.best_epoch()},
                                   folder if self.rank == 0 else None)


def train_loop(job: LoopConfig) -> LoopResult:
    """One worker's fine-tuning, the recipe's phases in order; returns the curve (rank 0 also saves
    the best adapter)."""
    recipe = FinetuneRecipe(job)
    recipe.setup_model()
    recipe.setup_data()
    recipe.setup_optimiser()
    recipe.load_checkpoint()
    recipe.forward.train()
    for epoch in range(recipe.first_epoch, len(recipe.epochs)):
        trained = recipe.train_epoch(epoch)
        record: EpochRecord = {**recipe.validate(epoch + 1), **trained}
        recipe.save_checkpoint(epoch, recipe.keep_best(epoch, record))
    result = recipe.result()
    recipe.save()
    return result


def planned_shape(examples: list[list[Example]], rcfg: RankerConfig) -> BatchShape:
    """The batch shape of a fine-tune on these epochs' examples (`FinetuneJob.shape`)."""
    return batch_shape(min(len(e) for e in examples), 1 if rcfg.trainer == "local" else rcfg.num_workers,
                       rcfg.micro_batch, rcfg.batch_size)


def fit(job: FinetuneJob, storage: Path, adapter_out: Path) -> FinetuneResult:
    """Fine-tune with the job's trainer, in `job.shape`; the best adapter ends up in `adapter_out`."""
    if is_remote(adapter_out):  # peft writes local folders: the adapter is made here, then uploaded
        with tempfile.TemporaryDirectory(prefix="cotrec-adapter-") as local:
            result = fit(job, storage, Path(local))
            upload(Path(local), adapter_out)
        return result
    loop_config = job.loop_config(str(Path(adapter_out).resolve()))
    fitted = fit_loop(train_loop, loop_config, local=job.trainer == "local", name="finetune",
                      storage=location(storage), num_workers=job.shape.workers, cpus_per_worker=job.cpus_per_worker,
                      gpus_per_worker=job.gpus_per_worker, max_failures=job.max_failures, resources=job.resources)
    if fitted.checkpoint is not None:  # on Ray Train rank 0 saved the adapter into the last checkpoint
        with fitted.checkpoint.as_directory() as folder:
            shutil.copytree(folder, adapter_out, dirs_exist_ok=True)
    return FinetuneResult.from_loop(fitted.return_value)


def merge_and_measure(base_path: str, adapter: Path, out: Path, conversations: list[list[dict[str, str]]],
                      choices: list[str], rcfg: RankerConfig) -> MergeCheck:
    """`merge_adapter` (which also measures what the checkpoint keeps) on the device the fine-tune's
    workers had. In a Ray job it runs in a Ray task with a worker's CPUs, a GPU when they had one,
    and host memory sized from the model (`ranker.memory`), so the driver loads no model and a 7B
    merge lands on a node that holds it; without Ray, here."""
    on_gpu = rcfg.gpus_per_worker > 0

    def merge_there() -> MergeCheck:
        import torch

        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        # transformers and peft read and write local folders: a store's are copied down and up
        local_adapter = local_copy(adapter)
        with tempfile.TemporaryDirectory(prefix="cotrec-merged-") as scratch:
            local_out = Path(scratch) if is_remote(out) else Path(out)
            kept = merge_adapter(base_path, local_adapter, local_out, rcfg.merged_dtype, conversations, choices, device)
            if is_remote(out):
                upload(local_out, out)
        return kept

    if not in_ray_job():
        return merge_there()
    import ray

    from cotrec.ranker.memory import merge_request_bytes

    memory = merge_request_bytes(base_path, rcfg.merged_dtype, on_gpu)
    options = {"num_cpus": rcfg.cpus_per_worker, "num_gpus": min(rcfg.gpus_per_worker, 1.0),
               **({"memory": memory} if memory else {}), **({"resources": rcfg.resources} if rcfg.resources else {})}
    return ray.get(ray.remote(**options)(merge_there).remote())


def merge_adapter(base_path: str, adapter: Path, out: Path, dtype: str, conversations: list[list[dict[str, str]]],
                  choices: list[str], device: str = "cpu") -> MergeCheck:
    """Fold the LoRA adapter into the base weights in float32 and save a plain checkpoint in `dtype`
    that any backend loads (float32 keeps a small adapter's change, which bfloat16's three significant
    digits round much of away). The base is loaded once, on `device`; on held-out prompts it measures
    how much of the adapter's change to the letter probabilities the checkpoint keeps: the change
    itself (adapter vs base), and what is left of it as saved and once rounded to bfloat16 (max |dp|
    against the adapter, same first letter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    batcher = _Batcher(tokenizer, 4096, device)
    ids = single_token_ids(tokenizer, choices)
    inputs = batcher.batch([batcher.encode(c) for c in conversations])

    def probs(model: Any) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(_last_logits(model.eval(), inputs)[:, ids], dim=-1).cpu().numpy()

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32,
                                                                           device_map=device), str(adapter))
    tuned = probs(model)
    with model.disable_adapter():
        base = probs(model)
    merged = model.merge_and_unload()
    saved = probs(merged)  # as saved in float32 (and as a float32 reload of it reads)
    if dtype == "float32":
        merged.save_pretrained(out)
    _cast_parameters(merged, torch.bfloat16)
    rounded = probs(merged)
    if dtype != "float32":
        _cast_parameters(merged, getattr(torch, dtype))
        merged.save_pretrained(out)
        _cast_parameters(merged, torch.float32)
        saved = probs(merged)  # the saved weights, read back in float32
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (Path(base_path) / extra).is_file() and not (Path(out) / extra).exists():
            shutil.copy(Path(base_path) / extra, Path(out) / extra)

    def against(p: np.ndarray) -> Agreement:
        return {"max_abs_dp": round(float(np.abs(p - tuned).max()), 5),
                "same_first": round(float((p.argmax(1) == tuned.argmax(1)).mean()), 3)}

    return {"prompts": len(conversations), "adapter_vs_base": against(base), "merged_saved": against(saved),
            "merged_in_bfloat16": against(rounded)}


def _cast_parameters(model: Any, dtype: Any) -> None:
    """The weights in `dtype`, one tensor at a time (no second copy of the model); buffers such as the
    rotary frequencies stay as they are, as when a checkpoint is loaded in that dtype."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
