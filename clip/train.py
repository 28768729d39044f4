"""train(cfg): build everything, then one step-based loop.

    python scripts/train.py +experiment=smoke output_dir=runs/smoke      # or call train(TrainConfig)

Read top to bottom: checks that need no side effects, the process group, the run directory and the
resume decision, the model (parallelism applied from outside: clip/parallelize.py), the optimizer,
the data, the step (clip/step.py), then the loop. In each iteration the host queues the step on the
device, fetches the next batch and agrees with the other ranks on whether there is a next step while
the device computes, and reads the previous step's numbers, which have long arrived: the host
never waits for the device except to log, evaluate or checkpoint. docs/architecture.md follows one
batch through these files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from clip.checkpoint import remove_stale
from clip.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    TrainModelConfig,
    get_batch_plan,
    to_model_config,
    validate_train_config,
)
from clip.data import TrainLoader, build_train_loader, check_train_data
from clip.distributed import (
    barrier,
    destroy_distributed,
    exchange_host_flags,
    get_device,
    init_distributed,
    read_launch_env,
)
from clip.lifecycle import Faults, StopRequest, Watchdog
from clip.logger import MetricsLogger, setup_console_logging
from clip.loss import build_loss
from clip.models import CLIP
from clip.models.export import export_state_dict
from clip.optim import build_optimizer, get_lr
from clip.parallelize import apply_tower_lock, build_train_module
from clip.precision import build_grad_scaler, get_autocast
from clip.resume import Checkpointer, choose_resumable, get_resume_source, init_weights
from clip.step import Progress, StepLedger, TrainStep
from clip.tokenizer import Tokenizer, get_tokenizer
from clip.train_eval import TrainEvaluator, load_eval_sets
from clip.train_metrics import Interval, StepReporter, final_line
from clip.transforms import image_transform_train

logger = logging.getLogger(__name__)

EXPORT_NAME = "model.safetensors"


@dataclass
class TrainResult:
    step: int
    preempted: bool
    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run in `cfg.output_dir`; see the module docstring."""
    # --- checks with no side effects: a config error leaves no run directory and no process group
    validate_train_config(cfg)
    launch = read_launch_env()
    setup_console_logging(is_main=launch.rank == 0)
    per_device_batch, num_microbatches = get_batch_plan(cfg, launch.world_size)
    if cfg.synthetic_data:
        _prepare_synthetic_data(cfg.synthetic_data, launch.world_size)
    check_train_data(cfg.data, world_size=launch.world_size)  # missing shards, impossible splits
    eval_sets = load_eval_sets(cfg.eval.zero_shot, cfg.model.vision.image_size)
    tokenize = _load_tokenizer(cfg.model)
    run_dir = Path(cfg.output_dir)
    checkpoint_dir = run_dir / "checkpoints"
    resume_from = get_resume_source(cfg.checkpoint, checkpoint_dir)
    init_from = cfg.checkpoint.init_from if resume_from is None else ""
    if init_from and not Path(init_from).exists():
        raise ConfigError(f"checkpoint.init_from={init_from}: no such file or directory")

    # --- process group, determinism, run directory
    device = get_device(cfg.device, launch.local_rank)
    init_distributed(cfg.dist, launch, device)
    rank, world_size, is_main = launch.rank, launch.world_size, launch.rank == 0
    _set_determinism(cfg.num_threads, cfg.deterministic, device)
    if is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(checkpoint_dir)
        (run_dir / "config.yaml").write_text(_to_yaml(dataclasses.asdict(cfg)))
    barrier()
    if resume_from is not None:
        resume_from = choose_resumable(resume_from, checkpoint_dir, rank, device)
    logger.info(
        "world size %d (%s), device %s: global batch %d = %d per device x %d devices, %d GradCache micro-batch(es) of %d",
        world_size, launch.launcher, device, cfg.global_batch_size, per_device_batch, world_size,
        num_microbatches, per_device_batch // num_microbatches,
    )  # fmt: skip

    # --- model: identical initial weights on every rank, then parallelism applied from outside
    torch.manual_seed(cfg.seed)
    model_config = to_model_config(cfg.model)
    model = CLIP(model_config).to(device)
    if init_from:
        init_weights(model, init_from)
    module, image_format = build_train_module(cfg, model, device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = build_grad_scaler(cfg.precision, device)
    torch.manual_seed(cfg.seed + rank)  # each rank draws its own augmentation and patch dropout from here on

    # --- data, the step, and the state a resume restores
    loader = build_train_loader(
        cfg.data, batch_size=per_device_batch, image_transform=image_transform_train(model_config.vision.image_size),
        tokenize=tokenize, rank=rank, world_size=world_size, seed=cfg.seed,
    )  # fmt: skip
    max_steps = cfg.max_steps or math.ceil(cfg.num_epochs * loader.steps_per_epoch)
    faults = Faults(cfg.fault, rank)
    train_step = TrainStep(
        cfg, model=model, module=module, optimizer=optimizer, scaler=scaler, autocast=get_autocast(cfg.precision, device),
        loss_fn=build_loss(cfg.loss), num_microbatches=num_microbatches, image_format=image_format,
        finish_images=loader.finish_images, device=device, faults=faults,
    )  # fmt: skip
    checkpointer = Checkpointer(cfg, checkpoint_dir, model=model, optimizer=optimizer, scaler=scaler, rank=rank,
                                world_size=world_size, faults=faults)  # fmt: skip
    progress = Progress()
    if resume_from is not None:
        progress = checkpointer.restore(resume_from, loader)
        ignored = " (init_from ignored)" if cfg.checkpoint.init_from else ""
        logger.info("resuming from %s at step %d%s", resume_from, progress.step, ignored)
    metrics_logger = MetricsLogger(
        run_dir, cfg.log, is_main=is_main, run_config=dataclasses.asdict(cfg), run_id=checkpointer.run_id
    )
    run = _Run(
        cfg, model_config, loader, max_steps, train_step, progress, checkpointer, faults,
        ledger=StepLedger(cfg.nan, progress, model, checkpointer.last_committed),
        reporter=StepReporter(cfg, model, scaler, metrics_logger, device, world_size, max_steps),
        evaluator=TrainEvaluator(cfg, eval_sets, module, model, tokenize, device, metrics_logger),
    )  # fmt: skip
    stop_request, watchdog = StopRequest(), Watchdog(cfg.dist.watchdog_s)
    stop_request.install()
    module.train()
    apply_tower_lock(model, lock_image=cfg.lock_image, lock_text=cfg.lock_text)  # eval mode for locked towers
    try:
        preempted = _loop(run, stop_request, watchdog)
        if not preempted and eval_sets:
            run.evaluator(progress.step)
        if not preempted and cfg.checkpoint.export:
            export_final(model, model_config, run_dir / EXPORT_NAME, is_main=is_main, run_id=checkpointer.run_id,
                         step=progress.step)  # fmt: skip
    finally:
        watchdog.disarm()
        stop_request.restore()
        metrics_logger.close()
    barrier()
    destroy_distributed()
    if is_main and not preempted:
        for eval_set in eval_sets:  # the run's result, last and plain (the README's first command ends here)
            print(final_line(eval_set.name, len(eval_set.classnames), run.evaluator.metrics), flush=True)
    return TrainResult(step=progress.step, preempted=preempted, output_dir=run_dir, metrics=run.evaluator.metrics)


@dataclass
class _Run:
    """What the loop works with, built by train()."""

    cfg: TrainConfig
    model_config: ModelConfig
    loader: TrainLoader
    max_steps: int
    train_step: TrainStep
    progress: Progress
    checkpointer: Checkpointer
    faults: Faults
    ledger: StepLedger
    reporter: StepReporter
    evaluator: TrainEvaluator


def _loop(run: _Run, stop_request: StopRequest, watchdog: Watchdog) -> bool:
    """Steps until `max_steps` or an agreed stop request; returns whether the run was asked to stop."""
    cfg, progress, max_steps = run.cfg, run.progress, run.max_steps
    skipped: Counter = Counter()  # data samples skipped on this rank (corrupt, truncated, ...)
    interval = Interval()
    batches = _Batches(run.loader)
    batch, data_state = batches.next(interval)
    flags = exchange_host_flags(batch is not None, stop_request.requested)
    saved_step = progress.step  # the newest step with a checkpoint (or none yet)
    while progress.step < max_steps and not flags.stop:
        if not flags.has_batch:
            # Some rank's epoch ended (or the run resumed at an epoch's end): every rank starts the
            # next epoch at this same step, so no rank waits in a collective the others never join.
            batches.new_epoch()
            batch, data_state = batches.next(interval)
            flags = exchange_host_flags(batch is not None, stop_request.requested)
            if not flags.has_batch:
                raise RuntimeError(f"no training batch at the start of a new epoch (step {progress.step})")
            continue
        step, lr = progress.step + 1, get_lr(progress.step + 1, cfg.optim, max_steps)
        watchdog.arm()
        images, texts = run.train_step.prepare(batch.images, batch.texts)
        interval.count_text(texts, batch.texts, run.model_config)
        skipped.update(batch.skipped)
        outcome = run.train_step(images, texts, step=step, lr=lr)  # queued on the device; nothing waits for it
        progress.step, progress.samples_seen = step, progress.samples_seen + cfg.global_batch_size
        interval.num_steps += 1
        # While the device works: the next batch, the host flags that say whether there is a step after
        # this one, and the previous step's numbers. A checkpoint records the consumed batch's position.
        consumed_state = data_state
        batch, data_state = batches.next(interval)
        flags = exchange_host_flags(batch is not None, stop_request.requested)
        run.ledger.defer(step, lr, outcome)

        logs = step % cfg.log.every_steps == 0 or step == max_steps
        evaluates = run.evaluator.due(step) and step < max_steps  # the last step's evaluation follows the loop
        periodic = bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
        if logs or evaluates or periodic or flags.stop or step == max_steps:
            report = run.ledger.settle()  # the host waits for the device here only
            if logs:
                run.reporter.log(step, report, lr, interval, progress, consumed_state.get("epoch", 0), skipped)
            if evaluates:
                watchdog.arm()
                run.evaluator(step)
            if logs or evaluates:
                interval = Interval()
            # A periodic checkpoint of a skipped (non-finite) step would only move the data position past it.
            if flags.stop or step == max_steps or (periodic and report.finite):
                watchdog.arm()
                run.checkpointer.save(progress, consumed_state)
                saved_step = step
        run.faults.after_step(step)

    watchdog.arm()
    if flags.stop and saved_step < progress.step:
        # The stop was agreed while the ranks started a new epoch, after a step that saved nothing.
        run.ledger.settle()
        run.checkpointer.save(progress, consumed_state)
    if flags.stop:
        logger.warning("stop requested (signal %s): checkpoint of step %d written, exiting", stop_request.signum, progress.step)
    return flags.stop


# --- building blocks ---------------------------------------------------------------------------------


def _set_determinism(num_threads: int, deterministic: bool, device: torch.device) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(deterministic)
    # cuDNN times its convolution algorithms on the first batch of each shape and keeps the fastest
    # (training batches all have one shape); its choice is not reproducible, hence not in deterministic mode.
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def _load_tokenizer(cfg: TrainModelConfig) -> Tokenizer:
    """The text tower's tokenizer, loaded with the up-front checks: a tokenizer that disagrees with
    `model.text` is a ConfigError naming the keys; a missing or unreadable file names `model.text.tokenizer`."""
    try:
        return get_tokenizer(to_model_config(cfg).text)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"model.text.tokenizer: {error}") from None


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


class _Batches:
    """The loader's batches, each with the loader position after it; the waiting time is recorded."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader
        self.new_epoch()

    def new_epoch(self) -> None:
        self._batches = iter(self.loader)

    def next(self, interval: Interval) -> tuple[Any, dict | None]:
        """(batch, or None at the end of the data; the position after it)."""
        start = time.perf_counter()
        batch = next(self._batches, None)
        state = self.loader.state_dict() if batch is not None else None
        interval.data_seconds += time.perf_counter() - start
        return batch, state


def export_final(model: CLIP, model_config: ModelConfig, path: Path, *, is_main: bool, run_id: str, step: int) -> None:
    """The trained weights and config as one safetensors file for `clip.load(path)` (a collective call)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        export_state_dict(state, model_config, path, metadata={"run_id": run_id, "step": str(step)})
        logger.info("exported %s (clip.load reads it)", path)


def _to_yaml(tree: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(tree))
