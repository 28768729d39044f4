"""Ranks and collectives: the one module that knows how many processes there are and which one we are.

The rest of the library asks here instead of reading RANK/WORLD_SIZE or calling torch.distributed
itself, so a single process without a process group is simply world size 1 and rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` [n, ...] concatenated in rank order -> [world_size * n, ...], differentiable.

    The backward pass sends each slice's gradient back to the rank that owns it, summed over the
    ranks whose loss used it (a reduce-scatter). That sum is what makes a loss on gathered
    features exact: see clip/loss.py. All ranks must pass tensors of the same shape.
    """
    if get_world_size() == 1:
        return x
    # torch's differentiable all-gather (it deprecates torch.distributed.nn's for this one); the
    # result waits for the collective on first use.
    return functional_collectives.all_gather_single(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
