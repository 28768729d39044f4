"""Ranks, collectives and process groups: the only reader of RANK / WORLD_SIZE.

The rest of the library asks here instead of reading RANK/WORLD_SIZE or calling torch.distributed
itself, so a single process without a process group is simply world size 1 and rank 0.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and SLURM `srun` with
one task per device (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT exported by
the sbatch script, see scripts/slurm/train.sbatch). A plain `python` launch is a world of one with
no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives

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
    timeout = timedelta(seconds=cfg.timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    _create_host_group(timeout)  # with the job's timeout: new_group's default is gloo's 30 minutes


def destroy_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()  # all groups, the host group included


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@dataclass(frozen=True)
class HostFlags:
    """What every rank must know before the next step starts: host facts, so
    agreeing on them never waits for a device."""

    has_batch: bool  # every rank has its next batch (else all end the epoch together)
    stop: bool  # some rank was asked to stop (SIGTERM / SIGUSR1)


def exchange_host_flags(has_batch: bool, stop: bool) -> HostFlags:
    """All ranks agree on the flags: one MIN all-reduce of two bytes in host memory, on a gloo group.

    Host memory on both ends: under NCCL the same exchange of device tensors would wait for
    everything queued on the device (the step in flight) before the host could read the flags.
    """
    flags = torch.tensor([has_batch, not stop], dtype=torch.uint8)  # MIN: every rank has a batch, none stops
    if is_distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=_host_group())
    every_rank_has_batch, no_rank_stops = flags.tolist()
    return HostFlags(has_batch=bool(every_rank_has_batch), stop=not no_rank_stops)


# (the default group it belongs to, a gloo group over the same ranks)
_HOST_GROUP: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None


def _create_host_group(timeout: timedelta | None = None) -> None:
    """A gloo group over all ranks for host-to-host exchanges, whatever the default backend (so CPU
    tests run the same code as NCCL jobs). Every rank must call this at the same point."""
    global _HOST_GROUP
    _HOST_GROUP = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=timeout))


def _host_group() -> dist.ProcessGroup:
    if _HOST_GROUP is None or _HOST_GROUP[0] is not dist.group.WORLD:
        # A process group made outside init_distributed (tests), or a new one since: every rank
        # reaches its first exchange at the same point.
        _create_host_group()
    return _HOST_GROUP[1]


def all_gather_on_device(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` [n] concatenated in rank order -> [world_size * n], without gradient.

    A collective on the tensor's device: under NCCL it is queued behind the work already there, and
    the host does not wait for it."""
    if not is_distributed():
        return x
    gathered = x.new_empty(dist.get_world_size() * x.numel())
    dist.all_gather_single(gathered, x.contiguous().view(-1))
    return gathered


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [n_r, ...] (counts may differ between ranks) concatenated in rank order."""
    if not is_distributed():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(c)] for part, c in zip(gathered, counts)])


def max_across_ranks_(tensor: torch.Tensor) -> None:
    """In place: the elementwise maximum of `tensor` over all ranks."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def average_across_ranks_(tensor: torch.Tensor) -> None:
    """In place: the mean of `tensor` over all ranks (a SUM all-reduce, then a division)."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True only if `ok` on every rank (a MIN all-reduce)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks (a SUM all-reduce)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()
