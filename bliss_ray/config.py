"""Typed experiment configuration: one pydantic model per stage, loaded from YAML with dotted overrides.

An experiment YAML (see ``experiments/``) is validated here before any compute: unknown keys, wrong types and
impossible combinations fail with a message naming the field. ``Experiment.resources`` holds *how* to run
(workers, CPUs, storage) and is excluded from every stage's identity hash; everything else changes results.

    from bliss_ray.config import load_experiment
    exp = load_experiment("experiments/demo.yaml", ["bilevel.gamma=0.1"])
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from bliss_ray.bilevel.settings import BilevelSettings
from bliss_ray.data.canaries import CanarySettings
from bliss_ray.train.settings import TrainSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class DataConfig(_Strict):
    pool: list[str] = ["bundled:pool"]
    """Pool files or globs: local paths, ``s3://``/``gs://`` URIs, or ``bundled:pool`` (the repo's corpus)."""
    pool_format: Literal["auto", "jsonl", "parquet_text", "parquet_tokens"] = "auto"
    """``auto`` infers from the suffix and columns: jsonl(.gz/.zst) text, parquet ``text``, parquet ``input_ids``."""
    reference: list[str] = ["bundled:reference"]
    """Reference (upper-level validation) set; the paper uses LAMBADA. Same formats as ``pool``."""
    reference_format: Literal["auto", "jsonl", "parquet_text", "parquet_tokens"] = "auto"
    reference_loss: Literal["passage", "continuation"] = "passage"
    """``passage``: plain LM loss over the whole sequence; ``continuation``: loss on the last word only (LAMBADA)."""
    text_column: str = "text"
    id_column: str = "id"
    """Stable int64 row id column; rows without one get ``file_index << 32 | line`` ids."""
    domain_column: str | None = "domain"
    seq_len: int = Field(128, ge=8)
    """Tokens per packed sequence (the paper uses 1024)."""
    max_doc_chars: int = Field(200_000, gt=0)
    """Documents longer than this are quarantined (far longer than any sequence; usually junk)."""
    max_bad_frac: float = Field(0.05, ge=0.0, le=1.0)
    """A stage fails when more than this fraction of its rows is quarantined."""
    corrupt_files: Literal["fail", "skip"] = "fail"
    """What a pre-flight check does with unreadable files: stop, or skip them and record it in the manifest."""
    max_reference_seqs: int = Field(512, gt=0)
    """Rows of each part of the reference set: the selection part (the upper level, MATES's probing) and the
    held-out evaluation part (the evaluate stage's reference loss), each a seeded subset when larger."""
    reference_eval_frac: float = Field(0.5, ge=0.0, lt=1.0)
    """Reference documents held out for evaluation (reference loss, ``bliss_ref_cloze``); selection never sees
    them. 0: no split (evaluation uses the selection rows)."""
    reference_split_seed: int = 0
    """Seed of that split; apart from ``seed``, so all seeds and methods are measured on the same documents."""
    canaries: CanarySettings = CanarySettings()
    """Reference documents moved to the pool intact and corrupted (``bliss_ray.data.canaries``); off by default."""

    @model_serializer(mode="wrap")
    def _canaries_only_when_on(self, dump):  # absent while off: runs made without them keep their identities
        out = dump(self)
        return out if self.canaries.on else {k: v for k, v in out.items() if k != "canaries"}


class TokenizerConfig(_Strict):
    kind: Literal["bpe", "pretrained"] = "bpe"
    """``bpe``: train a byte-level BPE on the pool (offline default); ``pretrained``: load ``name_or_path``."""
    name_or_path: str | None = None
    """Hub name (``EleutherAI/gpt-neox-20b``, the Pythia tokenizer) or a local directory."""
    vocab_size: int = Field(8192, ge=300)
    train_max_chars: int = Field(20_000_000, gt=0)

    @model_validator(mode="after")
    def _needs_name(self) -> TokenizerConfig:
        if self.kind == "pretrained" and not self.name_or_path:
            raise ValueError("tokenizer.name_or_path is required when tokenizer.kind is 'pretrained'")
        return self


class ModelConfig(_Strict):
    arch: str = "pythia-tiny"
    """Preset name from ``bliss_ray.models.arch.PRESETS`` (pythia-14m … pythia-2.8b, llama-*, tiny debug sizes)."""
    vocab_size: int | None = None
    """None: the tokenizer's size rounded up to a multiple of 64 (Pythia pads 50277 → 50304)."""


class ModelsConfig(_Strict):
    target: ModelConfig = ModelConfig(arch="pythia-tiny")
    proxy: ModelConfig = ModelConfig(arch="pythia-tiny-proxy")


class SelectionConfig(_Strict):
    method: Literal["bliss", "random", "mates"] = "bliss"
    rule: Literal["topk", "gumbel_topk"] = "topk"
    """How BLISS scores become a selection: deterministic top-k (paper) or Gumbel-top-k with ``temperature``.
    Ignored by ``random`` and ``mates`` (MATES always uses its own Gumbel convention, see ``mates.temperature``)."""
    keep_frac: float = Field(0.2, gt=0.0, le=1.0)
    """Fraction of each round's pool kept (paper: 20 %)."""
    temperature: float = Field(1.0, gt=0)
    seed: int = 0


class ScheduleConfig(_Strict):
    rounds: int = Field(2, ge=0)
    """R: selection rounds after the random round 0 (paper: 4)."""
    final_extra_steps: int = Field(0, ge=0)
    """Target steps added to the last round's pretraining: a FLOPs-matched baseline trains longer on its own
    selection (``bliss-ray compare`` sets it so that random's total FLOPs equal BLISS's)."""
    pool_sharding: Literal["disjoint", "shared"] = "disjoint"
    """``disjoint``: round r selects from its own shard of the pool (paper); ``shared``: every round uses it all."""


class ScoreConfig(_Strict):
    batch_seqs: int = Field(64, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Inference dtype: ``bfloat16`` always; ``float32`` follows ``resources.precision`` (so bf16 on GPU by
    default). Ranking always uses the fp32 logit (fp16 sigmoid scores tie at the cut-off)."""


class MatesConfig(_Strict):
    """The MATES baseline (docs/method.md, "MATES"; ``bliss_ray.mates``): oracle probing, influence model, Gumbel
    selection."""

    probes: int = Field(64, ge=1)
    """Oracle probes per round (MATES: 80k), a seeded sample of the round's pool shard."""
    reference_seqs: int = Field(32, ge=1)
    """Reference sequences the probe loss is measured on (MATES: 1024 LAMBADA docs)."""
    probe_lr: float | None = None
    """LR of the probe step; None uses the target's scheduled LR at the checkpoint."""
    influence_arch: str = "bert-tiny"
    """Influence-model preset (``bliss_ray.mates.influence``): bert-tiny, bert-mini, bert-small, bert-medium,
    bert-base (MATES)."""
    influence_epochs: int = Field(5, ge=1)
    influence_lr: float = Field(5e-4, gt=0)
    """AdamW LR of the influence model (MATES fine-tunes pretrained BERT at 5e-5; from scratch needs more)."""
    influence_batch_seqs: int = Field(16, ge=1)
    influence_weight_decay: float = Field(0.01, ge=0)
    influence_heldout_frac: float = Field(0.1, gt=0, lt=1)
    """Fraction of the probes held out to pick the best epoch by Spearman (MATES: 10 %)."""
    pretrained_bert: str | None = None
    """Pretrained ``bert-base-uncased`` weights (a directory: a local path or a store location, read on whichever
    node trains the influence model through its cache); None trains from random init."""
    temperature: float = Field(1.0, gt=0)
    """τ of MATES's Gumbel selection (paper 1.0, code 0.5)."""


class EvalConfig(_Strict):
    tasks: list[str] = ["bliss_ref_cloze", "sciq_local", "arc_easy_local", "piqa_local"]
    limit: int | None = 100
    """Documents per task (None: all). The demo limits to stay fast; the paper evaluates everything."""
    batch_size: int = Field(16, ge=1)
    every_round: bool = True
    """Evaluate every round's decay branch (needed for accuracy-vs-steps curves); else only the last."""
    bootstrap_iters: int = Field(1000, ge=0)
    """Bootstrap resamples for perplexity standard errors (the paper: 100000; accuracies use closed forms)."""
    offline: bool | Literal["auto"] = "auto"
    """Evaluate without the Hugging Face hub. ``auto``: offline exactly when every task reads data the node has (the
    ``*_local`` tasks, from ``eval_data fetch`` or the cluster image, and ``bliss_ref_cloze``); with a hub task (the
    paper's, on clusters) the evaluation tasks may download datasets."""


class FlopsConfig(_Strict):
    """Inputs of the FLOPs ledger that the config cannot know. Not part of any stage's identity."""

    pool_rows_per_round: int | None = None
    """Rows scored per round when the pool is not local (paper: ≥ 25.6 M, so that 20 % covers 5.12 M)."""
    reference_tokens_per_seq: float | None = Field(None, gt=0)
    """Mean tokens the MATES prober computes per reference item (``continuation`` references are trimmed after
    their last target token); None: ``data.seq_len``, an upper bound. A finished run's probe stage records the
    real count, which ``bliss-ray report`` uses."""


# The accelerators ``bliss-ray plan`` knows (``bliss_ray.costs.memory.DEVICES`` holds their memory and peaks).
GPU_TYPES = ("A10G-24GB", "L4-24GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "CPU")
# The stage kinds that run on an accelerator when the cluster has one.
GPU_KINDS = ("warmup", "pretrain", "bilevel", "score", "probe", "influence", "evaluate")


class ResourcesConfig(_Strict):
    """How to run. Excluded from identity hashes: changing it never invalidates results."""

    ray_address: str | None = None
    """None starts an embedded local Ray; ``auto`` joins the cluster this process runs on."""
    num_cpus: int | None = None
    """Logical CPUs of the embedded Ray (None: the machine's cores)."""
    train_workers: int = Field(1, ge=1)
    bilevel_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = None
    """None: use GPUs when the cluster has them."""
    torch_threads: int | None = None
    """Threads per worker (None: cores ÷ workers, at least 1)."""
    data_actors: tuple[int, int] = (1, 2)
    """(min, max) actors of Ray Data pools (scoring, tokenizing)."""
    data_actor_cpus: float = Field(0.5, gt=0)
    storage_path: str | None = None
    """Where Ray Train/Tune keep checkpoints (``s3://…`` on clusters); None: ``<run dir>/_ray``."""
    max_failures: int = Field(2, ge=-1)
    worker_start_timeout_s: float = Field(600.0, gt=0)
    """How long a Train worker group waits for its nodes before the attempt fails: long enough for an autoscaler
    to start a cold GPU node (image pull, boot: several minutes)."""
    controller_failure_limit: int = Field(3, ge=1)
    """Worker-group attempts (start timeouts, lost nodes) before a Train stage fails: with the start timeout,
    the bound on waiting for a request that never fits (3 × 600 s by default)."""
    stage_retries: int = Field(2, ge=0)
    """Times a stage interrupted by lost infrastructure that Ray did not retry itself (a node lost while a worker
    group starts, an actor or object lost under Ray Data, tasks or the driver) is run again in the same command,
    resuming from what it saved; each attempt is shown on the console with its cause. Errors no retry can fix (a
    bad config, a non-finite loss, a request above the cluster's ceiling) fail at once."""
    compile: bool = False
    """torch.compile the model in training (off by default on CPU)."""
    dashboard: bool = False
    """Start the embedded local Ray's dashboard (State API, ``ray list``, Train's placement-group clean-up). Off by
    default: it costs a dozen processes and a gigabyte of memory, and on a loaded 2-core machine its agent can
    start too slowly for the raylet. A cluster started with ``ray start`` has its own."""
    parallelism: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """How proxy warm-up and target pretraining use ``train_workers``: ``ddp`` keeps a full copy of weights, grads
    and AdamW state on every worker (16 B/param); ``fsdp`` shards them over all workers (FSDP2 ``fully_shard`` per
    transformer block); ``hsdp`` shards them within a group of ``hsdp_shard_size`` workers (a node) and replicates
    the groups, so parameters are gathered over the node's fast links and only gradients cross nodes. The bilevel
    stage always stays replicated (double backward through sharded parameters is unverified)."""
    hsdp_shard_size: int | None = Field(None, ge=1)
    """Workers per HSDP shard group (``parallelism: hsdp``); it must divide ``train_workers``. None: the workers
    on one node (Ray Train's local world size; ``bliss-ray plan``: the GPU type's node, or ``--gpus-per-node``)."""
    grad_sync: Literal["every_micro_batch", "last_micro_batch"] = "every_micro_batch"
    """When ``fsdp`` / ``hsdp`` reduce gradients in a step: after every micro-batch, or only the last (FSDP2's
    ``set_requires_gradient_sync``: a worker keeps the unsharded fp32 gradient, 4 B/param more, and reduces once per
    step). ``ddp`` always reduces on the last micro-batch. ``bliss-ray plan`` prices both."""
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    """Recompute transformer blocks in backward instead of keeping their activations: every block (``full``) or
    every ``activation_checkpointing_k``-th block (``every_k``). Training stages only."""
    activation_checkpointing_k: int = Field(2, ge=2)
    """k of ``every_k``: blocks 0, k, 2k, … are recomputed (transformers' ``every_n_layers``)."""
    precision: Literal["auto", "bf16-mixed", "fp16-mixed", "fp32"] = "auto"
    """Compute precision of training, scoring and evaluation. ``*-mixed``: fp32 master weights and optimizer state,
    16-bit matmuls. ``auto``: bf16-mixed on GPU, fp32 on CPU. The bilevel stage always computes in fp32."""
    gpu_type: Literal[GPU_TYPES] | None = None
    """The accelerator the stages run on (``bliss_ray.costs.memory.DEVICES``): a placement constraint for every Train
    worker, Ray Data actor and evaluation task that uses a GPU, which the cluster's node types must declare
    (``cluster/``). ``bliss-ray run``, ``sweep`` and ``compare`` refuse a config whose memory plan does not fit it;
    None: placed on any GPU, checked against a local GPU only."""
    gpu_types: dict[Literal[GPU_KINDS], Literal[GPU_TYPES]] = {}
    """Stage kinds that run on another accelerator than ``gpu_type``, e.g. ``{probe: A100-40GB}``: MATES's 1B
    probes, or a 160M proxy's bilevel stage, need more memory than the target's pretraining."""

    def gpu_type_for(self, kind: str) -> str | None:
        """The accelerator a stage of this kind runs on."""
        return self.gpu_types.get(kind, self.gpu_type)

    @property
    def sharded(self) -> bool:
        """Whether training shards parameters (FSDP2: ``fsdp`` or ``hsdp``)."""
        return self.parallelism in ("fsdp", "hsdp")

    @model_validator(mode="after")
    def _sharding(self) -> ResourcesConfig:
        if self.sharded and self.precision == "fp16-mixed":
            raise ValueError(
                f"resources.precision fp16-mixed is not supported with resources.parallelism {self.parallelism} "
                "(its loss scaling is not wired into FSDP2's mixed-precision policy); use bf16-mixed"
            )
        size = self.hsdp_shard_size
        if self.parallelism == "hsdp" and size is not None and self.train_workers % size:
            raise ValueError(
                f"hsdp_shard_size: {size} does not divide resources.train_workers={self.train_workers} (HSDP "
                "replicates whole shard groups); choose a divisor, e.g. the workers per node"
            )
        return self


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    models: ModelsConfig = ModelsConfig()
    warmup: TrainSettings = TrainSettings()
    """Proxy warm-up on random data (once per experiment)."""
    pretrain: TrainSettings = TrainSettings(decay_steps=20)
    """Target pretraining, per round."""
    bilevel: BilevelSettings = BilevelSettings()
    selection: SelectionConfig = SelectionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    score: ScoreConfig = ScoreConfig()
    mates: MatesConfig = MatesConfig()
    eval: EvalConfig = EvalConfig()
    flops: FlopsConfig = FlopsConfig()
    label: str | None = None
    """How reports name this variant (default: the selection method and what differs); not part of identities."""
    tracking: list[Literal["tensorboard", "mlflow", "wandb"]] = ["tensorboard"]
    """Where per-step and per-round metrics go besides ``metrics.jsonl``: TensorBoard event files under
    ``<run>/tb``; MLflow (``mlflow_uri``); Weights & Biases (``WANDB_MODE=offline`` keeps it on the machine, files
    under ``<run>/wandb``). Their files in the run root are copied to the store with the console log when the run
    root is one. MLflow and W&B need ``pip install 'bliss-ray[tracking]'``. Not part of identities."""
    mlflow_uri: str | None = None
    """MLflow's tracking URI (a tracking server on a cluster); None: ``MLFLOW_TRACKING_URI``, else a SQLite file in
    the run root, ``<run>/mlflow.db``."""
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        target, proxy = self.models.target.vocab_size, self.models.proxy.vocab_size
        if self.bilevel.uses_kl and target is not None and proxy is not None and target != proxy:
            raise ValueError(
                f"bilevel.gamma > 0 needs a shared vocabulary, but models.target.vocab_size={target} "
                f"!= models.proxy.vocab_size={proxy}; set bilevel.gamma=0 (as the paper does for LLaMA)"
            )
        return self

    @model_validator(mode="after")
    def _eval_branches(self) -> Experiment:
        p, res = self.pretrain, self.resources
        if not p.eval_branches:
            return self
        if not p.decay_steps:
            raise ValueError("pretrain.eval_branches > 0 needs pretrain.decay_steps > 0 (each branch decays)")
        if p.eval_branches >= p.steps:
            raise ValueError(f"pretrain.eval_branches must be < pretrain.steps ({p.steps}): at most one per step")
        if res.sharded and res.train_workers > 1:
            raise ValueError(
                f"pretrain.eval_branches is not supported with resources.parallelism {res.parallelism} on 2+ "
                "train_workers (a branch copies, restores and saves the whole unsharded model); use parallelism ddp "
                "or no branches"
            )
        return self


class ConfigError(ValueError):
    """An invalid experiment configuration; the message names the offending field(s)."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings (``--set``; values parsed as YAML) as a {dotted: value} dict."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like dotted.key=value")
        key, raw = item.split("=", 1)
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def apply_overrides(tree: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply ``key.sub=value`` strings or a {dotted: value} dict to a raw config tree."""
    for key, value in (overrides if isinstance(overrides, dict) else parse_overrides(overrides)).items():
        _set_dotted(tree, key, value)
    return tree


def parse_experiment(tree: dict) -> Experiment:
    """Validate a raw tree; raise ``ConfigError`` listing every bad field as ``dotted.path: reason``."""
    try:
        return Experiment.model_validate(tree)
    except ValidationError as e:
        lines = [f"  {_where(err)}: {_reason(err)}" for err in e.errors()]
        raise ConfigError("invalid experiment config:\n" + "\n".join(lines)) from None


def _where(err: dict) -> str:
    """The dotted field of a validation error; a section's own check (``train.settings.require``) names its field
    first in the message: ``warmup`` + ``steps: must be ≥ 1`` is ``warmup.steps``."""
    where = ".".join(str(p) for p in err["loc"]) or "<experiment>"
    field = re.match(r"Value error, (\w+): ", err["msg"])
    return f"{where}.{field.group(1)}" if field and err["loc"] else where


def _reason(err: dict) -> str:
    return re.sub(r"^Value error, (\w+: )?", "", err["msg"]) if err["loc"] else err["msg"]


def load_experiment(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Experiment:
    """Load an experiment YAML, apply overrides, validate. Fails before any compute."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return parse_experiment(apply_overrides(tree, overrides or []))


def identity(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (pydantic models are dumped first): a stage's identity."""

    def plain(p: Any) -> Any:
        return p.model_dump(mode="json") if isinstance(p, BaseModel) else p

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
