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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


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


class TrainConfig(_Strict):
    """One LM training run (proxy warm-up, or one round of target pretraining)."""

    steps: int = Field(100, ge=1)
    """Optimizer steps (per round for target pretraining)."""
    warmup_steps: int = Field(10, ge=0)
    """Linear LR warm-up at the very start (counted in global steps across rounds)."""
    decay_steps: int = Field(0, ge=0)
    """Length of the decay branch kept for evaluation (paper: 200); 0 = none. The main run never decays."""
    eval_branches: int = Field(0, ge=0)
    """Extra decay branches inside each round, at evenly spaced stable steps strictly between its start and end
    (``train.schedule.branch_steps``: 60 steps, 2 branches → steps 20 and 40 of the round), each evaluated like
    the round's final one: more checkpoints per curve. Target pretraining only; needs ``decay_steps`` > 0."""
    lr: float = Field(1e-3, gt=0)
    lr_round_factor: float = Field(1.0, gt=0, le=1.0)
    """Peak LR of round r is lr·factor^r. MATES: 1.0; the released BLISS code uses 0.5."""
    micro_batch_seqs: int = Field(8, ge=1)
    global_batch_seqs: int = Field(16, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    ckpt_every_steps: int = Field(50, ge=1)
    nonfinite_policy: Literal["fail", "skip_batch"] = "fail"
    """``fail``: raise naming stage and step; ``skip_batch``: drop that update (at most ``max_skipped_steps``)."""
    max_skipped_steps: int = Field(3, ge=0)


class BilevelConfig(_Strict):
    outer_steps: int = Field(50, ge=1)
    """T: outer (score-model) steps per round. Paper: 3000."""
    inner_steps: int = Field(1, ge=1)
    """K: proxy AdamW steps per outer step. Paper: 1."""
    z_steps: int = Field(3, ge=1)
    """Q: damped Richardson iterations for z ≈ H⁻¹∇f. Released code: 3."""
    z_lr: float = Field(1e-2, gt=0)
    """η_z of the Richardson update."""
    z_damping: float = Field(1e-2, ge=0)
    """μ: damping added to the Hessian (z ← z − η_z (Hz − ∇f + μz))."""
    z_init: Literal["zero", "constant", "grad"] = "zero"
    """``zero``: the textbook Richardson start (default); ``constant``: 1/numel per tensor (the released code, whose
    first c_i then carry a term ⟨∇CE_i, 1/numel⟩ unrelated to the reference set: on the demo it made the selection
    erratic across seeds, docs/design.md); ``grad``: start at ∇f."""
    z_clip: float | None = 1.0
    """Per-tensor norm clip of each Richardson update (released code: 1.0); None disables."""
    proxy_lr: float = Field(1e-5, gt=0)
    score_lr: float = Field(1e-5, gt=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    hypergrad_clip: float | None = 1.0
    """Per-tensor norm clip of the score-model hypergradient (released code: 1.0)."""
    gamma: float = Field(1e-2, ge=0)
    """γ: weight of KL(target ‖ proxy) in the lower level; 0 skips loading the target."""
    l2: float = Field(1e-6, ge=0)
    """λ: weight of ‖θ_p‖² in the lower level (on top of AdamW weight decay)."""
    micro_batch_seqs: int = Field(4, ge=1)
    """Training sequences per worker per outer step (global batch = this × workers). Paper: 4 × 8 GPUs."""
    reference_batch_seqs: int = Field(4, ge=1)
    use_sigmoid: bool = True
    """Score head ends in a sigmoid (paper); False is the rebuttal's "without sigmoid" ablation."""
    score_init: Literal["proxy_warmup", "random"] = "proxy_warmup"
    score_carry: Literal["inherit", "reset"] = "inherit"
    weight_norm: Literal["global", "stale"] = "global"
    """``global``: softmax over the global batch (paper); ``stale``: released code's previous-step normaliser."""
    loss_scaling: Literal["global", "released"] = "global"
    """``global``: g = Σ P_i CE_i + γ KL + λ‖θ‖² over the global batch; ``released``: the released code's effective
    objective on ``released_devices`` GPUs under DDP averaging, (1/N)·[Σ P_i CE_i + Nγ KL + Nλ‖θ‖²]
    (docs/design.md)."""
    released_devices: int = Field(8, ge=1)
    """N of ``released`` scaling: the released run's GPU count (run.sh: 8), independent of bilevel_workers."""
    reuse_inner_batch: bool = True
    """The outer step uses the last inner batch (what the released code does with K=1)."""
    ci_method: Literal["ghost", "loop"] = "ghost"
    """How c_i = ⟨∇CE_i, z⟩ is computed: batched ghost inner products, or the per-sample reference loop."""
    ci_chunk_seqs: int = Field(8, ge=1)
    """Sequences per ghost chunk: bounds memory (B·T·V logits); on a GPU use the whole batch."""
    log_every_steps: int = Field(1, ge=1)
    ckpt_every_steps: int = Field(25, ge=1)


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
    """The MATES baseline (method.md §5; ``bliss_ray.mates``): oracle probing, influence model, Gumbel selection."""

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
    """Local directory of pretrained ``bert-base-uncased`` weights; None trains from random init."""
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
    compile: bool = False
    """torch.compile the model in training (off by default on CPU)."""
    dashboard: bool = False
    """Start the embedded local Ray's dashboard (State API, ``ray list``, Train's placement-group clean-up). Off by
    default: +1.1 GB and 11 processes, and on a loaded 2-core machine its agent can start too slowly for the raylet.
    A cluster started with ``ray start`` has its own."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """How proxy warm-up and target pretraining use ``train_workers``: ``ddp`` keeps a full copy of weights, grads
    and AdamW state on every worker (16 B/param); ``fsdp`` shards them (FSDP2 ``fully_shard`` per transformer
    block). The bilevel stage always stays replicated (double backward through sharded parameters is unverified)."""
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    """Recompute transformer blocks in backward instead of keeping their activations: every block (``full``) or
    every ``activation_checkpointing_k``-th block (``every_k``). Training stages only."""
    activation_checkpointing_k: int = Field(2, ge=2)
    """k of ``every_k``: blocks 0, k, 2k, … are recomputed (transformers' ``every_n_layers``)."""
    precision: Literal["auto", "bf16-mixed", "fp16-mixed", "fp32"] = "auto"
    """Compute precision of training, scoring and evaluation. ``*-mixed``: fp32 master weights and optimizer state,
    16-bit matmuls. ``auto``: bf16-mixed on GPU, fp32 on CPU. The bilevel stage always computes in fp32."""
    gpu_type: Literal[GPU_TYPES] | None = None
    """The accelerator of the cluster's worker nodes (``bliss_ray.costs.memory.DEVICES``). ``bliss-ray run`` refuses a
    config whose memory plan does not fit it; None: detected on a local GPU, otherwise not checked."""

    @model_validator(mode="after")
    def _fsdp_precision(self) -> ResourcesConfig:
        if self.parallelism == "fsdp" and self.precision == "fp16-mixed":
            raise ValueError(
                "resources.precision fp16-mixed is not supported with resources.parallelism fsdp (its loss scaling "
                "is not wired into FSDP2's mixed-precision policy); use bf16-mixed"
            )
        return self


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    models: ModelsConfig = ModelsConfig()
    warmup: TrainConfig = TrainConfig()
    """Proxy warm-up on random data (once per experiment)."""
    pretrain: TrainConfig = TrainConfig(decay_steps=20)
    """Target pretraining, per round."""
    bilevel: BilevelConfig = BilevelConfig()
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
    ``<run>/tb``; MLflow (``MLFLOW_TRACKING_URI``, default ``sqlite:///<run>/mlflow.db``); Weights & Biases
    (``WANDB_MODE=offline`` keeps it on the machine, files under ``<run>/wandb``). MLflow and W&B need ``pip install
    'bliss-ray[tracking]'``. Not part of identities."""
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        for name in ("warmup", "pretrain"):
            t: TrainConfig = getattr(self, name)
            if t.global_batch_seqs % t.micro_batch_seqs:
                raise ValueError(f"{name}.global_batch_seqs must be a multiple of {name}.micro_batch_seqs")
        target, proxy = self.models.target.vocab_size, self.models.proxy.vocab_size
        if self.bilevel.gamma > 0 and target is not None and proxy is not None and target != proxy:
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
        if res.parallelism == "fsdp" and res.train_workers > 1:
            raise ValueError(
                "pretrain.eval_branches is not supported with resources.parallelism fsdp on 2+ train_workers (a "
                "branch copies, restores and saves the whole unsharded model); use parallelism ddp or no branches"
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


def apply_overrides(tree: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) or a {dotted: value} dict to a raw config tree."""
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like dotted.key=value")
            key, raw = item.split("=", 1)
            parsed.append((key.strip(), yaml.safe_load(raw)))
        items = parsed
    for key, value in items:
        _set_dotted(tree, key, value)
    return tree


def parse_experiment(tree: dict) -> Experiment:
    """Validate a raw tree; raise ``ConfigError`` listing every bad field as ``dotted.path: reason``."""
    try:
        return Experiment.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "<experiment>"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("invalid experiment config:\n" + "\n".join(lines)) from None


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
