"""Training memory per device, derived from the model config: weights, gradients, AdamW state,
activations (with and without activation checkpointing) and the contrastive loss's logits.

The activation model lists the tensors that autograd keeps for backward in *this* library's towers
(clip/models/), so it follows their implementation; scripts/measure_memory.py and tests/test_plan.py
check it against the memory of real forward + backward passes on CPU. Under bf16/fp16 autocast:
- weights, gradients and AdamW moments are fp32 (autocast keeps fp32 master weights), and autocast
  caches a half-precision copy of every matmul/conv weight from forward until backward ends;
- LayerNorm keeps its input in fp32 (clip.models.layers.LayerNorm normalises in fp32); matmul
  inputs, attention tensors and activation-function tensors are half precision;
- the image tower's residual stream is half precision; the text tower's stays fp32 (its token
  embedding is fp32, and fp32 + bf16 promotes to fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

from clip.config import ModelConfig, TextConfig, VisionConfig
from clip.flops import vit_tokens

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLELISMS = ("ddp", "fsdp")
FP32_BYTES = 4
GIB = 2**30
# The plain loss, (CE(logits) + CE(logits^T)) / 2 on fp32 [local, global] logits, holds about this
# many bytes per logit element at its peak in backward: the scaled logits and both log-softmax
# outputs (kept from forward) plus the gradients of both directions and of the logits.
LOGITS_BYTES_PER_ELEMENT = 24
# PyTorch's CUDA caching allocator rounds and fragments: budget this fraction on top of live tensors,
# plus a fixed amount for the CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers.
ALLOCATOR_FRACTION = 0.10
FIXED_OVERHEAD_BYTES = 2.0 * GIB


def compute_bytes(precision: str) -> int:
    """Bytes per element of matmul inputs and outputs: half precision under autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    return FP32_BYTES if precision == "fp32" else 2


def transformer_block_bytes_per_token(width: int, mlp_width: int, heads: int, quick_gelu: bool, precision: str) -> int:
    """Bytes one ResidualAttentionBlock keeps for backward, per token."""
    half = compute_bytes(precision)
    layer_norm_inputs = 2 * width * FP32_BYTES  # ln_1, ln_2
    # ln_1 output (the qkv input), q/k/v, the attention output (SDPA writes it in [B, L, H, Dh]
    # layout, so merging heads is a view and out_proj reads the same tensor), ln_2 output.
    attention = 6 * width * half + heads * FP32_BYTES  # + SDPA's log-sum-exp per head
    # c_fc output (activation input), activation output (c_proj input); QuickGELU also keeps sigmoid(1.702 x).
    mlp = (3 if quick_gelu else 2) * mlp_width * half
    return layer_norm_inputs + attention + mlp


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes per sample: `image` and `text` are kept from forward until backward;
    `recompute` is what backward adds while it recomputes one checkpointed block (0 without
    checkpointing)."""

    image: float
    text: float
    recompute: float = 0.0

    @property
    def kept(self) -> float:
        return self.image + self.text

    @property
    def peak(self) -> float:
        return self.kept + self.recompute


@dataclass(frozen=True)
class _Stack:
    kept: float
    recompute: float


def _transformer_stack(
    tokens: int, width: int, mlp_width: int, heads: int, layers: int, quick_gelu: bool, precision: str,
    residual_bytes: int, grad_checkpointing: bool,
) -> _Stack:
    block = tokens * transformer_block_bytes_per_token(width, mlp_width, heads, quick_gelu, precision)
    if not grad_checkpointing:
        return _Stack(kept=layers * block, recompute=0.0)
    # Each block keeps only its input (the residual stream); backward recomputes one block at a time.
    return _Stack(kept=layers * tokens * width * residual_bytes, recompute=block)


def _vit(cfg: VisionConfig, quick_gelu: bool, precision: str, grad_checkpointing: bool) -> _Stack:
    half = compute_bytes(precision)
    tokens = vit_tokens(cfg, training=True)
    # Under autocast the patch conv keeps a half-precision copy of the image (in fp32, the input itself).
    image_copy = 3 * cfg.image_size**2 * half if half < FP32_BYTES else 0
    ln_pre_input = tokens * cfg.width * FP32_BYTES
    # ln_post reads the class token, a view of the last block's output: in fp32 it keeps that whole
    # tensor alive (under autocast it keeps a [D] fp32 copy).
    last_output = tokens * cfg.width * FP32_BYTES if half == FP32_BYTES else 0
    blocks = _transformer_stack(
        tokens, cfg.width, cfg.mlp_width, cfg.heads, cfg.layers, quick_gelu, precision,
        residual_bytes=half, grad_checkpointing=grad_checkpointing,
    )
    return _Stack(kept=image_copy + ln_pre_input + last_output + blocks.kept, recompute=blocks.recompute)


def _text(cfg: TextConfig, quick_gelu: bool, precision: str, grad_checkpointing: bool) -> _Stack:
    return _transformer_stack(
        cfg.context_length, cfg.width, cfg.mlp_width, cfg.heads, cfg.layers, quick_gelu, precision,
        residual_bytes=FP32_BYTES, grad_checkpointing=grad_checkpointing,
    )


def _resnet(cfg: VisionConfig, precision: str, grad_checkpointing: bool) -> _Stack:
    """ModifiedResNet. Each conv + BatchNorm (+ ReLU) keeps two tensors of the conv's output size
    (BatchNorm's input; the ReLU's output, which the next conv or pool reads); the avgpools keep
    their outputs. Checkpointing is per stage, as in ModifiedResNet: stages keep their inputs and
    backward recomputes one stage at a time."""
    half = compute_bytes(precision)
    width, side = cfg.width, cfg.image_size // 2
    image_copy = 3 * cfg.image_size**2 if half < FP32_BYTES else 0
    stem = image_copy + 2 * side * side * (width // 2 + width // 2 + width)  # conv1..3 (+ BN, ReLU)
    side //= 2
    stem += side * side * width  # stem avgpool output: the first stage's input
    stage_elements, stage_outputs, inplanes = [], [], width
    for stage, num_blocks in enumerate(cfg.stage_blocks):
        planes, stride = width * 2**stage, 1 if stage == 0 else 2
        elements = 0
        for block in range(num_blocks):
            out_side = side // stride if block == 0 else side
            elements += 2 * side * side * planes * 2  # conv1, conv2
            if out_side != side:
                elements += out_side * out_side * planes  # anti-aliasing avgpool before conv3
            elements += 2 * out_side * out_side * 4 * planes  # conv3's BN input; ReLU after the residual add
            if block == 0:  # downsample branch: avgpool (kernel 1 in the first stage) output, BN input
                elements += out_side * out_side * (inplanes + 4 * planes)
            side, inplanes = out_side, 4 * planes
        stage_elements.append(elements)
        stage_outputs.append(side * side * inplanes)
    attention_pool = 3 * (side * side + 1) * inplanes  # key/value input, keys, values (one query)
    if grad_checkpointing:
        kept = stem + sum(stage_outputs[:-1]) + attention_pool
        return _Stack(kept=kept * half, recompute=max(stage_elements) * half)
    return _Stack(kept=(stem + sum(stage_elements) + attention_pool) * half, recompute=0.0)


def activation_bytes_per_sample(cfg: ModelConfig, precision: str, grad_checkpointing: bool = False) -> ActivationBytes:
    """Bytes kept for backward per image-caption pair (inputs and the loss's logits excluded)."""
    quick_gelu = cfg.activation == "quick_gelu"
    if cfg.vision.kind == "vit":
        image = _vit(cfg.vision, quick_gelu, precision, grad_checkpointing)
    elif cfg.vision.kind == "resnet":
        image = _resnet(cfg.vision, precision, grad_checkpointing)
    else:
        raise ValueError(
            f"activation memory is modelled for 'vit' and 'resnet' towers, not model.vision.kind={cfg.vision.kind!r}"
        )
    text = _text(cfg.text, quick_gelu, precision, grad_checkpointing)
    # Backward recomputes one block at a time, of either tower.
    return ActivationBytes(image=image.kept, text=text.kept, recompute=max(image.recompute, text.recompute))


def input_bytes_per_sample(cfg: ModelConfig) -> int:
    """An fp32 image and int64 token ids on the device."""
    return 3 * cfg.vision.image_size**2 * FP32_BYTES + cfg.text.context_length * 8


def logits_bytes(local_batch: int, global_batch: int, chunk_rows: int = 0) -> float:
    """Loss memory on one device: its [local, global] logits at once, or `chunk_rows` rows at a time."""
    rows = min(chunk_rows, local_batch) if chunk_rows > 0 else local_batch
    return LOGITS_BYTES_PER_ELEMENT * rows * global_batch


# Parameters inside the blocks that activation checkpointing wraps (see CLIP.set_grad_checkpointing).
CHECKPOINTED_PREFIXES = ("transformer.resblocks.", "visual.transformer.resblocks.", "visual.layer")


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    # Matmul and conv weights: autocast keeps a half-precision copy of each of these from forward
    # to backward...
    autocast_cast: int
    # ...except, under activation checkpointing, of those inside checkpointed blocks, which are
    # recast when backward recomputes the block.
    autocast_cast_checkpointed: int


def count_parameters(cfg: ModelConfig) -> ParameterCounts:
    """Count parameters by building the model on the meta device (no memory, well under a second)."""
    import torch

    from clip.models import CLIP

    with torch.device("meta"):
        model = CLIP(cfg)
    total = cast = cast_checkpointed = 0
    for name, param in model.named_parameters():
        total += param.numel()
        # Embeddings are looked up or added in their own dtype (the vision positional embedding is
        # cast per call, not cached); gains and biases are a rounding error.
        if param.ndim >= 2 and "embedding" not in name:
            cast += param.numel()
            if name.startswith(CHECKPOINTED_PREFIXES):
                cast_checkpointed += param.numel()
    return ParameterCounts(total=total, autocast_cast=cast, autocast_cast_checkpointed=cast_checkpointed)


def autocast_weight_bytes(params: ParameterCounts, precision: str, grad_checkpointing: bool) -> float:
    """Half-precision weight copies that autocast's cache hands to autograd, alive until backward."""
    if precision == "fp32":
        return 0.0
    cast = params.autocast_cast - (params.autocast_cast_checkpointed if grad_checkpointing else 0)
    return 2.0 * cast


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device at the training step's peak (gradients and activations counted together,
    which is exact once gradient accumulation has allocated every gradient)."""

    weights: float
    gradients: float
    optimizer: float
    autocast_weights: float
    inputs: float
    activations: float
    logits: float
    feature_cache: float

    @property
    def live(self) -> float:
        return (
            self.weights + self.gradients + self.optimizer + self.autocast_weights
            + self.inputs + self.activations + self.logits + self.feature_cache
        )

    @property
    def allocator(self) -> float:
        return ALLOCATOR_FRACTION * self.live + FIXED_OVERHEAD_BYTES

    @property
    def total(self) -> float:
        return self.live + self.allocator


def estimate_memory(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    local_batch: int,
    global_batch: int,
    num_devices: int,
    precision: str = "bf16",
    grad_checkpointing: bool = False,
    parallel: str = "ddp",
    loss_chunk_rows: int = 0,
    params: ParameterCounts | None = None,
) -> MemoryEstimate:
    """Peak training memory of one device running micro-batches of `micro_batch` out of its
    `local_batch` share of `global_batch`, with AdamW in fp32.

    `parallel="fsdp"` shards weights, gradients and AdamW state over the devices (the unsharded
    copy of the block being computed is not counted); "ddp" replicates them (its gradients are
    views into its communication buckets, `gradient_as_bucket_view`, so the buckets add nothing).
    """
    if parallel not in PARALLELISMS:
        raise ValueError(f"parallel={parallel!r} is not one of {PARALLELISMS}")
    params = params or count_parameters(cfg)
    shards = num_devices if parallel == "fsdp" else 1
    activations = activation_bytes_per_sample(cfg, precision, grad_checkpointing)
    # Gradient accumulation (GradCache) keeps the features of the whole local batch and the gathered
    # global batch, image and text, in fp32.
    feature_cache = 2 * (local_batch + global_batch) * cfg.embed_dim * FP32_BYTES if micro_batch < local_batch else 0
    return MemoryEstimate(
        weights=FP32_BYTES * params.total / shards,
        gradients=FP32_BYTES * params.total / shards,
        optimizer=2 * FP32_BYTES * params.total / shards,
        autocast_weights=autocast_weight_bytes(params, precision, grad_checkpointing) / shards,
        inputs=local_batch * input_bytes_per_sample(cfg),
        activations=micro_batch * activations.peak,
        logits=logits_bytes(local_batch, global_batch, loss_chunk_rows),
        feature_cache=feature_cache,
    )
