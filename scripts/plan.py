"""Size a training run before booking the cluster: per-GPU batch and accumulation for the global
batch, memory per GPU with and without activation checkpointing, step time and days to the samples
seen. The cost models are clip/flops.py and clip/memory.py; docs/performance.md explains them.

    PYTHONPATH=. python scripts/plan.py --model ViT-L-14 --global-batch 32768 --samples-seen 12.8e9 \\
        --gpu h100 --num-gpus 256 --precision bf16
    PYTHONPATH=. python scripts/plan.py --recipe vit_l14 --gpu h100 --num-gpus 256 [global_batch_size=65536 ...]

`--recipe NAME` reads configs/experiment/NAME.yaml, composed with the trainer's own Hydra composition
(clip.hydra_config) and any overrides given after the flags, exactly as `scripts/train.py
+experiment=NAME` would see it: model, global batch, run length, precision, checkpointing,
micro-batch, parallelism and loss chunking all come from it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from clip.config import ModelConfig
from clip.flops import DEVICE_MEMORY_GIB, PEAK_FLOPS, flops_per_sample, get_device_kind
from clip.memory import (
    GIB,
    PARALLELISMS,
    PRECISIONS,
    MemoryEstimate,
    ParameterCounts,
    count_parameters,
    estimate_memory,
)

# Assumed model-FLOPs utilisation when none is measured yet: above published CLIP training
# (10-20% on A100s for OpenCLIP, about 21% on H100s for NeMo), below LLM trainers (35-55%).
ASSUMED_MFU = 0.30
SECONDS_PER_DAY = 86400
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The recipe settings; with --recipe they come from the composed config (or its overrides) instead.
RECIPE_FLAGS = ("model", "global_batch", "precision", "grad_checkpointing", "micro_batch", "parallel", "loss_chunk_rows")


@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is spread: `local_batch` per GPU, computed in `accum_steps` micro-batches
    of `micro_batch` (GradCache keeps the global batch's negatives whatever the split)."""

    local_batch: int
    micro_batch: int

    @property
    def accum_steps(self) -> int:
        return self.local_batch // self.micro_batch


def split_global_batch(global_batch: int, num_gpus: int, micro_batch: int = 0) -> BatchSplit:
    """Per-GPU batch for `global_batch` on `num_gpus`; `micro_batch` 0 means no accumulation.
    Raises ValueError naming the numbers when they do not divide."""
    if global_batch <= 0 or num_gpus <= 0 or micro_batch < 0:
        raise ValueError(
            f"global batch ({global_batch}) and GPU count ({num_gpus}) must be positive, micro-batch ({micro_batch}) >= 0"
        )
    if global_batch % num_gpus:
        below, above = global_batch // num_gpus * num_gpus, -(-global_batch // num_gpus) * num_gpus
        raise ValueError(
            f"global batch {global_batch} is not divisible by {num_gpus} GPUs "
            f"({global_batch} / {num_gpus} = {global_batch / num_gpus:.2f}); use a multiple of {num_gpus}, "
            f"e.g. {below or num_gpus} or {above}"
        )
    local_batch = global_batch // num_gpus
    micro_batch = micro_batch or local_batch
    if micro_batch > local_batch or local_batch % micro_batch:
        raise ValueError(
            f"per-GPU batch {local_batch} (global batch {global_batch} / {num_gpus} GPUs) is not divisible by "
            f"micro-batch {micro_batch}; divisors: {', '.join(map(str, _divisors(local_batch)))}"
        )
    return BatchSplit(local_batch=local_batch, micro_batch=micro_batch)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ClusterConfig:
    gpu: str  # a key of clip.flops.PEAK_FLOPS, or a name get_device_kind maps to one
    num_gpus: int
    memory_gib: float = 0.0  # 0: the GPU's datasheet memory

    @property
    def kind(self) -> str:
        kind = get_device_kind(self.gpu)
        if kind is None:
            raise ValueError(f"unknown GPU {self.gpu!r}; known: {', '.join(PEAK_FLOPS)}")
        return kind

    @property
    def memory_bytes(self) -> float:
        return (self.memory_gib or DEVICE_MEMORY_GIB[self.kind]) * GIB


@dataclass
class RunConfig:
    """The recipe side of a plan (mirrors the trainer's settings)."""

    name: str  # the architecture's name, for messages
    model: ModelConfig
    global_batch: int
    samples_seen: float
    precision: str = "bf16"
    grad_checkpointing: bool = False
    micro_batch: int = 0  # 0: the largest that fits
    parallel: str = "ddp"
    loss_chunk_rows: int = 0


def plan_memory(
    run: RunConfig, cluster: ClusterConfig, split: BatchSplit, grad_checkpointing: bool, params: ParameterCounts
) -> MemoryEstimate:
    return estimate_memory(
        run.model,
        micro_batch=split.micro_batch,
        local_batch=split.local_batch,
        global_batch=run.global_batch,
        num_devices=cluster.num_gpus,
        precision=run.precision,
        grad_checkpointing=grad_checkpointing,
        parallel=run.parallel,
        loss_chunk_rows=run.loss_chunk_rows,
        params=params,
    )


def choose_split(run: RunConfig, cluster: ClusterConfig, params: ParameterCounts | None = None) -> BatchSplit:
    """The given micro-batch, or else the largest divisor of the per-GPU batch whose estimated
    memory fits the GPU (fewest accumulation steps: each one adds a no-grad forward)."""
    split = split_global_batch(run.global_batch, cluster.num_gpus, run.micro_batch)
    if run.micro_batch:
        return split
    params = params or count_parameters(run.model)
    for micro_batch in reversed(_divisors(split.local_batch)):
        candidate = BatchSplit(split.local_batch, micro_batch)
        if plan_memory(run, cluster, candidate, run.grad_checkpointing, params).total <= cluster.memory_bytes:
            return candidate
    raise ValueError(
        f"{run.name} does not fit in "
        f"{cluster.memory_bytes / GIB:.0f} GiB even at micro-batch 1 "
        f"({plan_memory(run, cluster, BatchSplit(split.local_batch, 1), run.grad_checkpointing, params).total / GIB:.1f} GiB); "
        "try --grad-checkpointing, --parallel fsdp or more GPUs"
    )


@dataclass(frozen=True)
class StepTime:
    model_flops_per_step: float  # forward x 3 over the global batch
    hardware_multiple: float  # executed FLOPs / model FLOPs (recomputation)
    seconds: float
    num_steps: int

    @property
    def days(self) -> float:
        return self.seconds * self.num_steps / SECONDS_PER_DAY


def estimate_step_time(run: RunConfig, cluster: ClusterConfig, split: BatchSplit, mfu: float) -> StepTime:
    """Step time if the GPUs sustain `mfu` of their peak on model FLOPs without recomputation.

    Checkpointing recomputes each forward once more in backward, and GradCache accumulation runs an
    extra no-grad forward over the batch: 3 forwards of work become 4 or 5. We assume the GPUs keep
    the same executed-FLOP rate, so the step takes that much longer.
    """
    peak = PEAK_FLOPS[cluster.kind].get(run.precision)
    if peak is None:
        raise ValueError(f"{cluster.kind} has no {run.precision} peak in clip.flops.PEAK_FLOPS")
    model_flops = run.global_batch * flops_per_sample(run.model, global_batch=run.global_batch).training_flops
    hardware_multiple = (3 + run.grad_checkpointing + (split.accum_steps > 1)) / 3
    seconds = model_flops * hardware_multiple / (cluster.num_gpus * peak * mfu)
    return StepTime(model_flops, hardware_multiple, seconds, math.ceil(run.samples_seen / run.global_batch))


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(run: RunConfig, cluster: ClusterConfig, mfu: float, mfu_measured: bool) -> str:
    params = count_parameters(run.model)
    split = choose_split(run, cluster, params)
    flops = flops_per_sample(run.model, global_batch=run.global_batch)
    time = estimate_step_time(run, cluster, split, mfu)
    plain, checkpointed = (plan_memory(run, cluster, split, checkpointing, params) for checkpointing in (False, True))
    lines = [
        f"{run.name}: {params.total / 1e6:.1f}M parameters, {run.precision}, {run.parallel}, "
        f"{cluster.num_gpus} x {cluster.kind} ({cluster.memory_bytes / GIB:.0f} GiB)",
        f"global batch {run.global_batch} = {cluster.num_gpus} GPUs x {split.local_batch} per GPU; "
        f"micro-batch {split.micro_batch}, {split.accum_steps} accumulation step(s)"
        + (" (given)" if run.micro_batch else " (largest that fits" + (" with checkpointing)" if run.grad_checkpointing else ")")),
        f"forward GFLOPs per sample: {flops.forward_flops / 1e9:.2f} (image {flops.image_flops / 1e9:.2f}, text "
        f"{flops.text_flops / 1e9:.2f}, logits {2 * flops.logits_macs / 1e9:.3f}); training (x3): {flops.training_flops / 1e9:.2f}",
        "",
        f"memory per GPU, GiB (micro-batch {split.micro_batch})   no checkpointing   checkpointing",
    ]
    rows = [
        ("weights (fp32)", "weights"),
        ("gradients (fp32)", "gradients"),
        ("AdamW moments (fp32)", "optimizer"),
        ("autocast weight copies", "autocast_weights"),
        ("inputs (local batch)", "inputs"),
        ("activations", "activations"),
        ("loss logits" + (f" ({run.loss_chunk_rows}-row chunks)" if run.loss_chunk_rows else " (plain)"), "logits"),
        ("GradCache feature cache", "feature_cache"),
    ]
    for label, key in rows:
        lines.append(f"  {label:<40}{_gib(getattr(plain, key))}          {_gib(getattr(checkpointed, key))}")
    lines.append(f"  {'allocator allowance':<40}{_gib(plain.allocator)}          {_gib(checkpointed.allocator)}")
    lines.append(f"  {'total':<40}{_gib(plain.total)}          {_gib(checkpointed.total)}")
    fits = ["fits" if m.total <= cluster.memory_bytes else "too big" for m in (plain, checkpointed)]
    lines.append(f"  {'':<40}{fits[0]:>8}          {fits[1]:>8}")
    source = "measured" if mfu_measured else "assumed; pass --mfu with a measured value"
    lines += [
        "",
        f"step time at {mfu:.0%} MFU ({source}): {time.seconds:.2f} s"
        + (f" (x{time.hardware_multiple:.2f} for recomputation)" if time.hardware_multiple > 1 else ""),
        f"{time.num_steps} steps to {run.samples_seen:.3g} samples: {time.days:.1f} days, "
        f"{time.days * 24 * cluster.num_gpus:,.0f} GPU-hours",
    ]
    return "\n".join(lines)


def recipe_run(name: str, overrides: list[str], num_gpus: int, samples_seen: float = 0.0) -> RunConfig:
    """The RunConfig of configs/experiment/`name`.yaml with Hydra `overrides`, composed as the trainer
    composes it. Samples seen: max_steps x global batch, or `samples_seen` for an epoch-based recipe
    (its dataset size is not in the config). Raises ValueError naming the problem."""
    from clip.config import ConfigError, to_model_config
    from clip.hydra_config import compose_train_config

    recipes = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))
    if name not in recipes:
        raise ValueError(f"no recipe {name!r} in {CONFIG_DIR / 'experiment'}; recipes: {', '.join(recipes)}")
    # Keys a run must set but a plan does not read, unless the recipe or the overrides set them.
    placeholders = [f"{key}=unused" for key in ("output_dir", "data.train_shards")
                    if not any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)]  # fmt: skip
    try:
        cfg = compose_train_config(CONFIG_DIR, [f"+experiment={name}", *placeholders, *overrides])
    except ConfigError as error:
        raise ValueError(f"recipe {name}: {error}") from None
    if cfg.max_steps:
        samples_seen = samples_seen or cfg.max_steps * cfg.global_batch_size
    elif not samples_seen:
        raise ValueError(f"recipe {name} runs num_epochs={cfg.num_epochs} of a dataset of unknown size: pass --samples-seen")
    return RunConfig(
        name=f"{cfg.model.name} (recipe {name})",
        model=to_model_config(cfg.model),
        global_batch=cfg.global_batch_size,
        samples_seen=samples_seen,
        precision=cfg.precision,
        grad_checkpointing=cfg.grad_checkpointing,
        micro_batch=cfg.micro_batch_size,
        parallel=cfg.dist.parallel,
        # loss.chunk_size takes [local, chunk] logits at a time: as many as [chunk / GPUs, global].
        loss_chunk_rows=math.ceil(cfg.loss.chunk_size / num_gpus),
    )


def main(argv: list[str] | None = None) -> None:
    from clip.models import get_model_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="with --recipe: Hydra overrides, e.g. global_batch_size=65536")
    parser.add_argument("--recipe", help="configs/experiment/NAME.yaml: the run's settings (replaces the flags below the GPU's)")
    parser.add_argument("--gpu", required=True, help=f"one of {', '.join(PEAK_FLOPS)} (h100 = h100-sxm)")
    parser.add_argument("--num-gpus", type=int, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=0.0, help="default: the GPU's datasheet memory")
    parser.add_argument("--mfu", type=float, default=0.0, help=f"measured MFU (default: {ASSUMED_MFU} assumed)")
    parser.add_argument("--samples-seen", type=float, default=0.0, help="e.g. 12.8e9 (a recipe's: max_steps x global batch)")
    parser.add_argument("--model", help="registered architecture, e.g. ViT-L-14")
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--grad-checkpointing", action="store_true", default=None)
    parser.add_argument("--micro-batch", type=int, help="per-GPU micro-batch (default: the largest that fits)")
    parser.add_argument("--parallel", choices=PARALLELISMS)
    parser.add_argument("--loss-chunk-rows", type=int, help="loss computed this many rows at a time (default 0: plain)")
    args = parser.parse_args(argv)
    given = [f"--{flag.replace('_', '-')}" for flag in RECIPE_FLAGS if getattr(args, flag) is not None]
    try:
        if args.recipe:
            if given:
                parser.error(f"{', '.join(given)} cannot be combined with --recipe: override the recipe instead, "
                             f"e.g. global_batch_size=65536 grad_checkpointing=true")  # fmt: skip
            run = recipe_run(args.recipe, args.overrides, args.num_gpus, args.samples_seen)
        else:
            if args.overrides:
                parser.error(f"unrecognized arguments: {' '.join(args.overrides)} (overrides need --recipe)")
            missing = [flag for flag, value in (("--model", args.model), ("--global-batch", args.global_batch),
                                                ("--samples-seen", args.samples_seen)) if not value]  # fmt: skip
            if missing:
                parser.error(f"the following arguments are required without --recipe: {', '.join(missing)}")
            try:
                model = get_model_config(args.model)
            except KeyError as error:
                parser.error(f"--model: {error.args[0]}")
            run = RunConfig(
                name=args.model,
                model=model,
                global_batch=args.global_batch,
                samples_seen=args.samples_seen,
                precision=args.precision or "bf16",
                grad_checkpointing=bool(args.grad_checkpointing),
                micro_batch=args.micro_batch or 0,
                parallel=args.parallel or "ddp",
                loss_chunk_rows=args.loss_chunk_rows or 0,
            )
        cluster = ClusterConfig(gpu=args.gpu, num_gpus=args.num_gpus, memory_gib=args.gpu_memory_gib)
        print(format_plan(run, cluster, args.mfu or ASSUMED_MFU, mfu_measured=bool(args.mfu)))
        if args.recipe and not run.micro_batch:
            split = choose_split(run, cluster)
            if split.accum_steps > 1:  # the trainer's micro_batch_size=0 means no accumulation
                print(f"the recipe's whole per-GPU batch does not fit: add micro_batch_size={split.micro_batch}")
    except ValueError as error:
        parser.exit(2, f"plan.py: error: {error}\n")


if __name__ == "__main__":
    main()
