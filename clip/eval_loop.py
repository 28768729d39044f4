"""Running a model over an evaluation dataset on every rank, with results in single-process order.

Each rank encodes its share of the data; the per-sample results are gathered back into dataset
order, so every rank holds what a single process would have computed. Every rank also makes the same
number of encoder calls (a rank that has run out of data encodes a throw-away batch), so a model
sharded with FSDP, which all-gathers weights inside each call, never waits on a rank that has
stopped. Used by zero-shot classification and retrieval (clip.zero_shot), multilabel classification
(clip.multilabel) and the linear probe's features (clip.linear_probe).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from clip.data.eval_shards import TarEvalDataset, collate_eval_batch
from clip.distributed import all_gather_rows, get_rank, get_world_size, max_across_ranks_


def batches_in_lockstep(
    dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device, progress: bool, desc: str
) -> Iterator[tuple[torch.Tensor, Any, torch.Tensor | None]]:
    """This rank's share of `dataset` as (images, targets, keys), then (throw-away images, None,
    None) until every rank is done, so that all ranks make the same number of encoder calls.

    Rank r takes indices r, r + world, ... of a map-style dataset and shards r, r + world, ... of a
    `TarEvalDataset`; any other iterable dataset must split itself across ranks. Keys sort samples
    into single-process order: the dataset index for map-style datasets, (rank, position) otherwise.
    """
    rank, world = get_rank(), get_world_size()
    if isinstance(dataset, IterableDataset):
        local = dataset.for_rank(rank, world) if isinstance(dataset, TarEvalDataset) else dataset
        first_key, key_step, num_batches = rank << 40, 1, None
    else:
        local = Subset(dataset, range(rank, len(dataset), world))
        first_key, key_step, num_batches = rank, world, math.ceil(len(local) / batch_size)
    loader = DataLoader(
        local,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_eval_batch,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    position = 0
    with tqdm(total=num_batches, desc=desc, unit="batch", disable=not progress or rank != 0) as bar:
        while True:
            batch, error = None, None
            try:
                batch = next(batches, None)
            except Exception as caught:  # e.g. an unreadable shard: every rank must stop, not wait
                error = caught
            # [failed, has a batch, C, H, W]: one MAX over ranks tells every rank whether any rank
            # failed or still has data, and gives a rank without data the shape of its throw-away batch.
            state = torch.zeros(5, dtype=torch.long, device=device)
            state[0] = error is not None
            if batch is not None:
                state[1] = 1
                state[2:] = torch.tensor(batch[0].shape[1:])
            max_across_ranks_(state)
            if error is not None:
                raise error
            if state[0].item():
                raise RuntimeError(f"evaluation of {desc!r} failed on another rank (its log names the cause)")
            if state[1].item() == 0:
                return
            if batch is None:
                yield torch.zeros(1, *state[2:].tolist(), device=device), None, None
                continue
            images, targets = batch
            keys = first_key + key_step * torch.arange(position, position + len(images), device=device)
            position += len(images)
            bar.update(1)
            yield images.to(device, non_blocking=True), targets, keys


def gather_in_order(keys: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All ranks' (keys, columns...) sorted by key: the order a single process would have seen."""
    all_keys = all_gather_rows(keys)
    order = torch.sort(all_keys, stable=True).indices
    return (all_keys[order], *(all_gather_rows(column)[order] for column in columns))


def cat_or_empty(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    # A rank may get no samples at all (fewer samples or shards than ranks).
    return torch.cat(parts) if parts else empty


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    # The trainer calls these hooks mid-run: give every module back its own mode (model.train()
    # would also switch a locked tower that the trainer keeps in eval mode).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def map_images_in_order(
    model: nn.Module,
    dataset: Dataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    empty: torch.Tensor,
    target_shape: Sequence[int] = (),
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`encode(images)` rows [N, ...], targets [N, *target_shape]) of the whole `dataset` in dataset
    order, on every rank, the model in eval mode. `encode` sets its own precision (autocast).

    `empty` is the output of a run in which no rank has a sample (no encoder call to learn the
    output's shape and dtype from); a rank without samples otherwise takes them from its throw-away
    batch."""
    outputs, targets, keys = [], [], []
    no_output = empty
    with eval_mode(model):
        for images, batch_targets, batch_keys in batches_in_lockstep(
            dataset, batch_size=batch_size, num_workers=num_workers, device=device, progress=progress, desc=desc
        ):
            encoded = encode(images)
            no_output = encoded[:0]
            if batch_keys is None:
                continue
            outputs.append(encoded)
            targets.append(torch.as_tensor(batch_targets, device=device))
            keys.append(batch_keys)
    no_keys = torch.zeros(0, dtype=torch.long, device=device)
    no_targets = torch.zeros(0, *target_shape, dtype=torch.long, device=device)
    _, output, target = gather_in_order(
        cat_or_empty(keys, no_keys), cat_or_empty(outputs, no_output.to(device)), cat_or_empty(targets, no_targets)
    )
    return output, target
