"""Numeric precision of a training step: autocast and gradient scaling per `precision` setting.

- fp32: everything in float32.
- bf16: parameters and optimizer state in float32, matmuls autocast to bfloat16; no scaling needed
  (bfloat16 has float32's exponent range). The default.
- fp16: autocast to float16 with dynamic loss scaling (GradScaler): float16 gradients underflow
  without it.
LayerNorm always computes in float32 (clip.models.layers.LayerNorm).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ContextManager

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def get_autocast(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of fresh autocast contexts (one per forward pass) for this precision."""
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16; None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
