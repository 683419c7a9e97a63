"""`cotrec plan` and `cotrec bench models`: a run's measured work per user over one worker's throughput.

The run is the small synthetic one of the retriever tests, with a real Encode & Map (zero-cost
encoder) and a real SASRec training; the extraction shards are SYNTHETIC with known token counts,
so the plan's arithmetic can be checked exactly. `bench models` measures the encoder and SASRec
parts for real (tiny sizes); the LLM rates are given, as `--throughput` does.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import torch

from cotrec.bench.common import rate
from cotrec.bench.memory import MemorySampler
from cotrec.bench.models import bench_models
from cotrec.config import load_config
from cotrec.embed import embed
from cotrec.errors import CotrecError
from cotrec.plan import GPU_PARAMETERS, parse_throughput, plan
from cotrec.reporting.stages import record_stage
from cotrec.retriever import train_variant
from retriever_data import FAST_RETRIEVER, fake_extraction, synthetic_run

USERS, ITEMS = 60, 80
LLM_RATES = {"llm.prompt_tokens_per_s": 100.0, "llm.generated_tokens_per_s": 10.0}
SETTINGS = FAST_RETRIEVER + ("retriever.grid=[none/random]", "retriever.grid_seeds=1", "retriever.max_epochs=3",
                             "embed.model=zero-cost", "ranker.grid=[none]")


def _with_usage(folder, prompt_tokens: int, completion_tokens: int) -> None:
    table = pd.read_parquet(folder / "part-0.parquet")
    table.assign(calls=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens).to_parquet(
        folder / "part-0.parquet", index=False)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    config, run = synthetic_run(root / "run", users=USERS, items=ITEMS, config_overrides=SETTINGS)
    fake_extraction(run)
    _with_usage(run / "extract" / "item_descriptions", 50, 20)   # per item
    _with_usage(run / "extract" / "preferences", 100, 30)        # per (user, horizon): 3 horizons
    embed(config, run)
    trained = train_variant(config, run, "none/random")
    models = root / "models.json"
    bench_models(config, models, parts=("encoder", "sasrec"), rounds=1, texts=16, sasrec_steps=2)
    return config, run, models, trained


def _rows(result):
    return {row["stage"]: row for row in result["rows"]}


def test_the_plan_multiplies_the_runs_work_per_user_by_users_over_the_measured_rates(measured):
    config, run, models, trained = measured
    bench = json.loads(models.read_text())
    assert {"encoder", "sasrec"} <= set(bench) and "llm" not in bench
    assert bench["sasrec"]["device"] == bench["encoder"]["device"] == "cpu" and "gpu" not in bench["sasrec"]
    assert [c["items"] for c in bench["sasrec"]["catalogues"]] == [1_000, 20_000]

    small = plan(config, run, 1_000, None, models, LLM_RATES)
    rows = _rows(small)
    assert list(rows) == ["items", "preferences", "embed", "retriever training", "retriever evaluation"]
    prefs = rows["preferences"]
    assert prefs["per"] == "user" and prefs["per_unit"] == pytest.approx(3 * (100 + 30))
    assert prefs["worker_hours"] == pytest.approx(1_000 * 3 * (100 / 100 + 30 / 10) / 3600)
    assert prefs["source"] == "given (--throughput)"
    items = rows["items"]   # the catalogue, not the users, sets the item stage: the run's 80 items
    assert items["per"] == "item" and items["total"] == pytest.approx(ITEMS * 70)
    assert rows["embed"]["total"] == pytest.approx(1_000 * 3 + ITEMS * 2)   # 3 horizons; caption + description
    assert rows["embed"]["source"] == "measured (encoder bench)"
    training = rows["retriever training"]
    assert str(trained["epochs"]) in training["work"] and training["source"] == "measured (sasrec bench)"

    large = _rows(plan(config, run, 4_000, None, models, LLM_RATES))
    for stage in ("preferences", "retriever training", "retriever evaluation"):
        assert large[stage]["worker_hours"] == pytest.approx(4 * rows[stage]["worker_hours"])
    assert large["embed"]["total"] == pytest.approx(4_000 * 3 + ITEMS * 2)
    assert large["items"]["worker_hours"] == pytest.approx(items["worker_hours"])
    # beside the plan, the run's own recorded stage time against the plan at the run's size
    record_stage(run, "preferences", 12.0, False)
    check = {c["stage"]: c for c in plan(config, run, 1_000, None, models, LLM_RATES)["check"]}
    assert check["preferences"]["run_s"] == 12.0
    assert check["preferences"]["planned_s"] == pytest.approx(USERS * 3 * (100 / 100 + 30 / 10), abs=0.1)
    # a larger catalogue: more item descriptions, and a full softmax that costs more per window
    # (rates written here rather than measured, so that no timing decides the test: 1 ms per window
    # at 1,000 items and 3 ms at 20,000, extended along that line to 200,000 items)
    fixed = models.parent / "models-fixed.json"
    bench["sasrec"]["catalogues"] = [{"items": 1_000, "train_windows_per_s": 1_000.0, "eval_queries_per_s": 1_000.0},
                                     {"items": 20_000, "train_windows_per_s": 1_000 / 3, "eval_queries_per_s": 500.0}]
    fixed.write_text(json.dumps(bench))
    wide = _rows(plan(config, run, 1_000, 200_000, fixed, LLM_RATES))
    assert wide["items"]["total"] == pytest.approx(200_000 * 70)
    assert wide["retriever training"]["rate_per_worker"] == pytest.approx(1 / (0.001 + 0.002 * 199_000 / 19_000))
    assert "past retriever.sampled_above_items" in wide["retriever training"]["work"]
    assert "sampled_above_items" not in training["work"]
    # a user token's table past the threshold, updated densely: the plan advises sparse updates
    with_users = config.model_copy(update={"retriever": config.retriever.model_copy(
        update={"grid": ["none/random", "random/random"]})})
    assert "sparse_user_updates=true" in _rows(plan(with_users, run, 1_000_000, None, models, LLM_RATES))[
        "retriever training"]["work"]
    assert "sparse_user_updates" not in _rows(plan(with_users, run, 100_000, None, models, LLM_RATES))[
        "retriever training"]["work"]


def test_stages_a_preset_places_on_gpus_take_parameters_and_say_so(measured):
    _, run, models, _ = measured
    gpu = load_config("gpu-cluster", list(SETTINGS[:-1]) + ["retriever.gpus_per_worker=1"])
    rows = _rows(plan(gpu, run, 1_000, None, models, {}))
    assert rows["preferences"]["source"] == "parameter (GPU, not measured)"
    assert rows["retriever training"]["rate_per_worker"] == GPU_PARAMETERS["sasrec.train_windows_per_s"]
    assert rows["embed"]["source"].startswith("measured")     # the preset leaves the encoder on CPUs
    assert rows["preferences"]["workers"] == gpu.extract.max_actors
    assert rows["preferences"]["wall_hours"] == pytest.approx(rows["preferences"]["worker_hours"] / gpu.extract.max_actors)


def test_a_figure_measured_on_a_gpu_serves_only_a_stage_placed_on_a_gpu(measured, tmp_path):
    # a models JSON as a GPU machine writes it (written here: no GPU in CI): the GPU stages take its
    # figures and name the GPU; the LLM, never benched there, stays a parameter
    _, run, models, _ = measured
    bench = json.loads(models.read_text())
    bench["sasrec"].update(device="cuda", gpu="NVIDIA H200", catalogues=[
        {"items": 1_000, "train_windows_per_s": 100_000.0, "eval_queries_per_s": 200_000.0},
        {"items": 20_000, "train_windows_per_s": 100_000.0, "eval_queries_per_s": 300_000.0}])
    bench["encoder"].update(device="cuda", gpu="NVIDIA H200", texts_per_s=9_000.0)
    on_gpu = tmp_path / "models-gpu.json"
    on_gpu.write_text(json.dumps(bench))
    gpu = load_config("gpu-cluster", list(SETTINGS[:-1]) + ["retriever.gpus_per_worker=1", "embed.device=cuda",
                                                                "embed.gpus_per_actor=1"])
    rows = _rows(plan(gpu, run, 1_000, None, on_gpu, {}))
    assert rows["retriever training"]["rate_per_worker"] == pytest.approx(100_000.0)
    assert rows["retriever training"]["source"] == "measured (sasrec bench, NVIDIA H200)"
    # faster at more items (a GPU's noise, as models-h200.json shows): the slower figure, not an extrapolation
    assert rows["retriever evaluation"]["rate_per_worker"] == pytest.approx(200_000.0)
    assert rows["embed"]["rate_per_worker"] == 9_000.0
    assert rows["embed"]["source"] == "measured (encoder bench, NVIDIA H200)"
    assert rows["preferences"]["source"] == "parameter (GPU, not measured)"
    # the same GPU stages with the CPU-measured JSON: parameters, never the CPU's figures
    rows = _rows(plan(gpu, run, 1_000, None, models, {}))
    for stage, key in (("retriever training", "sasrec.train_windows_per_s"), ("embed", "encoder.texts_per_s")):
        assert rows[stage]["rate_per_worker"] == GPU_PARAMETERS[key]
        assert rows[stage]["source"] == "parameter (GPU, not measured)"
    # CPU stages with only GPU figures: an error, not a GPU's rate for a CPU worker
    cpu = load_config("gpu-cluster", list(SETTINGS[:-1]) + ["retriever.gpus_per_worker=0", "embed.device=cuda",
                                                                "embed.gpus_per_actor=1"])
    with pytest.raises(CotrecError, match="sasrec bench ran on a GPU"):
        plan(cpu, run, 1_000, None, on_gpu, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_bench_models_placed_on_a_gpu_without_one_is_a_one_line_error(tmp_path, cli):
    # not a silent CPU run under a GPU config's name; said before any part runs
    config = load_config("gpu-cluster", ["embed.model=zero-cost"])
    with pytest.raises(CotrecError, match=r"retriever.gpus_per_worker is 1: bench models runs the sasrec and users "
                                          r"parts on a GPU, .* sees none"):
        bench_models(config, tmp_path / "models.json", parts=("encoder", "users"), rounds=1, texts=4, sasrec_steps=2)
    assert not (tmp_path / "models.json").exists()
    out = cli("bench", "models", "--config", "gpu-cluster", "--set", "embed.model=zero-cost", "--set",
              "embed.device=cuda", "--set", "embed.gpus_per_actor=1", "--set", "retriever.gpus_per_worker=0",
              "--parts", "encoder", "--out", str(tmp_path / "encoder.json"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "embed.device is cuda" in out.stderr


def test_plan_inputs_that_cannot_be_used_are_one_line_errors(measured, tmp_path, cli):
    config, run, models, _ = measured
    with pytest.raises(CotrecError, match="has no llm bench"):
        plan(config, run, 1_000, None, models, {})
    with pytest.raises(CotrecError, match="'llm.speed=3': expected KEY=VALUE"):
        parse_throughput(["llm.speed=3"])
    out = cli("plan", "--run-dir", str(run.root), "--users", "1000", "--models", str(tmp_path / "none.json"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "run `cotrec bench models" in out.stderr
    out = cli("plan", "--run-dir", str(tmp_path / "empty"), "--users", "1000", "--models", str(models))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no data/stats.json" in out.stderr
    out = cli("plan", "--config", str(run.root / "config.yaml"), "--run-dir", str(run.root), "--users", "1000",
              "--models", str(models), "--throughput", "llm.prompt_tokens_per_s=100",
              "--throughput", "llm.generated_tokens_per_s=10", "--out", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stderr
    assert "retriever training" in out.stdout and json.loads((tmp_path / "plan.json").read_text())["users"] == 1000


def test_a_span_shorter_than_the_samplers_interval_still_counts_its_cpu():
    # bench scale's short stages (the report, the retriever-only ranker row at 100k users) end
    # before a second sample: their CPU must come from a sample taken at the exit, not read as 0.
    import psutil

    spent = time.process_time()
    with MemorySampler(interval=30) as sampler:  # its first sample is taken at once, before any of this
        until = time.process_time() + 0.3
        while time.process_time() < until:
            pass
        held = b"x" * (64 << 20)  # written, so resident
        at_exit_mb = psutil.Process().memory_info().rss / 2**20
    spent = time.process_time() - spent
    assert 0.28 <= sampler.cpu_seconds()["driver"] <= spent + 0.05  # CPU the process spent, counted at the exit
    # against the RSS just before the exit, not the one before the block: a collection in between can
    # hand back more than 64 MiB of a large test process's memory
    assert sampler.peak["driver_rss_mb"] >= at_exit_mb - 2 and len(held) == 64 << 20


def test_bench_scale_can_stop_after_a_stage_and_measures_only_what_ran(tmp_path, cli):
    # `--until preferences` times the users extraction at a million users without the hour of
    # training after it; the stages after it neither run nor appear.
    from cotrec.bench.scale import bench_scale

    out = tmp_path / "scale.json"
    report = bench_scale("ml-100k", [300], ["data.synthetic.items=200"], out, tmp_path / "runs", until="preferences")
    [size] = report["sizes"]
    assert list(size["stages"]) == ["prepare", "items", "preferences"]
    # every rate is over the users the k-core filter kept and that stage's own wall time
    assert size["users"] == size["stats"]["users"] <= 300
    for stage in size["stages"].values():
        assert stage["users_per_s"] == rate(size["users"], stage["wall_s"])
    assert json.loads(out.read_text())["until"] == "preferences"
    bad = cli("bench", "scale", "--users", "300", "--until", "training", "--out", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown stage 'training'" in bad.stderr


def test_the_plan_prints_the_fine_tunes_and_the_merges_memory_per_gpu_and_host(measured, cli):
    """From the base model's parameter count (Qwen2.5-7B's config.json: 7,615,616,512), bf16 weights,
    LoRA on q/k/v/o, Adam and ZeRO; what gradient checkpointing and ZeRO-3 change is what they free."""
    from cotrec.plan import ranker_memory
    from cotrec.ranker.memory import GIB

    _, run, models, _ = measured
    params = 7_615_616_512
    gpu = ranker_memory(load_config("gpu-cluster"))
    ft, merge = gpu["finetune"], gpu["merge"]
    assert gpu["parameters"] == params and ft["base_bytes"] == params * 2
    # LoRA r=8 on q (3584 -> 3584), k and v (3584 -> 512), o (3584 -> 3584) in 28 layers
    assert ft["lora_parameters"] == 28 * 8 * ((3584 + 3584) * 2 + (3584 + 512) * 2)
    assert ft["gpu_bytes"] == ft["base_bytes"] + ft["lora_state_bytes"] + ft["activation_bytes"]
    assert ft["host_bytes"] == params * 2                     # the model loads on the host, then moves
    assert merge == {"gpu_bytes": params * 4, "host_bytes": params * 2}   # float32 on the GPU, a bf16 checkpoint out
    assert ft["gpu_bytes"] < 40 * GIB                          # fits a 48 GB L40S of the launcher's gpu-worker
    unchecked = ranker_memory(load_config("gpu-cluster", ["ranker.gradient_checkpointing=false"]))["finetune"]
    assert unchecked["activation_bytes"] > 10 * ft["activation_bytes"] and unchecked["gpu_bytes"] > 48 * GIB
    zero3 = ranker_memory(load_config("gpu-cluster", ["ranker.zero_stage=3"]))["finetune"]
    assert zero3["base_bytes"] == params  # the frozen weights partitioned over the 2 workers
    on_cpu = ranker_memory(load_config("demo"))
    assert on_cpu["finetune"]["gpu_bytes"] is None and on_cpu["merge"]["gpu_bytes"] is None
    assert on_cpu["source"].startswith("its weights")   # counted from the embedded checkpoint's headers
    assert ranker_memory(load_config("demo", ["ranker.grid=[none, llm/zero-shot]"])) is None   # nothing fine-tuned
    unknown = ranker_memory(load_config("demo", ["llm.model=team/ranker-base"]))
    assert "unknown" in unknown
    named = ranker_memory(load_config("demo", ["llm.model=team/ranker-3B"]))
    assert named["parameters"] == 3_000_000_000 and named["finetune"]["activation_bytes"] is None

    out = cli("plan", "--config", "gpu-cluster", "--run-dir", str(run.root), "--users", "1000", "--models", str(models))
    assert out.returncode == 0, out.stderr
    memory = out.stdout[out.stdout.index("memory: "):]
    assert "7.62B parameters" in memory and "gradient checkpointing on" in memory
    assert f"per GPU {ft['gpu_bytes'] / GIB:,.1f} GiB, host {params * 2 / GIB:,.1f} GiB" in memory
    assert f"merge (float32, saved in bfloat16): per GPU {params * 4 / GIB:,.1f} GiB" in memory


def test_the_parameter_count_from_a_config_is_that_of_the_weights():
    """The config.json formula (used where the weights are not on the machine) against the embedded
    model's safetensors headers."""
    import json as json_module
    from pathlib import Path

    from cotrec.llm.embedded import resolve_model
    from cotrec.ranker.memory import config_parameters, safetensors_parameters

    folder = Path(resolve_model("embedded"))
    counted = safetensors_parameters(folder)
    assert counted == 134_515_008
    assert config_parameters(json_module.loads((folder / "config.json").read_text())) == counted
