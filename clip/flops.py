"""Compute cost of a CLIP, derived from its config: FLOPs per sample and model-FLOPs utilisation (MFU).

Conventions (both kept explicit, because published tables mix them):
- A MAC is one multiply-accumulate. We count the MACs of matrix products only: linear layers,
  convolutions and the two attention products (q @ k^T and scores @ v). Normalisation, activations,
  softmax, bias adds, pooling and embedding lookups are left out: they are memory-bound and a
  fraction of a percent of the total.
- A FLOP here is a real floating-point operation: one MAC = `FLOPS_PER_MAC` = 2 FLOPs. MFU and the
  accelerator peaks below use FLOPs. OpenCLIP's `docs/model_profile.csv` "gflops" columns are FLOPs in
  this sense (they come from `torch.utils.flop_counter`, which also counts 2 per MAC); older tables
  made with fvcore report MACs under the name "flops".
- Causal attention in the text tower is counted as full L x L products (as OpenCLIP and
  `FlopCounterMode` do), although flash kernels skip the masked half.
- Training is `TRAINING_FORWARD_MULTIPLE` = 3 forward passes (backward costs two: gradients with
  respect to inputs and to weights). Recomputation (activation checkpointing, GradCache's extra
  no-grad forward) is *not* counted: MFU measures useful model FLOPs (PaLM, arXiv:2204.02311, app. B).
- The contrastive loss's logits, [B, N] = image features @ all text features^T, cost N * embed_dim
  MACs per sample for a global batch N (the text-to-image logits are the transpose). That is 0.03%
  of a ViT-L-14 forward at N = 32768 and 0.2% of a ViT-B-32's; it is counted when `global_batch` is
  given. SigLIP's sigmoid loss has the same product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from clip.config import ModelConfig, TextConfig, VisionConfig

FLOPS_PER_MAC = 2
TRAINING_FORWARD_MULTIPLE = 3


@dataclass(frozen=True)
class FlopsBreakdown:
    """Forward multiply-accumulates per sample (one image and one caption), by part."""

    image_macs: float
    text_macs: float
    logits_macs: float = 0.0

    @property
    def macs(self) -> float:
        return self.image_macs + self.text_macs + self.logits_macs

    @property
    def image_flops(self) -> float:
        return FLOPS_PER_MAC * self.image_macs

    @property
    def text_flops(self) -> float:
        return FLOPS_PER_MAC * self.text_macs

    @property
    def forward_flops(self) -> float:
        return FLOPS_PER_MAC * self.macs

    @property
    def training_flops(self) -> float:
        """Forward + backward FLOPs per sample, without recomputation."""
        return TRAINING_FORWARD_MULTIPLE * self.forward_flops


def _transformer_macs(tokens: int, width: int, mlp_width: int, layers: int) -> float:
    """Pre-LN Transformer blocks on `tokens` tokens: qkv + out projections, attention products, MLP."""
    projections = tokens * (4 * width * width + 2 * width * mlp_width)
    # q @ k^T and scores @ v, each tokens x tokens x width over all heads together.
    attention = 2 * tokens * tokens * width
    return layers * (projections + attention)


def vit_tokens(cfg: VisionConfig, training: bool) -> int:
    """Tokens a ViT's blocks see: class token + patches, fewer under FLIP patch dropout in training."""
    num_patches = cfg.grid_size**2
    if training and cfg.patch_dropout > 0:
        # The same rounding as PatchDropout: at least one patch is kept.
        num_patches = max(1, int(num_patches * (1.0 - cfg.patch_dropout)))
    return 1 + num_patches


def _vit_macs(cfg: VisionConfig, embed_dim: int, training: bool) -> float:
    patch_embedding = cfg.grid_size**2 * (3 * cfg.patch_size**2) * cfg.width
    blocks = _transformer_macs(vit_tokens(cfg, training), cfg.width, cfg.mlp_width, cfg.layers)
    projection = cfg.width * embed_dim  # class token only
    return patch_embedding + blocks + projection


def _conv_macs(side: int, in_channels: int, out_channels: int, kernel: int = 1) -> float:
    """A stride-1 'same' convolution producing a side x side map."""
    return side * side * in_channels * out_channels * kernel * kernel


def _resnet_macs(cfg: VisionConfig, embed_dim: int) -> float:
    """OpenAI's ModifiedResNet: 3-conv stem, anti-aliased bottlenecks (avgpool before the strided
    1x1 conv), and attention pooling whose single query is the mean feature."""
    width, side = cfg.width, cfg.image_size // 2
    macs = side * side * 3 * (width // 2) * 9  # conv1, stride 2: output side is image_size / 2
    macs += _conv_macs(side, width // 2, width // 2, 3) + _conv_macs(side, width // 2, width, 3)
    side //= 2  # stem avgpool
    inplanes = width
    for stage, num_blocks in enumerate(cfg.stage_blocks):
        planes, stride = width * 2**stage, 1 if stage == 0 else 2
        for block in range(num_blocks):
            out_side = side // stride if block == 0 else side
            macs += _conv_macs(side, inplanes, planes) + _conv_macs(side, planes, planes, 3)
            macs += _conv_macs(out_side, planes, 4 * planes)
            if block == 0 and (stride > 1 or inplanes != 4 * planes):
                macs += _conv_macs(out_side, inplanes, 4 * planes)  # downsample branch
            side, inplanes = out_side, 4 * planes
    channels, positions = inplanes, side * side + 1  # feature map + its mean
    keys_values = 2 * positions * channels * channels
    query = channels * channels
    attention = 2 * positions * channels
    return macs + keys_values + query + attention + channels * embed_dim


def _text_macs(cfg: TextConfig, embed_dim: int, length: Optional[int] = None) -> float:
    """One caption over its first `length` positions (default: all context_length of them)."""
    blocks = _transformer_macs(length or cfg.context_length, cfg.width, cfg.mlp_width, cfg.layers)
    return blocks + cfg.width * embed_dim  # projection of the end-of-text token only


def text_training_flops(cfg: TextConfig, embed_dim: int, length: int) -> float:
    """Training FLOPs (forward x 3) of one caption computed over its first `length` positions: what a
    packed text tower (clip/models/text_packing.py) executes, against `length=context_length` padded."""
    return TRAINING_FORWARD_MULTIPLE * FLOPS_PER_MAC * _text_macs(cfg, embed_dim, length)


def skipped_text_flops(cfg: ModelConfig, group_shapes: Iterable[tuple[int, int]]) -> float:
    """Training FLOPs that text packing does not execute, for groups of (captions, positions kept),
    against padding every caption to context_length."""
    padded = text_training_flops(cfg.text, cfg.embed_dim, cfg.text.context_length)
    return sum(n * (padded - text_training_flops(cfg.text, cfg.embed_dim, length)) for n, length in group_shapes)


def flops_per_sample(cfg: ModelConfig, global_batch: int = 0, training: bool = True) -> FlopsBreakdown:
    """Forward cost per image-caption pair, from the config alone.

    `global_batch` > 0 adds the contrastive logits against the whole global batch. `training`
    applies FLIP patch dropout (the eval forward sees every patch). Timm towers are not modelled
    (their architectures are open-ended): count those with `torch.utils.flop_counter`.
    """
    vision = cfg.vision
    if vision.kind == "vit":
        image_macs = _vit_macs(vision, cfg.embed_dim, training)
    elif vision.kind == "resnet":
        image_macs = _resnet_macs(vision, cfg.embed_dim)
    else:
        raise ValueError(
            f"flops_per_sample models 'vit' and 'resnet' image towers, not model.vision.kind={vision.kind!r}; "
            "count a timm tower with torch.utils.flop_counter.FlopCounterMode"
        )
    logits_macs = global_batch * cfg.embed_dim if global_batch > 0 else 0.0
    return FlopsBreakdown(image_macs=image_macs, text_macs=_text_macs(cfg.text, cfg.embed_dim), logits_macs=logits_macs)


def training_flops_per_sample(cfg: ModelConfig, global_batch: int = 0) -> float:
    """Model FLOPs of one training sample (forward x 3), the numerator of MFU."""
    return flops_per_sample(cfg, global_batch=global_batch, training=True).training_flops


# Dense (no 2:4 sparsity) peak FLOP/s per device from NVIDIA's datasheets. "fp32" is the IEEE
# (non-tensor-core) rate; "tf32" the tensor-core rate that torch uses for fp32 matmuls when
# `torch.backends.cuda.matmul.allow_tf32` is set.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100-pcie": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12},
    # H200 and GH200 have H100 SXM's compute (more and faster memory).
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    # V100 has no bf16 tensor cores.
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
}

# Device memory in GiB (the larger SKU where two exist; pass the real figure to the planner).
DEVICE_MEMORY_GIB: dict[str, float] = {"h100-sxm": 80, "h100-pcie": 80, "h200": 141, "a100": 80, "v100": 32}


def get_device_kind(device_name: str) -> Optional[str]:
    """Map `torch.cuda.get_device_name()` (e.g. 'NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-40GB')
    or a short name ('h100', 'a100') to a key of PEAK_FLOPS; None when unknown (e.g. a CPU)."""
    name = device_name.lower()
    if "h200" in name:  # also "GH200"
        return "h200"
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else "h100-sxm"
    for kind in ("a100", "v100"):
        if kind in name:
            return kind
    return None


def get_peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Peak FLOP/s of one device at `precision` ('bf16', 'fp16', 'tf32', 'fp32'); None if unknown,
    in which case no MFU should be reported."""
    kind = get_device_kind(device_name)
    return PEAK_FLOPS[kind].get(precision) if kind else None


def get_mfu(samples_per_second: float, flops_per_sample: float, peak_flops: Optional[float], num_devices: int = 1) -> Optional[float]:
    """Model-FLOPs utilisation: achieved model FLOP/s over the devices' peak; None without a peak."""
    if not peak_flops:
        return None
    return samples_per_second * flops_per_sample / (peak_flops * num_devices)


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m clip.flops [MODEL ...]`: a Markdown table of forward and training FLOPs per sample."""
    import argparse

    from clip.models import get_model_config, list_models

    parser = argparse.ArgumentParser(
        prog="python -m clip.flops", description="Forward and training (x3) FLOPs per sample of registered models."
    )
    parser.add_argument("models", nargs="*", help="names from clip.list_models() or OpenAI's (default: all but timm)")
    names = parser.parse_args(argv).models or [n for n in list_models() if get_model_config(n).vision.kind != "timm"]
    try:  # every name before the first row, so a typo is one line, not a traceback under a half-printed table
        configs = [get_model_config(name) for name in names]
    except KeyError as error:
        parser.error(error.args[0])
    print("| model | image GFLOPs | text GFLOPs | forward GFLOPs | training GFLOPs (x3) |")
    print("|---|---:|---:|---:|---:|")
    for name, config in zip(names, configs):
        flops = flops_per_sample(config)
        print(
            f"| {name} | {flops.image_flops / 1e9:.2f} | {flops.text_flops / 1e9:.2f} | "
            f"{flops.forward_flops / 1e9:.2f} | {flops.training_flops / 1e9:.2f} |"
        )


if __name__ == "__main__":
    main()
