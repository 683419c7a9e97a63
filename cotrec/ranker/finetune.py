"""The fine-tuning recipe: LoRA on the ranking prompts, loss on the answer letter only.

Read top to bottom:
1. `training_examples` (driver): one (conversation, answer letter) per training list and epoch.
   Each epoch shows the candidates in a fresh seeded order, so the letter carries no information
   by itself and the model has to read the items.
2. `train_loop` (each Ray Train worker): load the base model, wrap it in a peft LoRA adapter,
   hand it to DeepSpeed (ZeRO stage and precision from the config, a plain torch AdamW as the
   client optimiser so no optimiser op has to be compiled), and step through this worker's share
   of each epoch, one example per micro-step with gradient accumulation up to `ranker.batch_size`
   examples per optimiser step over all workers. The loss is the cross-entropy of the answer
   letter at the last prompt position; only that position's logits are computed
   (`logits_to_keep=1`), which saves the vocabulary projection at every other position.
   Rank 0 saves the adapter and reports it as the run's checkpoint.
3. `fit` launches it with Ray Train's TorchTrainer (gloo on CPU, nccl on GPU), or in-process with
   `ranker.trainer: local` (the same loop with a plain optimiser and no DeepSpeed).
4. `merge_adapter` folds the adapter into a full checkpoint that any backend (vLLM) serves.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cotrec.cluster import fit_torch_trainer
from cotrec.config import RankerConfig
from cotrec.llm import letters
from cotrec.llm.base import single_token_ids
from cotrec.llm.placement import cpu_has_bf16
from cotrec.ranker.letters import LetterRanker
from cotrec.ranker.lists import CandidateList, shown_order

def training_examples(lists: list[CandidateList], ranker: LetterRanker, epochs: int, seed: int) -> list[list[dict]]:
    """Per epoch, the (conversation, answer) of every list whose target is among its candidates."""
    out = []
    for epoch in range(epochs):
        examples = []
        for lst in lists:
            if not lst.hit:
                continue
            order = shown_order(lst, seed, epoch=epoch + 1)  # epoch 0's order is the evaluation's
            answer = letters(len(order))[int(np.flatnonzero(order == lst.candidates.index(lst.target))[0])]
            examples.append({"conversation": ranker.conversation(lst, order), "answer": answer})
        out.append(examples)
    return out


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto`: bf16 on GPUs and on CPUs that compute it natively, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if use_gpu or cpu_has_bf16() else "fp32"


def _deepspeed_config(job: dict[str, Any], accumulation: int, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": accumulation * world,
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


def train_loop(job: dict[str, Any]) -> dict[str, Any]:
    """One worker's fine-tuning; returns the per-epoch history (rank 0 also saves the adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = job.get("local", False)
    if local:
        rank, world = 0, 1
        device = torch.device("cuda" if job["use_gpu"] and torch.cuda.is_available() else "cpu")
    else:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(job["cpus_per_worker"])))
    torch.manual_seed(job["seed"])
    started = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    dtype = torch.bfloat16 if job["precision"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"],
                                             lora_dropout=job["lora_dropout"], target_modules=job["lora_targets"],
                                             task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=job["lr"], weight_decay=0.0)

    # Tokenise once: prompt ids up to the answer position, and the answer letter's id.
    def encode(example: dict[str, Any]) -> tuple[list[int], int]:
        text = tokenizer.apply_chat_template(example["conversation"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-job["max_tokens"]:], single_token_ids(tokenizer, [example["answer"]])[0]

    epochs = [[encode(e) for e in examples] for examples in job["examples"]]
    per_worker = min(len(e) for e in epochs) // world
    if per_worker < 1:
        raise ValueError(f"{min(len(e) for e in epochs)} training examples cannot feed {world} workers")
    accumulation = max(1, min(per_worker, math.ceil(job["batch_size"] / world)))
    per_worker = per_worker // accumulation * accumulation  # whole optimiser steps only

    if local:
        model.to(device)
        forward = model

        def learn(loss: Any, micro_step: int) -> None:
            (loss / accumulation).backward()
            if (micro_step + 1) % accumulation == 0:
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
    else:
        if device.type == "cpu":
            _start_deepspeed_on_cpu()
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimiser, model_parameters=trainable,
                                               config=_deepspeed_config(job, accumulation, world))
        forward = engine

        def learn(loss: Any, micro_step: int) -> None:
            engine.backward(loss)
            engine.step()

    history = []
    for epoch, examples in enumerate(epochs):
        t0 = time.perf_counter()
        forward.train()
        mine = examples[rank::world][:per_worker]
        losses = []
        for micro_step, (ids, answer) in enumerate(mine):
            input_ids = torch.tensor([ids], device=device)
            logits = forward(input_ids=input_ids, logits_to_keep=1).logits[:, -1, :].float()
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([answer], device=device))
            learn(loss, micro_step)
            losses.append(float(loss.detach()))
        sums = torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(sums)
        record = {"epoch": epoch, "loss": float(sums[0] / sums[1]), "first_step_loss": losses[0],
                  "examples": int(sums[1]), "optimiser_steps": per_worker // accumulation,
                  "seconds": time.perf_counter() - t0, "losses": losses}
        history.append(record)
        if rank == 0:
            print(f"[ranker {job.get('name', '')}] epoch {epoch} loss {record['loss']:.4f} "
                  f"({record['examples']} examples, {record['seconds']:.1f} s)", flush=True)

    result = {"history": history, "world_size": world, "accumulation": accumulation,
              "seconds": time.perf_counter() - started, "precision": job["precision"]}
    peft_model = model if local else engine.module
    if local:
        peft_model.save_pretrained(job["adapter_out"])
        return result
    import ray.train

    metrics = {"loss": history[-1]["loss"], "epochs": len(history)}
    with tempfile.TemporaryDirectory() as folder:
        if job["zero_stage"] == 3:  # parameters are partitioned: gather the adapter's on every rank
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if rank == 0:
                    peft_model.save_pretrained(folder)
        elif rank == 0:
            peft_model.save_pretrained(folder)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)
    return result


def fit(job: dict[str, Any], rcfg: RankerConfig, storage: Path, adapter_out: Path) -> dict[str, Any]:
    """Fine-tune with the configured trainer; the adapter ends up in `adapter_out`."""
    use_gpu = rcfg.gpus_per_worker > 0
    job = {**job, "precision": resolve_precision(rcfg.precision, use_gpu), "cpus_per_worker": rcfg.cpus_per_worker}
    if rcfg.trainer == "local":
        import torch

        threads = torch.get_num_threads()
        try:
            return train_loop({**job, "local": True, "use_gpu": use_gpu, "adapter_out": str(adapter_out)})
        finally:
            torch.set_num_threads(threads)

    result = fit_torch_trainer(train_loop, job, name="finetune", storage=str(Path(storage).resolve()),
                               num_workers=rcfg.num_workers, cpus_per_worker=rcfg.cpus_per_worker,
                               gpus_per_worker=rcfg.gpus_per_worker)
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, adapter_out, dirs_exist_ok=True)
    return result.return_value


def merge_adapter(base_path: str, adapter: Path, out: Path, precision: str) -> Path:
    """Fold the LoRA adapter into the base weights: a plain checkpoint any backend loads.

    Merged in fp32 and saved in fp32 when trained in fp32: rounding the merged weights to bf16
    would erase much of a small adapter's change (bf16 keeps ~3 significant digits).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged = merged.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (Path(base_path) / extra).is_file() and not (Path(out) / extra).exists():
            shutil.copy(Path(base_path) / extra, Path(out) / extra)
    return Path(out)
