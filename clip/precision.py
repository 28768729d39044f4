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

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # keys: clip.config.PRECISIONS


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype matmuls autocast to under `precision` ("fp32", "bf16", "fp16"); None for fp32."""
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(_AUTOCAST_DTYPES)}")
    return _AUTOCAST_DTYPES[precision]


def get_autocast(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of fresh autocast contexts (one per forward pass) for this precision."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def build_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16; None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
