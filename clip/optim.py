"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from clip.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only.

    No decay for parameters with fewer than 2 dimensions: LayerNorm/BatchNorm gains, biases, the
    class token, logit_scale and logit_bias. Positional embeddings (2-D) decay, as in OpenCLIP's
    training code that produced the reference results. The learning rate is set every step from
    `get_lr` (clip.step.TrainStep).
    """
    decay, no_decay, scalars = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay if param.ndim == 1 else scalars).append(param)
    # Scalars get their own group: under FSDP2 they are plain tensors among sharded ones, and the
    # multi-tensor AdamW kernels want one kind of tensor per group.
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": scalars, "weight_decay": 0.0},
    ]
    # fused: one kernel over all tensors of a group on CUDA, vectorised on CPU (5x faster than the
    # default per-tensor loop there), no host synchronisation; and it can skip an update on the
    # device (clip.step.apply_update).
    return torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True
    )


def get_lr(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine to min_lr (or constant)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    # The first step after warmup runs at the full rate; the decay ends at max_steps + 1.
    progress = (step - cfg.warmup_steps - 1) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
