"""Ranks, collectives, process groups and model wrapping: the only reader of RANK / WORLD_SIZE.

The rest of the library asks here instead of reading RANK/WORLD_SIZE or calling torch.distributed
itself, so a single process without a process group is simply world size 1 and rank 0.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and SLURM `srun` with
one task per device (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT exported by
the sbatch script, see scripts/slurm/train.sbatch). A plain `python` launch is a world of one with
no process group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch import nn

from clip.config import DistConfig


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


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun" | "slurm" | "single"


def read_launch_env() -> LaunchEnv:
    """This process's place in the job, from the launcher's environment (no process group needed)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise RuntimeError(
                f"srun launch without {' and '.join(missing)}: export them in the sbatch script "
                f"(see scripts/slurm/train.sbatch), or launch with torchrun"
            )
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return LaunchEnv(0, 0, 1, "single")


def get_device(device: str, local_rank: int) -> torch.device:
    """`auto`: this process's GPU (cuda:LOCAL_RANK) if there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return resolved


def init_distributed(cfg: DistConfig, launch: LaunchEnv, device: torch.device) -> None:
    """Join the job's process group: NCCL on GPU, gloo on CPU. A world of one needs none."""
    if launch.world_size == 1 or is_distributed():
        return
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if launch.launcher == "slurm":
        # torch's env:// rendezvous reads RANK / WORLD_SIZE; srun names them differently.
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    dist.init_process_group(
        backend=backend,
        timeout=timedelta(seconds=cfg.timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@dataclass(frozen=True)
class StepControl:
    """The step-boundary agreement of all ranks (RELIABILITY.md 2.0), from one all-gather per step."""

    has_batch: bool  # every rank has its next batch (else all end the epoch together)
    finite: bool  # loss and gradient norm are finite on every rank
    stop: bool  # some rank was asked to stop (SIGTERM / SIGUSR1)
    nonfinite_ranks: tuple[int, ...]
    losses: tuple[float, ...]  # each rank's loss of this step
    grad_norm: float  # the global gradient norm (rank 0's; every rank computes the same after the reduction)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


def _average_gradient(param: torch.Tensor) -> None:
    # Averaging is linear, so a gradient accumulated over several backward passes may be averaged
    # after each of them: already-averaged parts are equal on all ranks and stay unchanged.
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


def exchange_step_control(
    has_batch: bool, stop: bool, loss: torch.Tensor | float, grad_norm: torch.Tensor | float, device: torch.device
) -> StepControl:
    """All ranks learn every rank's flags, loss and gradient norm with a single tiny collective.

    `loss` and `grad_norm` may be device tensors of a step the device is still computing: reading
    them here, with the flags, is the one point where a training step waits for the device (the
    host runs ahead until then, e.g. fetching the next batch). A step is finite on a rank when both
    are. An all-gather rather than a MIN/MAX all-reduce: the same one round trip, and the error
    messages can name the rank that went non-finite.
    """
    flags = torch.tensor([float(has_batch), float(stop)], dtype=torch.float64)
    values = [_as_float64(value, device) for value in (loss, grad_norm)]
    local = torch.cat([flags.to(device, non_blocking=True), *values])  # [4]
    if is_distributed():
        gathered = torch.empty(dist.get_world_size() * 4, dtype=torch.float64, device=device)
        dist.all_gather_single(gathered, local)
        local = gathered
    rows = local.view(-1, 4).cpu().tolist()  # [W, 4]: has_batch, stop, loss, grad_norm
    finite = [math.isfinite(row[2]) and math.isfinite(row[3]) for row in rows]
    return StepControl(
        has_batch=all(row[0] == 1.0 for row in rows),
        finite=all(finite),
        stop=any(row[1] == 1.0 for row in rows),
        nonfinite_ranks=tuple(rank for rank, ok in enumerate(finite) if not ok),
        losses=tuple(row[2] for row in rows),
        grad_norm=rows[0][3],
    )


def _as_float64(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A [1] float64 tensor on `device`, without waiting for the device (host values are copied
    asynchronously; tensors are converted where they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(1).to(device=device, dtype=torch.float64)
    return torch.tensor([float(value)], dtype=torch.float64).to(device, non_blocking=True)


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True only if `ok` on every rank (a MIN all-reduce)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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
        from torch.distributed.fsdp import fully_shard

        from clip.models.layers import ResidualAttentionBlock

        for module in model.modules():
            if isinstance(module, ResidualAttentionBlock):
                fully_shard(module)
        scalars = {param for param in model.parameters() if param.ndim == 0}
        for param in scalars:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(_average_gradient)
        return fully_shard(model, ignored_params=scalars)
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: the gradients live in DDP's communication buckets instead of being
    # copied into them, which saves one fp32 copy of the gradients and a memcpy per step.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    )


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks (a SUM all-reduce)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()
