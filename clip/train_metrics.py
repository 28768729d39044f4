"""What the trainer reports: `train/*` metrics over the steps since the last log line, console lines.

Metric keys (docs/training.md lists them all): `train/loss` (the global batch's), `train/lr`,
`train/logit_scale` (exp of the learned log-temperature), `train/grad_norm`, `train/samples_per_s`,
`train/data_wait` (share of wall time spent waiting for the loader), `train/text_positions_computed`,
`train/samples_seen`, `train/nonfinite_steps`, `train/loss_scale` (fp16), `train/mfu` and
`train/mfu_executed` (CUDA, ViT and ResNet towers), `train/epoch`, `data/skipped/<reason>`.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch

from clip.config import ModelConfig, TrainConfig, to_model_config
from clip.data.records import SKIP_REASONS
from clip.distributed import sum_across_ranks
from clip.flops import get_mfu, get_peak_flops, skipped_text_flops, training_flops_per_sample
from clip.logger import MetricsLogger
from clip.models import CLIP
from clip.models.text_packing import PackedText
from clip.step import Progress, StepReport, logit_scale_value


class Interval:
    """Wall time, steps, data-wait time and text positions computed since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.num_steps = 0
        self.data_seconds = 0.0
        self.text_rows = 0
        self.text_positions = 0  # what the text tower computed (fewer than padded when packed)
        self.padded_text_positions = 0
        self.skipped_text_flops = 0.0  # training FLOPs of the positions packing skipped

    def count_text(self, texts: torch.Tensor | list[PackedText], padded: torch.Tensor, cfg: ModelConfig) -> None:
        """Shapes only: nothing is read from the device."""
        self.text_rows += padded.shape[0]
        self.padded_text_positions += padded.numel()
        if isinstance(texts, torch.Tensor):
            self.text_positions += texts.numel()
            return
        self.text_positions += sum(p.num_tokens for p in texts)
        self.skipped_text_flops += skipped_text_flops(cfg, (group.shape for packed in texts for group in packed.groups))

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


class MfuMeter:
    """Model FLOPs utilisation: `train/mfu` counts padded text, as OpenCLIP's FLOPs table does, so it
    compares with OpenCLIP; `train/mfu_executed` subtracts what text packing skipped (what the
    device ran). Only on CUDA, for ViT and ResNet towers (timm trunks have no FLOPs formula here)."""

    def __init__(self, flops_per_sample: float, peak_flops: float | None):
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops  # peak None: no MFU logged

    @classmethod
    def for_device(cls, model_config: ModelConfig, precision: str, global_batch: int, device: torch.device) -> "MfuMeter":
        if model_config.vision.kind not in ("vit", "resnet") or device.type != "cuda":
            return cls(0.0, None)
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            precision = "tf32"
        flops = training_flops_per_sample(model_config, global_batch=global_batch)
        return cls(flops, get_peak_flops(torch.cuda.get_device_name(device), precision))

    def metrics(self, samples_per_s: float, interval: Interval, world_size: int) -> dict[str, float]:
        mfu = get_mfu(samples_per_s, self.flops_per_sample, self.peak_flops, world_size)
        if mfu is None:
            return {}
        executed = self.flops_per_sample - interval.skipped_text_flops / max(interval.text_rows, 1)  # rank 0's share
        return {"train/mfu": mfu, "train/mfu_executed": get_mfu(samples_per_s, executed, self.peak_flops, world_size)}


def train_metrics(
    report: StepReport, *, lr: float, logit_scale: float, interval: Interval, global_batch: int, progress: Progress,
    loss_scale: float | None,
) -> dict[str, float]:  # fmt: skip
    metrics = {
        "train/loss": report.mean_loss,
        "train/lr": lr,
        "train/logit_scale": math.exp(logit_scale),
        "train/grad_norm": report.grad_norm,
        "train/samples_per_s": interval.num_steps * global_batch / interval.seconds,
        "train/data_wait": interval.data_seconds / interval.seconds,
        "train/text_positions_computed": interval.text_positions / max(interval.padded_text_positions, 1),
        "train/samples_seen": progress.samples_seen,
        "train/nonfinite_steps": progress.nonfinite_steps,
    }
    if loss_scale is not None:
        metrics["train/loss_scale"] = loss_scale
    return metrics


class StepReporter:
    """The `train/*` metrics of the steps since the last log line, to metrics.jsonl, wandb and the console."""

    def __init__(self, cfg: TrainConfig, model: CLIP, scaler, metrics_logger: MetricsLogger, device, world_size: int,
                 max_steps: int):  # fmt: skip
        self.cfg, self.model, self.scaler, self.metrics_logger = cfg, model, scaler, metrics_logger
        self.meter = MfuMeter.for_device(to_model_config(cfg.model), cfg.precision, cfg.global_batch_size, device)
        self.device, self.world_size, self.max_steps = device, world_size, max_steps

    def log(self, step: int, report: StepReport, lr: float, interval: Interval, progress: Progress, epoch: int,
            skipped: Counter) -> None:  # fmt: skip
        metrics = train_metrics(
            report, lr=lr, logit_scale=logit_scale_value(self.model), interval=interval,
            global_batch=self.cfg.global_batch_size, progress=progress,
            loss_scale=self.scaler.get_scale() if self.scaler is not None else None,
        )  # fmt: skip
        metrics.update(self.meter.metrics(metrics["train/samples_per_s"], interval, self.world_size))
        metrics["train/epoch"] = epoch
        metrics.update(skip_metrics(skipped, self.device))
        self.metrics_logger.log(step, metrics)
        self.metrics_logger.print(console_line(step, self.max_steps, metrics))


def skip_metrics(skipped: Counter, device: torch.device) -> dict[str, float]:
    """Samples skipped so far on all ranks, per reason (`data/skipped/<reason>`; a collective call)."""
    totals = sum_across_ranks([float(skipped[reason]) for reason in SKIP_REASONS], device)
    return {f"data/skipped/{reason}": total for reason, total in zip(SKIP_REASONS, totals)}


def console_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    line = (
        f"step {step}/{max_steps} | loss {m['train/loss']:.4f} | temp {1 / m['train/logit_scale']:.4f} | "
        f"lr {m['train/lr']:.2e} | {m['train/samples_per_s']:.1f} samples/s | data {100 * m['train/data_wait']:.0f}%"
    )
    return line + (f" | MFU {100 * m['train/mfu']:.1f}%" if "train/mfu" in m else "")


def eval_line(step: int, metrics: dict[str, float]) -> str:
    return f"step {step} zero-shot: " + ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items()))


def final_line(name: str, num_classes: int, metrics: dict[str, float]) -> str:
    return (f"final zero-shot top-1 on {name}: {metrics[f'eval/{name}_top1']:.3f} "
            f"(chance {1 / num_classes:.3f}, {num_classes} classes)")  # fmt: skip
