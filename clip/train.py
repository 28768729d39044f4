"""train(cfg): build everything, then one step-based loop.

    python scripts/train.py +experiment=smoke output_dir=runs/smoke      # or call train(TrainConfig)

Read top to bottom: checks that need no side effects, the process group, the run directory and
resume decision, the model (locked towers, activation checkpointing, compile, then DDP/FSDP2), the
optimizer, the data, then the loop. Each step: forward/backward over the global batch (GradCache
micro-batches), gradient norm, an all-gather of every rank's [loss, gradient norm] on the device
that decides there whether the update is skipped (a non-finite value on any rank), the update;
then, while the device computes all that, the next batch, one tiny host all-reduce of [has next
batch, stop requested], and the bookkeeping of the previous step (the host reads a step's numbers
one step late, so it never waits for the device except to log, evaluate or checkpoint). See
docs/training.md.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import clip
from clip.checkpoint import (
    FORMAT_VERSION,
    TRAIN_STATE,
    find_latest,
    find_resumable,
    get_rng_state,
    list_committed,
    load_checkpoint,
    load_file,
    read_manifest,
    remove_stale,
    save_checkpoint,
    set_rng_state,
    verify_files,
)
from clip.config import (
    CheckpointConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    TrainModelConfig,
    get_batch_plan,
    validate_train_config,
)
from clip.data import build_train_loader, check_train_data
from clip.data.eval_datasets import load_classification_set
from clip.data.records import SKIP_REASONS
from clip.data.sources import DataConfigError
from clip.distributed import (
    StepOutcome,
    StepReport,
    apply_data_parallel,
    barrier,
    destroy_distributed,
    exchange_host_flags,
    get_device,
    init_distributed,
    read_launch_env,
    sum_across_ranks,
)
from clip.flops import get_mfu, get_peak_flops, skipped_text_flops, training_flops_per_sample
from clip.logger import MetricsLogger, setup_console_logging
from clip.loss import build_loss
from clip.models import CLIP
from clip.models.convert import read_checkpoint, read_checkpoint_config
from clip.models.export import check_model_config, export_state_dict
from clip.models.text_packing import PackedText
from clip.models.weights import load_weights
from clip.objective import ContrastiveModel, forward_backward, prepare_texts
from clip.precision import build_grad_scaler, get_autocast
from clip.tokenizer import Tokenizer, get_tokenizer
from clip.transforms import image_transform_eval, image_transform_train
from clip.zero_shot import evaluate

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # temperature floor of 0.01 (CLIP paper, section 2.5)
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job that stopped on request
EXPORT_NAME = "model.safetensors"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive (or total) steps had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    step: int
    preempted: bool
    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's


@dataclass
class _Counters:
    """Progress saved in every checkpoint."""

    step: int = 0  # optimizer steps taken or skipped: the step of the last batch consumed
    samples_seen: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run in `cfg.output_dir`; see the module docstring."""
    # --- checks with no side effects: a config error leaves no run directory and no process group
    validate_train_config(cfg)
    launch = read_launch_env()
    setup_console_logging(is_main=launch.rank == 0)
    per_device_batch, num_microbatches = get_batch_plan(cfg, launch.world_size)
    if cfg.synthetic_data:
        _prepare_synthetic_data(cfg.synthetic_data, launch.world_size)
    try:
        check_train_data(cfg.data, world_size=launch.world_size)  # missing shards, impossible splits (G7, G9)
    except DataConfigError as error:
        raise ConfigError(str(error)) from None
    eval_sets = _load_eval_sets(cfg)
    tokenize = _load_tokenizer(cfg)
    run_dir = Path(cfg.output_dir)
    checkpoint_dir = run_dir / "checkpoints"
    resume_from = _get_resume_source(cfg.checkpoint, checkpoint_dir)
    if cfg.checkpoint.init_from and resume_from is None and not Path(cfg.checkpoint.init_from).exists():
        raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from}: no such file or directory")

    # --- process group, determinism, run directory
    device = get_device(cfg.device, launch.local_rank)
    init_distributed(cfg.dist, launch, device)
    rank, world_size, is_main = launch.rank, launch.world_size, launch.rank == 0
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(cfg.deterministic)
    # cuDNN times its convolution algorithms on the first batch of each shape and keeps the fastest
    # (training batches all have one shape); its choice is not reproducible, hence not in deterministic mode.
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(checkpoint_dir)
        (run_dir / "config.yaml").write_text(_to_yaml(dataclasses.asdict(cfg)))
    barrier()
    if resume_from is not None:
        resume_from = _choose_resumable(resume_from, checkpoint_dir, rank, device)
    logger.info(
        "world size %d (%s), device %s: global batch %d = %d per device x %d devices, %d GradCache micro-batch(es) of %d",
        world_size, launch.launcher, device, cfg.global_batch_size, per_device_batch, world_size,
        num_microbatches, per_device_batch // num_microbatches,
    )

    # --- model: identical initial weights on every rank, then parallelism applied from outside
    torch.manual_seed(cfg.seed)
    model_config = to_model_config(cfg.model)
    model = CLIP(model_config).to(device)
    if cfg.checkpoint.init_from and resume_from is None:
        _init_weights(model, cfg.checkpoint.init_from)
    wrapped, image_format = build_train_module(cfg, model, device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = build_grad_scaler(cfg.precision, device)
    autocast = get_autocast(cfg.precision, device)
    loss_fn = build_loss(cfg.loss)
    # Each rank draws its own randomness (augmentation, patch dropout) from here on.
    torch.manual_seed(cfg.seed + rank)

    # --- data
    loader = build_train_loader(
        cfg.data, batch_size=per_device_batch, image_transform=image_transform_train(model_config.vision.image_size),
        tokenize=tokenize, rank=rank, world_size=world_size, seed=cfg.seed,
    )
    max_steps = cfg.max_steps or math.ceil(cfg.num_epochs * loader.steps_per_epoch)

    # --- resume: restores model, optimizer, scaler, counters, this rank's RNGs and data position
    counters = _Counters()
    run_id = uuid.uuid4().hex[:12]
    if resume_from is not None:
        counters, run_id = _restore(resume_from, cfg, model, optimizer, scaler, loader, rank, world_size)
        if cfg.checkpoint.init_from:
            logger.info("resuming from %s at step %d (init_from ignored)", resume_from, counters.step)
        else:
            logger.info("resuming from %s at step %d", resume_from, counters.step)

    metrics_logger = MetricsLogger(
        run_dir, cfg.log, is_main=is_main, run_config=dataclasses.asdict(cfg), run_id=run_id
    )
    stop_request = StopRequest()
    stop_request.install()
    fault_here = cfg.fault.rank in (-1, rank)
    flops_per_sample, peak_flops = _get_mfu_inputs(cfg, model_config, device)
    model_config_json = json.dumps(dataclasses.asdict(model_config), sort_keys=True)
    checkpoint_meta = {"run_id": run_id, "world_size": world_size, "config_hash": _config_hash(cfg),
                       "library_version": clip.__version__}

    def save(step: int, data_state: Any) -> None:
        assert_finite_state(model, optimizer, step)
        model_state, optimizer_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        train_state = None
        if is_main:
            train_state = {
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": scaler.state_dict() if scaler is not None else {},
                "counters": dataclasses.asdict(counters),
                "run_id": run_id,
                "world_size": world_size,
                "config": json.dumps(dataclasses.asdict(cfg)),
                "model_config": model_config_json,
                "model_config_hash": hashlib.sha256(model_config_json.encode()).hexdigest(),
                "library_version": clip.__version__,
                "format_version": FORMAT_VERSION,
            }
        rank_state = {"rng": get_rng_state(), "data": data_state}
        kill_phase = cfg.fault.kill_in_save_phase if fault_here and step == cfg.fault.kill_in_save_at_step else ""
        path = save_checkpoint(
            checkpoint_dir, step, train_state, rank_state, rank=rank, keep_last=cfg.checkpoint.keep_last,
            manifest_extra=checkpoint_meta, fault_phase=kill_phase,
        )
        logger.info("saved checkpoint %s", path)

    # --- the loop
    wrapped.train()
    apply_tower_lock(model, lock_image=cfg.lock_image, lock_text=cfg.lock_text)  # eval mode for locked towers
    eval_metrics: dict[str, float] = {}
    skipped: Counter = Counter()  # data samples skipped on this rank (corrupt, truncated, ...)
    interval = _Interval()
    data_iter = iter(loader)
    batch, data_state = _next_batch(data_iter, loader, interval)
    flags = exchange_host_flags(batch is not None, stop_request.requested)
    unread: _UnreadStep | None = None  # the newest step whose numbers the host has not read yet
    saved_step = counters.step  # the newest step with a checkpoint (or none yet)
    preempted = False
    try:
        while counters.step < max_steps and not flags.stop:
            if not flags.has_batch:
                # Some rank's epoch ended (or the run resumed at an epoch's end): every rank starts the
                # next epoch at this same step, so no rank waits in a collective the others never join.
                data_iter = iter(loader)
                batch, data_state = _next_batch(data_iter, loader, interval)
                flags = exchange_host_flags(batch is not None, stop_request.requested)
                if not flags.has_batch:
                    raise RuntimeError(f"no training batch at the start of a new epoch (step {counters.step})")
                continue
            step = counters.step + 1
            lr = get_lr(step, cfg.optim, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            _arm_watchdog(cfg.dist.watchdog_s)
            if fault_here and step == cfg.fault.sleep_at_step:
                time.sleep(cfg.fault.sleep_s)
            images = loader.finish_images(batch.images.to(device, non_blocking=True, memory_format=image_format))
            texts = prepare_texts(batch.texts, model.eot_token_id, cfg.text_packing_groups, num_microbatches, device)
            interval.count_text(texts, batch.texts, model_config)
            skipped.update(batch.skipped)
            try:
                if fault_here and step == cfg.fault.raise_at_step:
                    raise torch.OutOfMemoryError("injected by fault.raise_at_step")
                loss, grad_norm = train_step(
                    wrapped, images, texts, loss_fn, num_microbatches=num_microbatches, autocast=autocast,
                    scaler=scaler, optimizer=optimizer, grad_clip_norm=cfg.optim.grad_clip_norm,
                )  # device tensors: nothing in the step waits for the device
            except torch.OutOfMemoryError as error:
                guidance = _oom_guidance(cfg, rank, step, per_device_batch, num_microbatches, device)
                raise torch.OutOfMemoryError(guidance) from error
            if fault_here and step in cfg.fault.nan_at_steps:
                loss = torch.full_like(loss, math.nan)
            if fault_here and step == cfg.fault.signal_at_step:
                os.kill(os.getpid(), signal.SIGTERM)

            outcome = StepOutcome(loss, grad_norm)
            apply_update(model, optimizer, scaler, skip=outcome.skip)
            optimizer.zero_grad(set_to_none=True)
            counters.step = step
            counters.samples_seen += cfg.global_batch_size
            interval.num_steps += 1

            # While the device works: the next batch, and the host flags that say whether there is a
            # step after this one. The checkpoint records the consumed batch's position.
            consumed_state = data_state
            batch, data_state = _next_batch(data_iter, loader, interval)
            flags = exchange_host_flags(batch is not None, stop_request.requested)
            # The previous step finished on the device before this one started: reading it now costs
            # no device time. A divergence is thus noticed one step late, and the run stops before
            # this step is logged or saved.
            if unread is not None:
                _account(unread, cfg, counters, model, checkpoint_dir)
            unread = _UnreadStep(step, lr, outcome)

            logs = step % cfg.log.every_steps == 0 or step == max_steps
            evaluates = bool(eval_sets and cfg.eval.every_steps and step % cfg.eval.every_steps == 0)
            evaluates = evaluates and step < max_steps  # the last step's evaluation follows the loop
            periodic = bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
            if logs or evaluates or periodic or flags.stop or step == max_steps:
                # This step is logged, evaluated or saved: the host waits for the device here only.
                report = _account(unread, cfg, counters, model, checkpoint_dir)
                unread = None
                if logs:
                    metrics = _train_metrics(report, lr, model, interval, cfg, counters, scaler)
                    mfu = get_mfu(metrics["train/samples_per_s"], flops_per_sample, peak_flops, world_size)
                    if mfu is not None:
                        metrics["train/mfu"] = mfu  # model FLOPs: padded text, as OpenCLIP's table counts
                        executed = flops_per_sample - interval.skipped_text_flops / max(interval.text_rows, 1)
                        metrics["train/mfu_executed"] = get_mfu(
                            metrics["train/samples_per_s"], executed, peak_flops, world_size
                        )  # what the device ran: without the padding that packing skipped (rank 0's share)
                    metrics["train/epoch"] = consumed_state.get("epoch", 0)
                    metrics.update(_skip_metrics(skipped, device))
                    metrics_logger.log(step, metrics)
                    metrics_logger.print(_console_line(step, max_steps, metrics))
                    interval = _Interval()
                if evaluates:
                    _arm_watchdog(cfg.dist.watchdog_s)
                    eval_metrics = _evaluate(eval_sets, wrapped, model, tokenize, cfg, device)
                    metrics_logger.log(step, eval_metrics)
                    metrics_logger.print(_eval_line(step, eval_metrics))
                    apply_tower_lock(model, lock_image=cfg.lock_image, lock_text=cfg.lock_text)
                    interval = _Interval()
                # A periodic checkpoint of a skipped (non-finite) step would only move the data position past it.
                if flags.stop or step == max_steps or (periodic and report.finite):
                    _arm_watchdog(cfg.dist.watchdog_s)
                    save(step, consumed_state)
                    saved_step = step
            if fault_here and step == cfg.fault.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        preempted = flags.stop
        _arm_watchdog(cfg.dist.watchdog_s)
        if preempted and saved_step < counters.step:
            # The stop was agreed while the ranks started a new epoch, after a step that saved nothing.
            if unread is not None:
                _account(unread, cfg, counters, model, checkpoint_dir)
            save(counters.step, consumed_state)
        if preempted:
            logger.warning("stop requested (signal %s): checkpoint of step %d written, exiting", stop_request.signum, counters.step)
        else:
            if eval_sets:
                eval_metrics = _evaluate(eval_sets, wrapped, model, tokenize, cfg, device)
                metrics_logger.log(counters.step, eval_metrics)
                metrics_logger.print(_eval_line(counters.step, eval_metrics))
            if cfg.checkpoint.export:
                export_final(model, model_config, run_dir / EXPORT_NAME, is_main=is_main, run_id=run_id, step=counters.step)
    finally:
        _disarm_watchdog()
        stop_request.restore()
        metrics_logger.close()
    barrier()
    destroy_distributed()
    if is_main and not preempted:
        for eval_set in eval_sets:  # the run's result, last and plain (the README's first command ends here)
            print(_final_line(eval_set.name, len(eval_set.classnames), eval_metrics), flush=True)
    return TrainResult(step=counters.step, preempted=preempted, output_dir=run_dir, metrics=eval_metrics)


def train_step(
    wrapped: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor | list[PackedText],
    loss_fn: Any,
    *,
    num_microbatches: int,
    autocast: Any,
    scaler: torch.amp.GradScaler | None,
    optimizer: torch.optim.Optimizer,
    grad_clip_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of this rank's share of the global-batch loss; returns (loss, global grad norm).

    Both are 0-dim device tensors, and nothing here waits for the device. The optimizer update is
    the caller's (`apply_update`): it happens only if every rank's result is finite
    (clip.distributed.StepOutcome).
    """
    loss = forward_backward(wrapped, images, texts, loss_fn, num_microbatches, autocast=autocast, grad_scaler=scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm if grad_clip_norm > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    return loss, grad_norm


def apply_update(
    model: CLIP, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, *, skip: torch.Tensor
) -> None:
    """AdamW and the temperature clamp, skipped on the device when `skip` (a 0-dim float32 device
    tensor, StepOutcome.skip) is 1.0: the fused kernel then leaves parameters, moments and step
    counts bitwise untouched, so no rank waits for the verdict on the host."""
    # GradScaler's contract with fused optimizers (torch/amp/grad_scaler.py, GradScaler.step): the
    # kernel skips the update where `found_inf` is nonzero; `grad_scale` None because train_step has
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


# --- evaluation, export, weights ---------------------------------------------------------------------


def _evaluate(eval_sets, wrapped: nn.Module, model: CLIP, tokenize, cfg: TrainConfig, device) -> dict[str, float]:
    """Zero-shot metrics of every configured set (all ranks take part; clip.zero_shot)."""
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    metrics: dict[str, float] = {}
    # FSDP2: the root's own parameters (embeddings, projections) are gathered in its forward hook,
    # which eval bypasses by calling the encoders directly; gather them for the duration.
    unshard = getattr(wrapped, "unshard", None)
    if unshard is not None:
        unshard()
    try:
        for eval_set in eval_sets:
            metrics.update(evaluate(model, eval_set, tokenize, batch_size=cfg.eval.batch_size, device=device,
                                    autocast_dtype=autocast_dtype))
    finally:
        if unshard is not None:
            wrapped.reshard()
    return metrics


def export_final(model: CLIP, model_config: ModelConfig, path: Path, *, is_main: bool, run_id: str, step: int) -> None:
    """The trained weights and config as one safetensors file for `clip.load(path)` (a collective call)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        export_state_dict(state, model_config, path, metadata={"run_id": run_id, "step": str(step)})
        logger.info("exported %s (clip.load reads it)", path)


def _init_weights(model: CLIP, path: str) -> None:
    """Start a new run from the weights in `path`: a training checkpoint directory, an export, or any
    checkpoint format clip.create_model reads. The architecture must match (checked before tensors)."""
    path = Path(path)
    if read_manifest(path) is not None:
        verify_files(path, [TRAIN_STATE])
        state = load_file(path / TRAIN_STATE)
        stored, state_dict, source = json.loads(state["model_config"]), state["model"], f"training checkpoint {path}"
    else:
        checkpoint = read_checkpoint(path)
        stored, state_dict, source = read_checkpoint_config(path), checkpoint.state_dict, checkpoint.source
    if stored is not None:
        check_model_config(stored, model.config, source=source, hint="Start from weights of this architecture.")
    load_weights(model, state_dict, source=source)
    logger.info("initialised weights from %s", source)


def _prepare_synthetic_data(directory: str, world_size: int) -> None:
    """Write clip.data.synthetic's shards and zero-shot set into `directory` unless it has them."""
    from clip.data.synthetic import write_synthetic_dataset

    if (Path(directory) / "train" / "sizes.json").exists():
        return
    if world_size > 1:
        raise ConfigError(
            f"synthetic_data={directory} does not exist yet; generate it before a multi-process launch "
            f"(a single-process run does it), or unset synthetic_data"
        )
    logger.warning("writing synthetic training data to %s (first use)", directory)
    write_synthetic_dataset(directory)


# --- building blocks ------------------------------------------------------------------------------


def to_model_config(cfg: TrainModelConfig) -> ModelConfig:
    """The architecture without the trainer's `name` record (what CLIP and exports take)."""
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)})


def build_train_module(cfg: TrainConfig, model: CLIP, device: torch.device) -> tuple[nn.Module, torch.memory_format]:
    """The module a training step calls, and the memory format its images should have.

    Applied from outside the model, in this order (torchtitan's): locked towers, channels_last for
    ResNets, activation checkpointing, torch.compile (`compile` unset: on CUDA only, where it pays;
    on CPU inductor's compile time outweighs the gain for short runs), then DDP or FSDP2.
    """
    apply_tower_lock(model, lock_image=cfg.lock_image, lock_text=cfg.lock_text)
    image_format = apply_channels_last(model)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    objective = ContrastiveModel(model)
    compile_model = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if compile_model:
        objective.compile()
    logger.info("torch.compile %s, image memory format %s", "on" if compile_model else "off", image_format)
    return apply_data_parallel(objective, cfg.dist, device), image_format


def apply_channels_last(model: CLIP) -> torch.memory_format:
    """Convolution weights of a ResNet tower in channels_last (NHWC), the layout cuDNN's tensor-core
    kernels (and oneDNN's on CPU) work in, so no layout conversion runs around each convolution.
    Returns the memory format the tower's input images should have. ViT and timm towers are left as
    they are (a ViT has a single convolution, the patch embedding)."""
    if model.config.vision.kind != "resnet":
        return torch.contiguous_format
    model.visual.to(memory_format=torch.channels_last)
    return torch.channels_last


def apply_tower_lock(model: CLIP, *, lock_image: bool, lock_text: bool) -> None:
    """LiT (arXiv:2111.07991): a locked tower gets no gradients and keeps eval mode (BatchNorm statistics)."""
    towers = []
    if lock_image:
        towers.append([model.visual])
    if lock_text:
        towers.append([model.token_embedding, model.transformer, model.ln_final])
    for modules in towers:
        for module in modules:
            module.eval()
            module.requires_grad_(False)
    if lock_text:
        model.positional_embedding.requires_grad_(False)
        model.text_projection.requires_grad_(False)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices and embeddings only.

    No decay for parameters with fewer than 2 dimensions: LayerNorm/BatchNorm gains, biases, the
    class token, logit_scale and logit_bias. Positional embeddings (2-D) decay, as in OpenCLIP's
    training code that produced the reference results. The learning rate is set every step by get_lr.
    """
    decay, no_decay, scalars = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay if param.ndim == 1 else scalars).append(param)
    # Scalars get their own group: under FSDP2 they are plain tensors among sharded ones, and the
    # multi-tensor AdamW kernels want one kind of tensor per group.
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": scalars, "weight_decay": 0.0},
    ]
    # fused: one kernel over all tensors of a group on CUDA, vectorised on CPU (5x faster than the
    # default per-tensor loop there), no host synchronisation.
    return torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True
    )


def get_lr(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine to min_lr (or constant)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    # The first step after warmup runs at the full rate; the decay ends at max_steps + 1.
    progress = (step - cfg.warmup_steps - 1) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def clamp_logit_scale(model: CLIP) -> None:
    """Keep the learned log-temperature in [0, ln 100] (CLIP paper: logits scaled by at most 100)."""
    model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def _logit_scale(model: CLIP) -> float:
    value = model.logit_scale.detach()
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


@torch.no_grad()
def assert_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Refuse to checkpoint non-finite parameters or optimizer moments (a bad state must never be `latest`)."""
    tensors = [("parameter " + name, p) for name, p in model.named_parameters()]
    for state in optimizer.state.values():
        tensors += [(f"optimizer {key}", value) for key, value in state.items() if torch.is_tensor(value) and value.is_floating_point()]
    for name, tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if not torch.isfinite(local).all():
            raise NonFiniteLossError(f"step {step}: {name} holds non-finite values; refusing to checkpoint it")


def _load_eval_sets(cfg: TrainConfig) -> list:
    """The `eval.zero_shot` sets, opened before the run has side effects: a wrong path or an
    unreadable format is a config error naming the key (G15), not a traceback after the run
    directory exists."""
    eval_transform = image_transform_eval(cfg.model.vision.image_size)
    try:
        return [load_classification_set(path, eval_transform) for path in cfg.eval.zero_shot]
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"eval.zero_shot: {error}") from None


def _load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The text tower's tokenizer, loaded with the up-front checks: a missing or unreadable
    tokenizer.json, or one that disagrees with model.text, is a config error (G15)."""
    try:
        return get_tokenizer(to_model_config(cfg.model).text)
    except (FileNotFoundError, ValueError) as error:
        message = str(error)  # the agreement checks name their model.text keys already
        raise ConfigError(message if "model.text." in message else f"model.text.tokenizer: {message}") from None


@dataclass(frozen=True)
class _UnreadStep:
    """A step the device may still be computing: its numbers are read later (`_account`)."""

    step: int
    lr: float
    outcome: StepOutcome


def _account(
    unread: _UnreadStep, cfg: TrainConfig, counters: _Counters, model: CLIP, checkpoint_dir: Path
) -> StepReport:
    """Read a step's numbers on the host: count and report a skipped step; stop a diverging run (G10).
    Steps are accounted in order, each once."""
    report = unread.outcome.report()
    if report.finite:
        counters.consecutive_nonfinite = 0
    else:
        counters.nonfinite_steps += 1
        counters.consecutive_nonfinite += 1
        logger.warning(
            "step %d: non-finite loss or gradient on rank(s) %s (losses %s, lr %.3g, "
            "logit_scale %.4f after step %d): skipped",
            unread.step, list(report.nonfinite_ranks), _fmt_losses(report.losses), unread.lr, _logit_scale(model),
            counters.step,
        )
    too_many_in_row = counters.consecutive_nonfinite >= cfg.nan.max_consecutive
    too_many = cfg.nan.max_total and counters.nonfinite_steps >= cfg.nan.max_total
    if too_many_in_row or too_many:
        first = unread.step - counters.consecutive_nonfinite + 1
        latest = find_latest(checkpoint_dir)
        what = f"steps {first}-{unread.step}" if too_many_in_row else f"{counters.nonfinite_steps} steps in total"
        raise NonFiniteLossError(
            f"non-finite loss at {what} on rank(s) {list(report.nonfinite_ranks)} "
            f"(loss={_fmt_losses(report.losses)}, lr={unread.lr:.3g}, "
            f"logit_scale={_logit_scale(model):.4f} after step {counters.step}); "
            f"last good checkpoint: {latest.name if latest else 'none'}"
        )
    return report


def _fmt_losses(losses: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{value:.4g}" for value in losses) + "]"


# --- resume ----------------------------------------------------------------------------------------

# Keys whose change on resume does not change what the run computes (RELIABILITY.md G17).
_BENIGN_CHANGES = (
    "output_dir", "log", "eval", "checkpoint", "fault", "nan", "dist", "compile", "grad_checkpointing",
    "text_packing_groups", "deterministic", "num_threads", "device", "micro_batch_size",
)


def _get_resume_source(cfg: CheckpointConfig, checkpoint_dir: Path) -> Path | None:
    """What this run resumes from (G4): its own newest checkpoint, else `resume=PATH`, else nothing."""
    committed = list_committed(checkpoint_dir)
    if cfg.resume == "never":
        if committed:
            raise ConfigError(
                f"checkpoint.resume=never, but run dir {checkpoint_dir.parent} already has checkpoints up to "
                f"step {committed[-1][0]}; use checkpoint.resume=auto, or a new output_dir"
            )
        return None
    if committed:
        return checkpoint_dir
    if cfg.resume == "auto":
        return None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume={cfg.resume}: no such checkpoint directory")
    return path


def _choose_resumable(source: Path, checkpoint_dir: Path, rank: int, device: torch.device) -> Path | None:
    if source == checkpoint_dir:
        return find_resumable(checkpoint_dir, rank, device)
    if list_committed(source):  # a run's checkpoints/ directory
        return find_resumable(source, rank, device)
    return source


def _restore(path, cfg, model, optimizer, scaler, loader, rank, world_size) -> tuple[_Counters, str]:
    train_state, rank_state = load_checkpoint(path, rank)
    _check_config_change(json.loads(train_state["config"]), dataclasses.asdict(cfg), train_state["world_size"],
                         world_size, cfg.checkpoint.allow_config_change, path)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, train_state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, train_state["optimizer"], options=options)
    if scaler is not None and train_state["scaler"]:
        scaler.load_state_dict(train_state["scaler"])
    if _logit_scale(model) > MAX_LOGIT_SCALE or _logit_scale(model) < 0:
        logger.warning("checkpoint logit_scale %.4f is outside [0, ln 100]: clamped", _logit_scale(model))
        clamp_logit_scale(model)
    set_rng_state(rank_state["rng"])
    if rank_state["data"] is not None:
        loader.load_state_dict(rank_state["data"])
    return _Counters(**train_state["counters"]), train_state["run_id"]


def _check_config_change(old: dict, new: dict, old_world: int, new_world: int, allowed: list[str], path: Path) -> None:
    changes = {key: (a, b) for key, a, b in _differences({**old, "world_size": old_world}, {**new, "world_size": new_world})}

    def matches(key: str, prefixes) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)

    unsafe = {key: change for key, change in changes.items() if not matches(key, _BENIGN_CHANGES)}
    refused = {key: change for key, change in unsafe.items() if not matches(key, allowed)}
    describe = lambda items: "; ".join(f"{key}: {a} -> {b}" for key, (a, b) in items.items())  # noqa: E731
    if refused:
        raise ConfigError(
            f"resuming {path} with a config that changes the run: {describe(refused)}. "
            f"Use the original values, a new output_dir, or accept with "
            f"checkpoint.allow_config_change=[{','.join(refused)}]"
        )
    if unsafe:
        logger.warning("resuming with accepted config changes: %s", describe(unsafe))
    benign = {key: change for key, change in changes.items() if key not in unsafe}
    if benign:
        logger.info("resuming with changed settings: %s", describe(benign))


def _differences(old: dict, new: dict, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two nested dicts."""
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b


# --- data ---------------------------------------------------------------------------------------------


def _next_batch(data_iter, loader, interval: "_Interval") -> tuple[dict | None, Any]:
    """(batch, or None at the end of the data; the loader position after it). Waiting time is recorded."""
    start = time.perf_counter()
    batch = next(data_iter, None)
    state = loader.state_dict() if batch is not None else None
    interval.data_seconds += time.perf_counter() - start
    return batch, state


# --- signals and watchdog -------------------------------------------------------------------------


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag (no I/O, no collectives in the handler); the loop acts on it at
    the next step boundary, on every rank at the same step (G6). DataLoader workers forked from this
    process inherit the handler but ignore the signal (`os.getpid()` differs); for SIGTERM, torch
    replaces it in workers, and clip.data.worker_signals makes them ignore it again."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._main_pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self._main_pid:
            self.requested = True
            self.signum = signum

    def install(self) -> None:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _arm_watchdog(timeout_s: int) -> None:
    """If the next step (or save, or eval) does not finish in time, dump every thread's stack and exit."""
    if timeout_s:
        faulthandler.dump_traceback_later(timeout_s, exit=True)


def _disarm_watchdog() -> None:
    faulthandler.cancel_dump_traceback_later()


def _oom_guidance(cfg: TrainConfig, rank: int, step: int, per_device_batch: int, num_microbatches: int, device) -> str:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return (
        f"out of memory on rank {rank} at step {step}: per-device batch {per_device_batch} in {num_microbatches} "
        f"micro-batch(es), image size {cfg.model.vision.image_size}, precision {cfg.precision}, "
        f"peak allocated {peak:.1f} GiB. Try grad_checkpointing=true, a smaller micro_batch_size (GradCache keeps "
        f"the global batch and its gradients exact), precision=bf16, or dist.parallel=fsdp for large towers"
    )


# --- logging ------------------------------------------------------------------------------------------


class _Interval:
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


def _train_metrics(report: StepReport, lr, model, interval, cfg, counters, scaler) -> dict[str, float]:
    scale = math.exp(_logit_scale(model))
    metrics = {
        "train/loss": report.mean_loss,
        "train/lr": lr,
        "train/logit_scale": scale,
        "train/grad_norm": report.grad_norm,
        "train/samples_per_s": interval.num_steps * cfg.global_batch_size / interval.seconds,
        "train/data_wait": interval.data_seconds / interval.seconds,
        "train/text_positions_computed": interval.text_positions / max(interval.padded_text_positions, 1),
        "train/samples_seen": counters.samples_seen,
        "train/nonfinite_steps": counters.nonfinite_steps,
    }
    if scaler is not None:
        metrics["train/loss_scale"] = scaler.get_scale()
    return metrics


def _console_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    line = (
        f"step {step}/{max_steps} | loss {m['train/loss']:.4f} | temp {1 / m['train/logit_scale']:.4f} | "
        f"lr {m['train/lr']:.2e} | {m['train/samples_per_s']:.1f} samples/s | data {100 * m['train/data_wait']:.0f}%"
    )
    return line + (f" | MFU {100 * m['train/mfu']:.1f}%" if "train/mfu" in m else "")


def _get_mfu_inputs(cfg: TrainConfig, model_config: ModelConfig, device: torch.device) -> tuple[float, float | None]:
    """(model FLOPs per training sample, the device's peak FLOP/s or None when unknown, e.g. on CPU)."""
    if model_config.vision.kind not in ("vit", "resnet") or device.type != "cuda":
        return 0.0, None
    precision = cfg.precision
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    flops = training_flops_per_sample(model_config, global_batch=cfg.global_batch_size)
    return flops, get_peak_flops(torch.cuda.get_device_name(device), precision)


def _eval_line(step: int, metrics: dict[str, float]) -> str:
    return f"step {step} zero-shot: " + ", ".join(f"{key} {value:.4g}" for key, value in sorted(metrics.items()))


def _final_line(name: str, num_classes: int, metrics: dict[str, float]) -> str:
    return (f"final zero-shot top-1 on {name}: {metrics[f'eval/{name}_top1']:.3f} "
            f"(chance {1 / num_classes:.3f}, {num_classes} classes)")


def _skip_metrics(skipped: Counter, device: torch.device) -> dict[str, float]:
    """Samples skipped so far on all ranks, per reason (`data/skipped/<reason>`)."""
    totals = sum_across_ranks([float(skipped[reason]) for reason in SKIP_REASONS], device)
    return {f"data/skipped/{reason}": total for reason, total in zip(SKIP_REASONS, totals)}


def _config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _to_yaml(tree: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(tree))
