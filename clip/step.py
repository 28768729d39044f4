"""One optimizer step of the global batch, and the rule for steps whose numbers are not finite.

`TrainStep` is what the trainer and scripts/bench_train.py both run:

1. `prepare(batch)`: the batch's uint8 images to the device, finished there (the transform's float
   conversion and Normalize), in the tower's memory format; its token ids packed on the host
   (`text_packing_groups`) and copied.
2. `__call__(images, texts, step=, lr=)`: forward and backward of this rank's share of the
   global-batch loss (clip.objective, GradCache micro-batches), the gradient norm (clipped), then a
   `StepOutcome`: every rank's [loss, gradient norm] all-gathered *on the device*, where the verdict
   "skip this update" (any non-finite value on any rank) is computed. The fused AdamW update and the
   temperature clamp read that verdict on the device too (`apply_update`), so nothing in a step
   waits for the device.
3. The host reads a step's numbers one step late (`StepLedger`): while step N+1 runs on the device,
   step N's copy to the host has long finished. A skipped step is counted and logged; too many in a
   row (or in total) stop the run with `NonFiniteLossError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from clip.config import NanConfig, TrainConfig
from clip.distributed import all_gather_on_device, get_rank
from clip.models import CLIP
from clip.models.text_packing import PackedText
from clip.objective import forward_backward, prepare_texts

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # temperature floor of 0.01 (CLIP paper, section 2.5)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive (or total) steps had a non-finite loss or gradient norm."""


@dataclass(frozen=True)
class StepReport:
    """One step's numbers as the host reads them: the same on every rank."""

    finite: bool  # loss and gradient norm are finite on every rank
    nonfinite_ranks: tuple[int, ...]
    losses: tuple[float, ...]  # each rank's loss of the step
    grad_norm: float  # the global gradient norm (rank 0's; every rank computes the same after the reduction)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)


class StepOutcome:
    """Every rank's loss and gradient norm of one step, gathered and judged on the device.

    `skip` is a 0-dim float32 device tensor, 1.0 when any rank's loss or gradient norm is
    non-finite: the optimizer skips the update on it (`apply_update`) without the host waiting for
    the step to finish. The numbers are copied to the host as soon as the device has them;
    `report()` reads them, best once the device is busy with a later step. An all-gather rather
    than a reduction, so that a report can name the non-finite rank.
    """

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor):
        self.loss = loss.detach()  # this rank's, on the device
        values = torch.stack([loss.detach().reshape(()), grad_norm.detach().reshape(())]).float()  # [2]
        values = all_gather_on_device(values).view(-1, 2)  # [W, 2]: loss, grad_norm
        self.skip = torch.isfinite(values).all().logical_not().float()
        # A non-blocking copy to the CPU lands in pinned memory; the event marks its end.
        self._host_values = values.to("cpu", non_blocking=True)
        self._copied = None
        if values.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def report(self) -> StepReport:
        """The step's numbers on the host (waits for the copy if the device has not finished it)."""
        if self._copied is not None:
            self._copied.synchronize()
        rows = self._host_values.tolist()
        finite = [math.isfinite(loss) and math.isfinite(grad_norm) for loss, grad_norm in rows]
        return StepReport(
            finite=all(finite),
            nonfinite_ranks=tuple(rank for rank, ok in enumerate(finite) if not ok),
            losses=tuple(loss for loss, _ in rows),
            grad_norm=rows[0][1],
        )


class TrainStep:
    """The training step (see the module docstring). `faults` is the test-only fault injector
    (clip.lifecycle.Faults); its hooks are integer compares when no fault is configured."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: CLIP,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        autocast: Callable[[], ContextManager],
        loss_fn: Callable[..., torch.Tensor],
        num_microbatches: int,
        image_format: torch.memory_format,
        finish_images: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        faults: Any = None,
    ):
        self.cfg, self.model, self.module, self.optimizer = cfg, model, module, optimizer
        self.scaler, self.autocast, self.loss_fn = scaler, autocast, loss_fn
        self.num_microbatches, self.image_format, self.device = num_microbatches, image_format, device
        self.finish_images, self.faults = finish_images, faults

    def prepare(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | list[PackedText]]:
        """The loader's host batch as the step's device inputs (nothing waits for the device)."""
        images = self.finish_images(images.to(self.device, non_blocking=True, memory_format=self.image_format))
        texts = prepare_texts(
            texts, self.model.eot_token_id, self.cfg.text_packing_groups, self.num_microbatches, self.device
        )
        return images, texts

    def __call__(self, images: torch.Tensor, texts: torch.Tensor | list[PackedText], *, step: int, lr: float) -> StepOutcome:
        """Optimizer step `step` at learning rate `lr`; the caller zeroes nothing, reads nothing."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            if self.faults is not None:
                self.faults.before_step(step)
            loss, grad_norm = self.forward_backward(images, texts)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(self._oom_guidance(step, images.shape[0])) from error
        if self.faults is not None:
            loss = self.faults.after_backward(step, loss)
        outcome = StepOutcome(loss, grad_norm)
        apply_update(self.model, self.optimizer, self.scaler, skip=outcome.skip)
        self.optimizer.zero_grad(set_to_none=True)
        return outcome

    def forward_backward(self, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of this rank's share of the global-batch loss; returns (loss, global grad norm),
        both 0-dim device tensors. The gradients are unscaled (fp16) and clipped."""
        loss = forward_backward(
            self.module, images, texts, self.loss_fn, self.num_microbatches, autocast=self.autocast,
            grad_scaler=self.scaler,
        )  # fmt: skip
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip_norm = self.cfg.optim.grad_clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        return loss, grad_norm

    def _oom_guidance(self, step: int, per_device_batch: int) -> str:
        cfg, device = self.cfg, self.device
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        return (
            f"out of memory on rank {get_rank()} at step {step}: per-device batch {per_device_batch} in "
            f"{self.num_microbatches} micro-batch(es), image size {cfg.model.vision.image_size}, precision "
            f"{cfg.precision}, peak allocated {peak:.1f} GiB. Try grad_checkpointing=true, a smaller micro_batch_size "
            f"(GradCache keeps the global batch and its gradients exact), precision=bf16, or dist.parallel=fsdp "
            f"for large towers"
        )


def apply_update(
    model: CLIP, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, *, skip: torch.Tensor
) -> None:
    """AdamW and the temperature clamp, skipped on the device when `skip` (a 0-dim float32 device
    tensor, StepOutcome.skip) is 1.0: the fused kernel then leaves parameters, moments and step
    counts bitwise untouched, so no rank waits for the verdict on the host."""
    # GradScaler's contract with fused optimizers (torch/amp/grad_scaler.py, GradScaler.step): the
    # kernel skips the update where `found_inf` is nonzero; `grad_scale` None because the step has
    # unscaled the gradients already. A non-fused AdamW refuses these attributes loudly.
    optimizer.found_inf, optimizer.grad_scale = skip, None
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale
    if scaler is not None:
        # fp16: the loss scale must move alike on every rank, and GradScaler has seen only this rank's
        # gradients (FSDP shards them). Reading the agreed verdict costs fp16 steps one wait for the
        # device; bf16 and fp32 steps have none.
        if skip.item():
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        else:
            scaler.update()
    clamp_logit_scale(model)


@torch.no_grad()
def clamp_logit_scale(model: CLIP) -> None:
    """Keep the learned log-temperature in [0, ln 100] (CLIP paper: logits scaled by at most 100)."""
    model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def logit_scale_value(model: CLIP) -> float:
    """The log-temperature as a Python float (reads the device)."""
    value = model.logit_scale.detach()
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


@dataclass
class Progress:
    """How far the run is: saved in every checkpoint."""

    step: int = 0  # optimizer steps taken or skipped: the step of the last batch consumed
    samples_seen: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0


@dataclass(frozen=True)
class _UnreadStep:
    step: int
    lr: float
    outcome: StepOutcome


class StepLedger:
    """Reads each step's numbers on the host, in order and once, one step late unless asked now.

    A skipped (non-finite) step is counted and logged; `nan.max_consecutive` skipped steps in a
    row, or `nan.max_total` in all, raise NonFiniteLossError naming the steps, ranks, losses, the
    learning rate, the temperature and the last good checkpoint (`last_checkpoint()`'s answer).
    """

    def __init__(self, cfg: NanConfig, progress: Progress, model: CLIP, last_checkpoint: Callable[[], str]):
        self.cfg, self.progress, self.model, self.last_checkpoint = cfg, progress, model, last_checkpoint
        self._unread: _UnreadStep | None = None

    def defer(self, step: int, lr: float, outcome: StepOutcome) -> None:
        """Account the previous step (finished on the device before this one started: reading it
        costs no device time) and keep this one unread. A divergence is thus noticed one step late,
        and the run stops before this step is logged or saved."""
        self.settle()
        self._unread = _UnreadStep(step, lr, outcome)

    def settle(self) -> StepReport | None:
        """Account the unread step now (the host waits for the device) and return its report."""
        if self._unread is None:
            return None
        unread, self._unread = self._unread, None
        report = unread.outcome.report()
        progress = self.progress
        if report.finite:
            progress.consecutive_nonfinite = 0
            return report
        progress.nonfinite_steps += 1
        progress.consecutive_nonfinite += 1
        logger.warning(
            "step %d: non-finite loss or gradient on rank(s) %s (losses %s, lr %.3g, "
            "logit_scale %.4f after step %d): skipped",
            unread.step, list(report.nonfinite_ranks), _format_losses(report.losses), unread.lr,
            logit_scale_value(self.model), progress.step,
        )  # fmt: skip
        too_many_in_row = progress.consecutive_nonfinite >= self.cfg.max_consecutive
        too_many = self.cfg.max_total and progress.nonfinite_steps >= self.cfg.max_total
        if too_many_in_row or too_many:
            first = unread.step - progress.consecutive_nonfinite + 1
            what = f"steps {first}-{unread.step}" if too_many_in_row else f"{progress.nonfinite_steps} steps in total"
            raise NonFiniteLossError(
                f"non-finite loss at {what} on rank(s) {list(report.nonfinite_ranks)} "
                f"(loss={_format_losses(report.losses)}, lr={unread.lr:.3g}, "
                f"logit_scale={logit_scale_value(self.model):.4f} after step {progress.step}); "
                f"last good checkpoint: {self.last_checkpoint()}"
            )
        return report


def _format_losses(losses: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{value:.4g}" for value in losses) + "]"
