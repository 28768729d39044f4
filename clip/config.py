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
    # Attempts for a `pipe:` command that fails before producing any data (backoff 1 s, 2 s, 4 s, ...).
    open_retries: int = 3
