"""Measure training memory on CPU and compare it with the planner's estimate (clip/memory.py).

Each case runs in a fresh subprocess: build the model, run one warm-up training step (forward,
contrastive loss, backward), free the gradients, then measure one more step by the process's
resident memory (Linux /proc/self/status): what forward keeps for backward (`after forward`) and the
high-water mark over forward + backward (`peak`), both above the memory held before the step.
glibc is told to serve every allocation of 64 KiB or more by mmap, so freed tensors leave the
resident set at once and the figures follow the live tensors closely.

    PYTHONPATH=. python scripts/measure_memory.py            # the table in docs/benchmarks.md
    PYTHONPATH=. python scripts/measure_memory.py --case ViT-B-32:2:2:32:bf16:0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


@dataclass
class Case:
    """A registry model with its ViT cut to `vision_layers` blocks and its text tower to
    `text_layers` (0 keeps the registry's depth; ResNets keep theirs), trained at `batch` in
    `precision`."""

    model: str
    vision_layers: int
    text_layers: int
    batch: int
    precision: str
    grad_checkpointing: bool

    @classmethod
    def parse(cls, text: str) -> "Case":
        model, vision_layers, text_layers, batch, precision, checkpointing = text.split(":")
        return cls(model, int(vision_layers), int(text_layers), int(batch), precision, checkpointing == "1")

    def __str__(self) -> str:
        return f"{self.model}:{self.vision_layers}:{self.text_layers}:{self.batch}:{self.precision}:{int(self.grad_checkpointing)}"

    def model_config(self):
        from clip.models import get_model_config

        cfg = get_model_config(self.model)
        if self.vision_layers and cfg.vision.kind == "vit":
            cfg.vision.layers = self.vision_layers
        if self.text_layers:
            cfg.text.layers = self.text_layers
        return cfg


# Small models that run in seconds on two cores, in both precisions, with and without checkpointing.
DEFAULT_CASES = [
    Case("tiny-vit", 0, 0, 64, "fp32", False),
    Case("ViT-B-32", 2, 2, 32, "fp32", False),
    Case("ViT-B-32", 2, 2, 32, "bf16", False),
    Case("ViT-B-32", 4, 4, 32, "fp32", True),
    Case("ViT-B-32", 4, 4, 32, "bf16", True),
    Case("ViT-B-32-quickgelu", 2, 2, 32, "bf16", False),
    Case("ViT-B-16", 1, 1, 16, "bf16", False),
    Case("tiny-resnet", 0, 0, 32, "fp32", False),
    Case("RN50", 0, 1, 8, "bf16", False),
    Case("RN50", 0, 1, 8, "bf16", True),
]


def _memory_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def _reset_peak() -> None:
    # Writing 5 resets the VmHWM high-water mark to the current resident set (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def run_case(case: Case) -> dict:
    """Measure one case in this process (the child side)."""
    import gc

    import torch
    import torch.nn.functional as F

    from clip.models import CLIP
    from clip.precision import get_autocast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = case.model_config()
    model = CLIP(cfg).train()
    model.set_grad_checkpointing(case.grad_checkpointing)
    size = cfg.vision.image_size
    images = torch.randn(case.batch, 3, size, size)
    text = torch.randint(1, 1000, (case.batch, cfg.text.context_length))
    text[:, -1] = cfg.text.eot_token_id
    labels = torch.arange(case.batch)
    autocast = get_autocast(case.precision, torch.device("cpu"))

    def forward() -> torch.Tensor:
        with autocast():
            logits_per_image, logits_per_text = model(images, text)
        return (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels)) / 2

    forward().backward()  # warm-up: lazy initialisation, allocator state
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _memory_mib("VmRSS")
    _reset_peak()
    loss = forward()
    after_forward = _memory_mib("VmRSS")
    loss.backward()
    peak = _memory_mib("VmHWM")
    return {
        "after_forward_mib": after_forward - before,
        "peak_mib": peak - before,
    }


def start(case: Case) -> subprocess.Popen:
    """Start measuring one case in a fresh subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536")
    return subprocess.Popen(
        [sys.executable, __file__, "--child", str(case)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(case: Case, child: subprocess.Popen, timeout_s: float = 600) -> dict:
    """Wait for a measurement started by `start`; raise with its stderr if it failed."""
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        raise RuntimeError(f"memory measurement of {case} took more than {timeout_s} s") from None
    if child.returncode != 0:
        raise RuntimeError(f"memory measurement of {case} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def estimate(case: Case) -> dict:
    """The planner's figures for one case (clip/memory.py), with the gradients' and the autocast
    weight copies' share, which the measured step also allocates."""
    from clip.memory import (
        FP32_BYTES,
        activation_bytes_per_sample,
        autocast_weight_bytes,
        count_parameters,
        logits_bytes,
    )

    cfg = case.model_config()
    activations = activation_bytes_per_sample(cfg, case.precision, case.grad_checkpointing)
    params = count_parameters(cfg)
    autocast_weights = autocast_weight_bytes(params, case.precision, case.grad_checkpointing)
    kept = case.batch * activations.kept + autocast_weights
    peak = case.batch * activations.peak + autocast_weights + FP32_BYTES * params.total
    peak += logits_bytes(case.batch, case.batch)
    return {"after_forward_mib": kept / MIB, "peak_mib": peak / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="model:vision_layers:text_layers:batch:precision:checkpointing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(Case.parse(args.child))))
        return
    cases = [Case.parse(text) for text in args.case] if args.case else DEFAULT_CASES
    print("| case | after forward: estimated MiB | measured MiB | ratio | peak: estimated MiB | measured MiB | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        measured, estimated = finish(case, start(case)), estimate(case)
        cells = [f"`{case}`"]
        for key in ("after_forward_mib", "peak_mib"):
            cells += [f"{estimated[key]:.1f}", f"{measured[key]:.1f}", f"{estimated[key] / measured[key]:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
