"""One training step's exact gradients: the training-time forward and gradient accumulation.

`ContrastiveModel` is what the trainer wraps in DDP or FSDP2: its forward returns everything the
loss needs, temperature and bias included, because DDP and FSDP2 only reduce gradients that flow
through the wrapped module's forward. (`CLIP.forward` keeps OpenAI's contract and returns logits.)

`forward_backward` accumulates into `.grad` the gradients of the loss of the whole global batch
(local batch x world size x micro-batches), split into `num_microbatches` micro-batches per rank
to bound activation memory, with the negatives of the whole batch kept (GradCache,
arXiv:2101.06983):

1. every micro-batch's features, without grad (activations freed at once);
2. the loss of the whole batch on those features, and its gradient with respect to them, the
   temperature and the bias (the loss all-gathers the features of every rank);
3. every micro-batch again, with grad, backpropagating its slice of the cached feature gradient
   into the encoders; the temperature and bias gradients go through the last micro-batch's
   forward, so that DDP reduces them with everything else. Ranks synchronise gradients only on
   the last micro-batch.

Both passes must compute the same features: the random state (dropout, patch dropout) is saved
before each micro-batch of pass 1 and restored before pass 2, and BatchNorm running statistics
are restored after pass 1, so they are updated once per micro-batch, as without caching. BatchNorm
normalises with each micro-batch's statistics, so for ResNets the result is exact relative to
training on K micro-batches with per-micro-batch BatchNorm, as DDP is relative to per-GPU
BatchNorm.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from clip.models import CLIP
from clip.models.text_packing import PackedText, pack_text

# (image_features [n, E], text_features [n, E], exp(logit_scale) [], logit_bias [] or None)
ModelOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class ContrastiveModel(nn.Module):
    """Training-time forward of a CLIP: normalised features, temperature and bias, for the loss.

    Checkpoint and export `self.model` (the CLIP), whose state-dict keys are OpenAI's.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, texts: torch.Tensor | PackedText) -> ModelOutput:
        image_features = self.model.encode_image(images, normalize=True)
        text_features = self.model.encode_text(texts, normalize=True)
        return image_features, text_features, self.model.logit_scale.exp(), self.model.logit_bias


def forward_backward(
    model: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor | PackedText | Sequence[PackedText],
    loss_fn: Callable[..., torch.Tensor],
    num_microbatches: int = 1,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    grad_scaler: Optional[torch.amp.GradScaler] = None,
) -> torch.Tensor:
    """Add to `.grad` the gradients of the global-batch loss and return the rank's loss, detached.

    `model` is a `ContrastiveModel`, bare or wrapped in DDP or FSDP2; `images` [B, 3, H, W] and
    `texts` [B, L] (or one `PackedText` per micro-batch, `prepare_texts`; a bare one for a single
    micro-batch) are this rank's batch, B divisible by `num_microbatches`; `loss_fn` is a
    `ClipLoss` or `SigLipLoss`; `autocast` makes the model's forward context, e.g.
    `functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)`; `grad_scaler` (fp16) scales
    what is backpropagated, as `grad_scaler.scale(loss).backward()` would. The returned loss, averaged
    over ranks, is the loss of the global batch. Gradients equal those of one un-accumulated
    forward and backward of the global batch (up to BatchNorm, see the module docstring).
    """
    if num_microbatches < 1 or images.shape[0] % num_microbatches:
        raise ValueError(
            f"num_microbatches={num_microbatches} must be >= 1 and divide the local batch size {images.shape[0]}"
        )
    if isinstance(texts, PackedText):
        texts = [texts]
    text_chunks = texts.chunk(num_microbatches) if isinstance(texts, torch.Tensor) else texts
    rows = [len(chunk) for chunk in text_chunks]
    image_rows = [images.shape[0] // num_microbatches] * num_microbatches
    if rows != image_rows:
        raise ValueError(f"{rows} text rows per micro-batch for {image_rows} images per micro-batch")
    if num_microbatches == 1:
        with autocast():
            outputs = model(images, text_chunks[0])
        loss = loss_fn(*outputs)
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()
        return loss.detach()

    image_chunks = images.chunk(num_microbatches)

    # 1. Features of every micro-batch, without grad.
    rng_states, image_features, text_features = [], [], []
    with torch.no_grad(), _restored_batchnorm_statistics(model):
        for image_chunk, text_chunk in zip(image_chunks, text_chunks):
            rng_states.append(_get_rng_state(images.device))
            with autocast():
                image_chunk_features, text_chunk_features, logit_scale, logit_bias = model(image_chunk, text_chunk)
            image_features.append(image_chunk_features)
            text_features.append(text_chunk_features)

    # 2. Whole-batch loss; gradient with respect to the cached features, temperature and bias.
    cached = [torch.cat(image_features), torch.cat(text_features), logit_scale, logit_bias]  # [B, E] x 2
    cached = [None if t is None else t.detach().requires_grad_() for t in cached]
    loss = loss_fn(*cached)
    cached_grads = torch.autograd.grad(loss, [t for t in cached if t is not None])
    if grad_scaler is not None:
        cached_grads = grad_scaler.scale(list(cached_grads))
    image_grads, text_grads = cached_grads[0].chunk(num_microbatches), cached_grads[1].chunk(num_microbatches)
    parameter_grads = cached_grads[2:]  # temperature (and bias)

    # 3. Each micro-batch again, with grad, replaying the random state of pass 1.
    for index, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks)):
        is_last = index == num_microbatches - 1
        _set_rng_state(rng_states[index], images.device)
        with _gradient_sync(model, enabled=is_last):
            with autocast():
                outputs = model(image_chunk, text_chunk)
            tensors, grads = [outputs[0], outputs[1]], [image_grads[index], text_grads[index]]
            if is_last:
                tensors += [t for t in outputs[2:] if t is not None]
                grads += parameter_grads
            pairs = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]  # a locked tower's have no graph
            torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
    return loss.detach()


def prepare_texts(
    texts: torch.Tensor, eot_token_id: int, num_groups: int, num_microbatches: int, device: torch.device
) -> torch.Tensor | list[PackedText]:
    """The host's token rows `texts` [B, L] on `device`, for `forward_backward`: as they are when
    `num_groups` is 0, else each micro-batch packed into `num_groups` groups (exact, and cheaper:
    clip/models/text_packing.py). Packing reads the host's copy, so the host never waits for the device.
    """
    if num_groups == 0:
        return texts.to(device, non_blocking=True)
    packed = [pack_text(chunk, eot_token_id, num_groups) for chunk in texts.chunk(num_microbatches)]
    if device.type == "cuda":  # only a copy from pinned memory leaves the host free at once
        packed = [p.pin_memory() for p in packed]
    return [p.to(device, non_blocking=True) for p in packed]


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Let the wrapper reduce gradients across ranks in this backward pass, or only accumulate them."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def _restored_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Undo the running-statistics updates of BatchNorm layers made inside the block."""
    buffers = [
        buffer
        for module in model.modules()
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)


def _get_rng_state(device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    accelerator_state = None if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)
    return torch.get_rng_state(), accelerator_state


def _set_rng_state(state: tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    cpu_state, accelerator_state = state
    torch.set_rng_state(cpu_state)
    if accelerator_state is not None:
        torch.get_device_module(device).set_rng_state(accelerator_state, device)
