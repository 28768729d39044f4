"""Everything applied to a model from outside before it trains, in torchtitan's order.

`build_train_module(model, ...)` returns the module a training step calls: locked towers (LiT),
channels_last for ResNets, activation checkpointing, torch.compile, then DDP or FSDP2. The model
code itself never knows about any of these (clip/models/ imports nothing distributed).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from clip.config import DistConfig, TrainConfig
from clip.distributed import average_across_ranks_, is_distributed
from clip.models import CLIP
from clip.models.layers import ResidualAttentionBlock
from clip.objective import ContrastiveModel

logger = logging.getLogger(__name__)


def build_train_module(cfg: TrainConfig, model: CLIP, device: torch.device) -> tuple[nn.Module, torch.memory_format]:
    """The module a training step calls, and the memory format its images should have.

    Applied in this order: `lock_image`/`lock_text`, channels_last for ResNets,
    `grad_checkpointing`, `compile` (unset: on CUDA only, where it pays; on CPU inductor's compile
    time outweighs the gain for short runs), then `dist.parallel` (DDP or FSDP2).
    """
    apply_tower_lock(model, lock_image=cfg.lock_image, lock_text=cfg.lock_text)
    image_format = apply_channels_last(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    objective = ContrastiveModel(model)
    compile_model = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compile_model:
        objective.compile()
    logger.info("torch.compile %s, image memory format %s", "on" if compile_model else "off", image_format)
    return apply_data_parallel(objective, cfg.dist, device), image_format


def apply_tower_lock(model: CLIP, *, lock_image: bool, lock_text: bool) -> None:
    """LiT (arXiv:2111.07991): a locked tower gets no gradients and keeps eval mode (BatchNorm statistics)."""
    towers = []
    if lock_image:
        towers.append([model.visual])
    if lock_text:
        towers.append([model.token_embedding, model.transformer, model.ln_final])
    for modules in towers:
        for module in modules:
            module.eval()
            module.requires_grad_(False)
    if lock_text:
        model.positional_embedding.requires_grad_(False)
        model.text_projection.requires_grad_(False)


def apply_channels_last(model: CLIP) -> torch.memory_format:
    """Convolution weights of a ResNet tower in channels_last (NHWC), the layout cuDNN's tensor-core
    kernels (and oneDNN's on CPU) work in, so no layout conversion runs around each convolution.
    Returns the memory format the tower's input images should have. ViT and timm towers are left as
    they are (a ViT has a single convolution, the patch embedding)."""
    if model.config.vision.kind != "resnet":
        return torch.contiguous_format
    model.visual.to(memory_format=torch.channels_last)
    return torch.channels_last


def apply_data_parallel(model: nn.Module, cfg: DistConfig, device: torch.device) -> nn.Module:
    """Wrap the (already checkpointed and compiled) model for data parallelism: DDP or FSDP2.

    FSDP2 shards every residual attention block of both towers, then the rest of the model
    (embeddings, projections, a ResNet or timm trunk) as one unit. FSDP2 cannot shard scalars
    (logit_scale, logit_bias): they stay replicated and their gradients are averaged by a hook.
    A world of one is left unwrapped.
    """
    if not is_distributed():
        return model
    if cfg.parallel == "fsdp":
        for module in model.modules():
            if isinstance(module, ResidualAttentionBlock):
                fully_shard(module)
        scalars = {param for param in model.parameters() if param.ndim == 0}
        for param in scalars:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_average_gradient)
        return fully_shard(model, ignored_params=scalars)
    # gradient_as_bucket_view: the gradients live in DDP's communication buckets instead of being
    # copied into them, which saves one fp32 copy of the gradients and a memcpy per step.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    )


def _average_gradient(param: torch.Tensor) -> None:
    # Averaging is linear, so a gradient accumulated over several backward passes may be averaged
    # after each of them: already-averaged parts are equal on all ranks and stay unchanged.
    average_across_ranks_(param.grad)
