"""Building blocks shared by the towers, with OpenAI's parameter names.

Parameter names (`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, ...) are those of OpenAI's released
checkpoints, so their state dicts load without renaming. Tensors are batch-first: [B, L, D].
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Sequences packed back to back without padding: (number of sequences, tokens each) per group.
PackedGroups = tuple[tuple[int, int], ...]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least float32 whatever the input and weight dtypes, returned in the input dtype.

    OpenAI's fp16 checkpoints rely on this: normalising in half precision loses accuracy. Float64 inputs
    stay float64, so exactness tests in double precision are not capped by a float32 round trip.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(compute_dtype) if self.weight is not None else None
        bias = self.bias.to(compute_dtype) if self.bias is not None else None
        return F.layer_norm(x.to(compute_dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """GELU approximation x * sigmoid(1.702 x) that OpenAI's CLIP models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def get_activation(name: str) -> type[nn.Module]:
    return {"gelu": nn.GELU, "quick_gelu": QuickGELU}[name]


class Attention(nn.Module):
    """Multi-head self-attention on fused SDPA (flash / memory-efficient kernels where available).

    Parameters are laid out like `nn.MultiheadAttention` (`in_proj_weight` [3D, D] holding q, k, v
    stacked; `out_proj`), which is how OpenAI's checkpoints store them.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation, which OpenAI's image towers kept.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, packed_groups: PackedGroups | None = None
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]; or, with `packed_groups` ((n, L) per group), x [T, D] holding
        groups of n sequences of L tokens back to back (T = sum of n * L) -> [T, D]."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D] or [T, 3D]
        if packed_groups is None:
            return self.out_proj(self._attend(qkv, is_causal))
        sizes = [n * length for n, length in packed_groups]
        # out_proj per group: its saved input is then a view of what SDPA saves anyway; one out_proj
        # over the concatenated groups would keep a second [T, D] copy per layer until backward.
        out = [
            self.out_proj(self._attend(group.view(n, length, -1), is_causal).view(n * length, -1))
            for group, (n, length) in zip(qkv.split(sizes), packed_groups)
        ]
        return torch.cat(out)  # [T, D]

    def _attend(self, qkv: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """qkv [B, L, 3D] (q, k, v stacked along the last dimension) -> attention output [B, L, D]."""
        batch, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, Dh]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # [B, H, L, Dh]
        return out.transpose(1, 2).reshape(batch, length, width)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, mlp_width)), ("gelu", activation()), ("c_proj", nn.Linear(mlp_width, width))]
            )
        )

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, packed_groups: PackedGroups | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal, packed_groups=packed_groups)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks (`resblocks.{i}` in OpenAI's key layout)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: type[nn.Module]):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_width, activation) for _ in range(layers)]
        )
        # Recompute each block's activations in backward instead of storing them (set by
        # CLIP.set_grad_checkpointing): memory O(layers) block inputs instead of all intermediates.
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, packed_groups: PackedGroups | None = None
    ) -> torch.Tensor:
        """x [B, L, D], or [T, D] packed sequences (see `Attention.forward`)."""
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, is_causal, packed_groups, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal, packed_groups=packed_groups)
        return x
