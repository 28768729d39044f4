"""Typed configuration dataclasses.

This module imports neither torch nor Hydra: it is read by `clip.create_model` (plain Python) and by
the trainer, where Hydra composes YAML + CLI overrides and `OmegaConf.to_object` turns them into these
classes. Field names are the config keys users type (`model.vision.width=1024`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

VISION_KINDS = ("vit", "resnet", "timm")
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class VisionConfig:
    """Image tower. `kind` selects which of the fields below apply."""

    kind: str = "vit"  # "vit" | "resnet" | "timm"
    image_size: int = 224
    # ViT: token width. ResNet: stem width (64 for RN50); stage widths are 1x, 2x, 4x, 8x that.
    width: int = 768
    # ViT: number of residual attention blocks.
    layers: int = 12
    # ResNet: bottleneck blocks per stage, e.g. [3, 4, 6, 3] for RN50.
    stage_blocks: list[int] = field(default_factory=list)
    # ViT: square patch side in pixels.
    patch_size: int = 16
    # ViT blocks and the ResNet attention pool: heads = width // head_width (64 as in OpenAI's models).
    head_width: int = 64
    mlp_ratio: float = 4.0
    # FLIP (arXiv:2212.00794): fraction of patch tokens dropped at random in training; ViT only.
    patch_dropout: float = 0.0
    # timm: any `timm.create_model` name; the tower is the trunk's pooled output + a linear projection.
    timm_model: str = ""
    # Loads timm's ImageNet weights for the trunk (downloads; never in tests).
    timm_pretrained: bool = False

    @property
    def heads(self) -> int:
        # ResNet attention pooling runs on the 32x stem-width features (2048 channels for RN50).
        pooled_width = self.width * 32 if self.kind == "resnet" else self.width
        return pooled_width // self.head_width

    @property
    def grid_size(self) -> int:
        """ViT: patches per side. ResNet: side of the final feature map (stride 32)."""
        if self.kind == "vit":
            return self.image_size // self.patch_size
        return self.image_size // 32

    @property
    def mlp_width(self) -> int:
        # int() truncation matches OpenCLIP for fractional ratios (ViT-g-14: 1408 * 4.3637 -> 6144).
        return int(self.width * self.mlp_ratio)


@dataclass
class TextConfig:
    """Causal text Transformer pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # "openai" for OpenAI's CLIP BPE, or a path to any `tokenizers` tokenizer.json.
    tokenizer: str = "openai"
    # Features are read at the first occurrence of this id (OpenAI: 49407, the largest id, so this
    # equals OpenAI's `argmax` pooling).
    eot_token_id: int = 49407

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class ModelConfig:
    """A CLIP: two towers projected into a shared `embed_dim` space, plus a learned temperature."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's models use QuickGELU (x * sigmoid(1.702 x)); OpenCLIP's default is exact GELU.
    activation: str = "gelu"
    # logit_scale is a log-temperature: exp(init_logit_scale) = 1/0.07 multiplies the cosine similarities.
    init_logit_scale: float = math.log(1 / 0.07)
    # SigLIP's learned bias (arXiv:2303.15343, init -10); None: no bias parameter.
    init_logit_bias: Optional[float] = None


def validate_model_config(cfg: ModelConfig, prefix: str = "model") -> None:
    """Raise ValueError naming the offending key when fields contradict each other."""
    v, t = cfg.vision, cfg.text
    problems = []
    if v.kind not in VISION_KINDS:
        problems.append(f"{prefix}.vision.kind={v.kind!r} is not one of {VISION_KINDS}")
    if cfg.activation not in ACTIVATIONS:
        problems.append(f"{prefix}.activation={cfg.activation!r} is not one of {ACTIVATIONS}")
    if v.kind == "vit":
        if v.image_size % v.patch_size:
            problems.append(
                f"{prefix}.vision.image_size={v.image_size} is not a multiple of "
                f"{prefix}.vision.patch_size={v.patch_size}"
            )
        if v.width % v.head_width:
            problems.append(
                f"{prefix}.vision.width={v.width} is not a multiple of {prefix}.vision.head_width={v.head_width}"
            )
        if not 0.0 <= v.patch_dropout < 1.0:
            problems.append(f"{prefix}.vision.patch_dropout={v.patch_dropout} must be in [0, 1)")
    if v.kind == "resnet":
        if len(v.stage_blocks) != 4:
            problems.append(f"{prefix}.vision.stage_blocks={v.stage_blocks} must list 4 stage depths")
        if v.image_size % 32:
            problems.append(f"{prefix}.vision.image_size={v.image_size} must be a multiple of 32 for a ResNet")
    if v.kind == "timm" and not v.timm_model:
        problems.append(f"{prefix}.vision.timm_model must name a timm model when {prefix}.vision.kind='timm'")
    if v.kind != "vit" and v.patch_dropout:
        problems.append(f"{prefix}.vision.patch_dropout is for ViT towers only (kind={v.kind!r})")
    if t.width % t.heads:
        problems.append(f"{prefix}.text.width={t.width} is not a multiple of {prefix}.text.heads={t.heads}")
    if not 0 <= t.eot_token_id < t.vocab_size:
        problems.append(f"{prefix}.text.eot_token_id={t.eot_token_id} is outside the vocabulary of {t.vocab_size}")
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems))


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """Plain JSON-able dict of a model config (stored inside checkpoints and exports)."""
    return asdict(cfg)


def model_config_from_dict(data: dict, prefix: str = "model") -> ModelConfig:
    """Inverse of `model_config_to_dict`; unknown keys raise ValueError naming them, absent keys take defaults."""
    data = dict(data)
    sections = {"vision": VisionConfig, "text": TextConfig}
    parts = {}
    for section, section_cls in sections.items():
        parts[section] = _dataclass_from_dict(section_cls, data.pop(section, {}), f"{prefix}.{section}")
    cfg = _dataclass_from_dict(ModelConfig, data, prefix, **parts)
    validate_model_config(cfg, prefix)
    return cfg


def _dataclass_from_dict(cls: type, data: dict, prefix: str, **extra):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(f'{prefix}.{key}' for key in unknown)}")
    return cls(**data, **extra)


@dataclass
class DataConfig:
    """Training data: WebDataset tar shards (img2dataset layout) and/or CSV/TSV files of (image, caption).

    See docs/data.md. Keys are `data.<field>` in the training config.
    """

    # Sources separated by '::' (mixed with `train_weights`). Each source is a brace pattern of shard
    # paths (`/data/laion/{00000..41407}.tar`), a `.txt` file listing shard paths or patterns (one per
    # line), or a `.csv`/`.tsv` file of (image path, caption) rows. `pipe:<shell command>` shards run a
    # shell command per shard and need `allow_pipe_urls`.
    train_shards: str = "???"
    # One upsampling factor per '::' source: a shard is drawn with probability proportional to its
    # source's weight (resampled mode only). Empty: every source weighs 1.
    train_weights: list[float] = field(default_factory=list)
    # JSON file of per-shard sample counts in OpenCLIP's sizes.json format ({"00000.tar": 10000, ...}).
    # Default: the `sizes.json` beside each shard. Epoch mode needs the counts (they fix the steps per
    # epoch); both modes use them to detect truncated shards.
    train_manifest: Optional[str] = None
    # True: an endless stream drawing shards with replacement (OpenCLIP's choice for web-scale data).
    # False: epochs that read every shard exactly once, split over ranks and workers.
    resampled: bool = False
    # DataLoader worker processes per rank; each reads its own shards. 0 reads in the training process.
    num_workers: int = 4
    # Batches each worker prepares ahead.
    prefetch_factor: int = 2
    # Samples each worker holds for shuffling (memory: this many encoded samples per worker).
    shuffle_buffer: int = 2000
    # Shards each worker reads at once, interleaving their samples at random. It is also the most a
    # worker re-reads after a resume.
    interleave_shards: int = 4
    # CSV/TSV column names of the image path (relative paths are relative to the file) and the caption.
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    # Stop with an error naming the worst shards when more than this fraction of samples is skipped
    # (corrupt or oversized image, missing caption).
    max_skip_fraction: float = 0.05
    # Stop when more shards than this cannot be opened on one rank (missing file, failed command).
    max_unreadable_shards: int = 4
    # Skip tar members larger than this without reading them (a lying header is a memory bomb).
    max_member_bytes: int = 64 * 1024 * 1024
    # `pipe:` shard URLs run shell commands: allowed only when set here, never from a shard list file.
    allow_pipe_urls: bool = False
    # Attempts for a `pipe:` command without output, and for each read of a remote shard (backoff 1 s, 2 s, ...).
    open_retries: int = 3
    # Train on these samples only: a DataComp subset file (.npy of uids, docs/curation.md). Epoch mode
    # also reads the kept count of each shard from `<subset stem>.sizes.json` beside it.
    subset: Optional[str] = None
    # MetaCLIP balancing as the samples stream: a balance file (entries, counts, t) made by
    # `scripts/curate.py metaclip --count`; the kept set follows from it and the run's `seed`.
    balance: Optional[str] = None


LOSS_NAMES = ("clip", "siglip")


@dataclass
class LossConfig:
    """Contrastive objective, computed over the global batch (local batch x world size x micro-batches).

    Exact across ranks and micro-batches; see docs/objective.md.
    """

    # "clip": symmetric softmax InfoNCE (arXiv:2103.00020). "siglip": pairwise sigmoid loss
    # (arXiv:2303.15343), which needs a learned bias: model.init_logit_bias=-10 and
    # model.init_logit_scale=ln(10) as in the paper.
    name: str = "clip"
    # Global columns of the [local, global] logits processed at a time, forward and backward, so
    # loss memory grows with local x chunk_size instead of local x global. 0: all columns at once.
    chunk_size: int = 0


def validate_loss_config(cfg: LossConfig, model: ModelConfig, prefix: str = "loss") -> None:
    """Raise ValueError naming the offending key when the loss and the model do not fit together."""
    problems = []
    if cfg.name not in LOSS_NAMES:
        problems.append(f"{prefix}.name={cfg.name!r} is not one of {LOSS_NAMES}")
    if cfg.chunk_size < 0:
        problems.append(f"{prefix}.chunk_size={cfg.chunk_size} must be >= 0 (0: no chunking)")
    if cfg.name == "siglip" and model.init_logit_bias is None:
        problems.append(
            f"{prefix}.name='siglip' needs a learned bias: set model.init_logit_bias (SigLIP: -10), or select "
            "the loss group with loss=siglip (sets SigLIP's initial bias -10 and temperature 10)"
        )
    if cfg.name == "clip" and model.init_logit_bias is not None:
        problems.append(
            f"{prefix}.name='clip' does not use a bias, but model.init_logit_bias={model.init_logit_bias} "
            "adds one (it would get no gradient)"
        )
    if problems:
        raise ValueError("invalid loss config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# Trainer configuration: `scripts/train.py` composes configs/ with Hydra into a TrainConfig.
# Step quantities (`*_steps`, `*_every`) count optimizer steps.

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLELISMS = ("ddp", "fsdp")
LR_SCHEDULES = ("cosine", "constant")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class TrainModelConfig(ModelConfig):
    """A registry architecture (`model=ViT-B-32` selects it) plus any field overrides.

    `name` records which registry entry the fields came from; it is filled by the `model=` choice.
    """

    name: str = ""


def to_model_config(cfg: TrainModelConfig) -> ModelConfig:
    """The architecture without the trainer's `name` record (what CLIP and exports take)."""
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})


@dataclass
class OptimConfig:
    """AdamW, linear warmup then cosine decay (the CLIP paper's recipe, arXiv:2103.00020 appendix F).

    Weight decay applies to matrices and embeddings (ndim >= 2): not to gains, biases, the class
    token, BatchNorm parameters or logit_scale/logit_bias (ndim < 2). See docs/training.md.
    """

    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.2
    warmup_steps: int = 2000
    schedule: str = "cosine"  # "cosine" | "constant" (after warmup)
    min_lr: float = 0.0  # the cosine's final value
    # Clip the global gradient norm to this value; 0 disables clipping (the norm is still computed
    # and checked for finiteness every step).
    grad_clip_norm: float = 1.0


@dataclass
class CheckpointConfig:
    """Training checkpoints under `<output_dir>/checkpoints/step-<N>/` and the final export."""

    every_steps: int = 1000  # 0: only at the end and on preemption
    keep_last: int = 3  # >= 2: the newest checkpoint is never the only one on disk while a new one is written
    # "auto": resume from the newest committed checkpoint in output_dir if there is one;
    # "never": refuse to start in a run directory that has checkpoints; or a path to a checkpoint.
    resume: str = "auto"
    # Weights to start a *new* run from (ignored, with a log line, when resuming).
    init_from: str = ""
    # Config keys (e.g. "global_batch_size") whose change is accepted on resume.
    allow_config_change: list[str] = field(default_factory=list)
    export: bool = True  # write `<output_dir>/model.safetensors` for `clip.load` at the end


@dataclass
class LogConfig:
    every_steps: int = 10
    wandb: str = "disabled"  # "disabled" | "offline" (no account needed) | "online"
    wandb_project: str = "clip-train"
    run_name: str = ""  # wandb run name; letters, digits, '.', '_' and '-' only


@dataclass
class EvalConfig:
    """Periodic zero-shot evaluation on ImageFolder-style sets (all ranks take part)."""

    every_steps: int = 0  # 0: only at the end (when `zero_shot` names sets)
    zero_shot: list[str] = field(default_factory=list)  # `path` or `name=path`; metric `eval/<name>_top1`
    batch_size: int = 64


@dataclass
class DistConfig:
    parallel: str = "ddp"  # "ddp" | "fsdp" (FSDP2, for towers that do not fit replicated)
    backend: str = "auto"  # "auto": nccl on GPU, gloo on CPU
    timeout_s: int = 600  # collective timeout: a rank that stops answering fails the job after this
    # Dump every thread's stack and exit when no step completes for this long (0: off).
    watchdog_s: int = 1800


@dataclass
class NanConfig:
    """Non-finite loss or gradient norm: the step is skipped on every rank and counted."""

    max_consecutive: int = 3  # this many skipped steps in a row stop the run (1: stop at the first)
    max_total: int = 100  # or this many in the whole run (0: no limit)


@dataclass
class FaultConfig:
    """Fault injection for tests. All off (0 / empty); `rank` -1 means every rank."""

    rank: int = -1
    kill_at_step: int = 0  # SIGKILL itself right after completing this step
    kill_in_save_at_step: int = 0  # SIGKILL itself inside the checkpoint save of this step, at:
    kill_in_save_phase: str = "write"  # "write" | "before_rename" | "before_latest" | "retention"
    nan_at_steps: list[int] = field(default_factory=list)  # replace the loss with NaN at these steps
    raise_at_step: int = 0  # raise torch.OutOfMemoryError in this step
    sleep_at_step: int = 0  # sleep `sleep_s` seconds in this step (a hung rank)
    sleep_s: float = 60.0
    signal_at_step: int = 0  # send itself SIGTERM after this step (a preemption notice)


@dataclass
class TrainConfig:
    """One training run. The global batch is the one batch-size setting; per-device batch and
    GradCache micro-batches are derived from it and the world size."""

    output_dir: str = "???"  # run directory: config.yaml, metrics.jsonl, checkpoints/, model.safetensors
    seed: int = 0
    global_batch_size: int = 256
    # Per-device micro-batch for GradCache accumulation; 0: the whole per-device batch at once.
    micro_batch_size: int = 0
    # Run length: exactly one of max_steps and num_epochs (epochs of data.num_samples) is > 0.
    max_steps: int = 0
    num_epochs: float = 0.0
    precision: str = "bf16"  # "fp32" | "bf16" (autocast) | "fp16" (autocast + grad scaling)
    device: str = "auto"  # "auto": cuda if available, else cpu
    # torch.compile the model; unset (null): on CUDA devices only.
    compile: Optional[bool] = None
    grad_checkpointing: bool = False
    # Skip the padding after each caption, which cannot change its feature (exact; see
    # clip/models/text_packing.py): a batch's captions sorted by length into this many groups, each
    # computed up to its longest caption. 0: every caption padded to context_length, as OpenAI does.
    text_packing_groups: int = 8
    # LiT-style tuning (arXiv:2111.07991): freeze a tower's weights (and its BatchNorm statistics).
    lock_image: bool = False
    lock_text: bool = False
    # CPU bitwise reproducibility: deterministic kernels; num_threads > 0 pins torch's thread count.
    deterministic: bool = False
    num_threads: int = 0
    # Write clip.data.synthetic's shards and zero-shot set into this directory first if it has none
    # (the smoke run's self-made data; single-process runs only).
    synthetic_data: str = ""
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    nan: NanConfig = field(default_factory=NanConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


class ConfigError(ValueError):
    """A config value is unknown, mistyped or contradicts another; the message names the key.

    Raised before any side effect (no run directory, no process group); `scripts/train.py` exits 2."""


_RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_FAULT_SAVE_PHASES = ("write", "before_rename", "before_latest", "retention")


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise ConfigError listing every cross-field problem, each with its full key."""
    import re

    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
        check(value in allowed, f"{key}={value!r} is not one of {allowed}")

    one_of("precision", cfg.precision, PRECISIONS)
    one_of("dist.parallel", cfg.dist.parallel, PARALLELISMS)
    one_of("dist.backend", cfg.dist.backend, ("auto", "nccl", "gloo"))
    one_of("optim.schedule", cfg.optim.schedule, LR_SCHEDULES)
    one_of("log.wandb", cfg.log.wandb, WANDB_MODES)
    one_of("fault.kill_in_save_phase", cfg.fault.kill_in_save_phase, _FAULT_SAVE_PHASES)
    check(cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), f"device={cfg.device!r} must be auto, cpu or cuda[:N]")
    check(cfg.global_batch_size > 0, f"global_batch_size={cfg.global_batch_size} must be > 0")
    check(cfg.micro_batch_size >= 0, f"micro_batch_size={cfg.micro_batch_size} must be >= 0 (0: no accumulation)")
    check(cfg.text_packing_groups >= 0, f"text_packing_groups={cfg.text_packing_groups} must be >= 0 (0: padded text)")
    check(
        (cfg.max_steps > 0) != (cfg.num_epochs > 0),
        f"set exactly one of max_steps={cfg.max_steps} and num_epochs={cfg.num_epochs} to a positive value",
    )
    check(cfg.num_threads >= 0, f"num_threads={cfg.num_threads} must be >= 0 (0: torch's default)")
    check(not (cfg.lock_image and cfg.lock_text), "lock_image and lock_text cannot both be true: nothing would train")
    check(
        not (cfg.num_epochs > 0 and cfg.data.resampled),
        "num_epochs needs epoch mode (data.resampled=false); resampled data is endless: set max_steps",
    )

    o = cfg.optim
    check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas} must be two values in [0, 1)")
    check(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    check(o.grad_clip_norm >= 0, f"optim.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0: no clipping)")

    c = cfg.checkpoint
    check(c.keep_last >= 2, f"checkpoint.keep_last={c.keep_last} must be >= 2 so that a failed save never leaves no checkpoint")
    check(c.every_steps >= 0, f"checkpoint.every_steps={c.every_steps} must be >= 0 (0: only at the end)")
    check(c.resume != "", "checkpoint.resume must be auto, never or a checkpoint path")

    check(cfg.log.every_steps >= 1, f"log.every_steps={cfg.log.every_steps} must be >= 1")
    check(
        not cfg.log.run_name or re.fullmatch(_RUN_NAME_PATTERN, cfg.log.run_name) is not None,
        f"log.run_name={cfg.log.run_name!r} may hold only letters, digits, '.', '_' and '-'",
    )
    check(cfg.eval.every_steps >= 0, f"eval.every_steps={cfg.eval.every_steps} must be >= 0")
    check(cfg.eval.batch_size > 0, f"eval.batch_size={cfg.eval.batch_size} must be > 0")
    check(cfg.dist.timeout_s > 0, f"dist.timeout_s={cfg.dist.timeout_s} must be > 0")
    check(cfg.dist.watchdog_s >= 0, f"dist.watchdog_s={cfg.dist.watchdog_s} must be >= 0 (0: off)")
    check(cfg.nan.max_consecutive >= 1, f"nan.max_consecutive={cfg.nan.max_consecutive} must be >= 1")
    check(cfg.nan.max_total >= 0, f"nan.max_total={cfg.nan.max_total} must be >= 0 (0: no limit)")

    try:
        validate_model_config(cfg.model, prefix="model")
    except ValueError as error:
        problems.append(str(error).removeprefix("invalid model config: "))
    try:
        validate_loss_config(cfg.loss, cfg.model, prefix="loss")
    except ValueError as error:
        problems.append(str(error).removeprefix("invalid loss config: "))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def get_batch_plan(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-device batch, GradCache micro-batches per step) from the global batch and the world size."""
    if cfg.global_batch_size % world_size:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by the world size {world_size}"
        )
    per_device = cfg.global_batch_size // world_size
    micro = cfg.micro_batch_size or per_device
    if per_device % micro:
        raise ConfigError(
            f"micro_batch_size={micro} does not divide the per-device batch {per_device} "
            f"(global_batch_size={cfg.global_batch_size} / {world_size} devices)"
        )
    return per_device, per_device // micro
