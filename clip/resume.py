"""The run's resumable state, and which state a run starts from.

Precedence, decided before anything is written (`get_resume_source`): the run directory's own newest
committed checkpoint, else `checkpoint.resume=PATH`, else a fresh start (from `checkpoint.init_from`
weights if set; they are ignored, with a log line, when a checkpoint is resumed).
`checkpoint.resume=never` refuses a run directory that has checkpoints.

`Checkpointer` saves and restores everything a bitwise resume needs: model, optimizer, fp16 loss
scale, `Progress`, the run id, every rank's RNG states and data position (clip/checkpoint.py writes
them atomically). A resume whose config changes what the run computes is refused, naming each
changed key, unless `checkpoint.allow_config_change` lists it; changes that cannot alter the
numbers (`BENIGN_CHANGES`) are only logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

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
    save_checkpoint,
    set_rng_state,
    verify_files,
)
from clip.config import CheckpointConfig, ConfigError, TrainConfig, to_model_config
from clip.models import CLIP
from clip.models.convert import read_checkpoint, read_checkpoint_config
from clip.models.export import check_model_config
from clip.models.weights import load_weights
from clip.step import MAX_LOGIT_SCALE, NonFiniteLossError, Progress, clamp_logit_scale, logit_scale_value
from clip.version import __version__

logger = logging.getLogger(__name__)

# Top-level keys (and their sub-keys) whose change on resume does not change what the run computes.
BENIGN_CHANGES = (
    "output_dir", "log", "eval", "checkpoint", "fault", "nan", "dist", "compile", "grad_checkpointing",
    "text_packing_groups", "deterministic", "num_threads", "device", "micro_batch_size",
)  # fmt: skip


def get_resume_source(cfg: CheckpointConfig, checkpoint_dir: Path) -> Path | None:
    """What this run resumes from: its own newest checkpoint, else `resume=PATH`, else nothing."""
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


def choose_resumable(source: Path, checkpoint_dir: Path, rank: int, device: torch.device) -> Path | None:
    """The checkpoint to load from `source`: the newest one that verifies on every rank, for a
    checkpoints directory (this run's, or another run's named by `resume=PATH`); else `source`."""
    if source == checkpoint_dir or list_committed(source):
        return find_resumable(source, rank, device)
    return source


class Checkpointer:
    """Saves and restores the run's state (a collective call on every rank)."""

    def __init__(self, cfg: TrainConfig, checkpoint_dir: Path, *, model: CLIP, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, rank: int, world_size: int, faults: Any):  # fmt: skip
        self.cfg, self.checkpoint_dir, self.model, self.optimizer, self.scaler = cfg, checkpoint_dir, model, optimizer, scaler
        self.rank, self.world_size, self.faults = rank, world_size, faults
        self.run_id = uuid.uuid4().hex[:12]  # a resumed run keeps its own (`restore`)
        self._model_config_json = json.dumps(dataclasses.asdict(to_model_config(cfg.model)), sort_keys=True)

    def save(self, progress: Progress, data_state: Any) -> None:
        """A committed checkpoint of step `progress.step` with this rank's data position `data_state`."""
        step = progress.step
        assert_finite_state(self.model, self.optimizer, step)
        model_state, optimizer_state = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        train_state = None
        if self.rank == 0:
            train_state = {
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "counters": dataclasses.asdict(progress),
                "run_id": self.run_id,
                "world_size": self.world_size,
                "config": json.dumps(dataclasses.asdict(self.cfg)),
                "model_config": self._model_config_json,
                "model_config_hash": hashlib.sha256(self._model_config_json.encode()).hexdigest(),
                "library_version": __version__,
                "format_version": FORMAT_VERSION,
            }
        meta = {"run_id": self.run_id, "world_size": self.world_size, "config_hash": config_hash(self.cfg),
                "library_version": __version__}  # fmt: skip
        path = save_checkpoint(
            self.checkpoint_dir, step, train_state, {"rng": get_rng_state(), "data": data_state}, rank=self.rank,
            keep_last=self.cfg.checkpoint.keep_last, manifest_extra=meta, fault_phase=self.faults.save_phase(step),
        )  # fmt: skip
        logger.info("saved checkpoint %s", path)

    def restore(self, path: Path, loader: Any) -> Progress:
        """Load the checkpoint at `path` into the model, optimizer, scaler, RNGs and `loader`."""
        train_state, rank_state = load_checkpoint(path, self.rank)
        check_config_change(
            {**json.loads(train_state["config"]), "world_size": train_state["world_size"]},
            {**dataclasses.asdict(self.cfg), "world_size": self.world_size},
            self.cfg.checkpoint.allow_config_change, path,
        )  # fmt: skip
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, train_state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, train_state["optimizer"], options=options)
        if self.scaler is not None and train_state["scaler"]:
            self.scaler.load_state_dict(train_state["scaler"])
        if not 0 <= logit_scale_value(self.model) <= MAX_LOGIT_SCALE:
            logger.warning("checkpoint logit_scale %.4f is outside [0, ln 100]: clamped", logit_scale_value(self.model))
            clamp_logit_scale(self.model)
        set_rng_state(rank_state["rng"])
        if rank_state["data"] is not None:
            loader.load_state_dict(rank_state["data"])
        self.run_id = train_state["run_id"]
        return Progress(**train_state["counters"])

    def last_committed(self) -> str:
        latest = find_latest(self.checkpoint_dir)
        return latest.name if latest else "none"


def check_config_change(old: dict, new: dict, allowed: list[str], path: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key that changes the run."""
    changes = {key: (a, b) for key, a, b in _differences(old, new)}

    def matches(key: str, prefixes) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)

    def describe(items: dict) -> str:
        return "; ".join(f"{key}: {a} -> {b}" for key, (a, b) in items.items())

    unsafe = {key: change for key, change in changes.items() if not matches(key, BENIGN_CHANGES)}
    refused = {key: change for key, change in unsafe.items() if not matches(key, allowed)}
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


def init_weights(model: CLIP, path: str) -> None:
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


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
