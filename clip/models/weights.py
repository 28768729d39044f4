"""Model weights in and out: safe file readers, strict loading, config checks and the export format.

Nothing here executes code from a file: `.pt`/`.bin` files are read with `torch.load(weights_only=True)`
and never retried without it (docs/guarantees.md); `.safetensors` files have their header checked against
the file size before any tensor is read. TorchScript archives have their own reader in
`clip.models.torchscript`.

The export format is one safetensors file: the state dict in OpenAI's key layout (so OpenAI-layout
loaders such as OpenCLIP's `pretrained=` read it too) and, in the header metadata, the model config as
JSON (plus the tokenizer.json of a vocabulary other than OpenAI's). `clip.load(path)` needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from clip.config import ModelConfig, model_config_to_dict
from clip.tokenizer import EXPORT_TOKENIZER_HASH_KEY, EXPORT_TOKENIZER_KEY, get_tokenizer_json, tokenizer_identity

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

EXPORT_FORMAT = "clip-train-export"
EXPORT_FORMAT_VERSION = "1"

# Config fields a checkpoint may differ in from the model it is loaded into: image size is adapted by
# interpolating positional embeddings, the others do not change the trained function.
ADAPTABLE_CONFIG_FIELDS = frozenset(
    {"vision.image_size", "vision.patch_dropout", "vision.timm_pretrained", "init_logit_scale", "init_logit_bias"}
)


class CheckpointError(Exception):
    """A checkpoint or export that cannot be used; the message names the file and the problem."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle wants to build objects other than tensors and plain containers (a `weights_only` load refused it)."""


class CheckpointFormatError(CheckpointError):
    """Unreadable file: unknown format, truncated, or a layout we do not know."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was made for another architecture than the model it is loaded into."""


# --------------------------------------------------------------------------------------------- readers


def load_torch_file(path: PathLike) -> Any:
    """`torch.load` a file we did not write, with `weights_only=True` and no fallback.

    Tensors, dicts, lists and primitives come back; anything that would build another object raises
    `UnsafeCheckpointError` naming the refused global, before that object is built.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL (\S+)", str(exc))
        refused = f"global: {match.group(1)}" if match else str(exc).strip().splitlines()[-1]
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle non-tensor objects ({refused}). Only tensors and plain containers "
            "are loaded; convert trusted files to safetensors in an environment you trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {exc}") from exc


_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def read_safetensors_header(path: PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns (tensor entries {name: {dtype, shape, data_offsets}}, metadata). Checks that the header fits
    in the file, that every tensor's byte range matches its dtype and shape, and that the ranges cover the
    data section exactly, so a truncated or padded file is reported before anything is allocated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{path}: {size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointFormatError(
                f"{path}: safetensors header claims {header_len} bytes but the file has {size} (truncated?)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            expected = numel * _SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path}: malformed safetensors entry for tensor {name!r}: {entry!r}") from None
        if stop - begin != expected or begin < 0:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} ({entry['dtype']} {entry['shape']}) needs {expected} bytes, "
                f"header gives offsets {begin}..{stop}"
            )
        end = max(end, stop)
    if end != data_size:
        raise CheckpointFormatError(
            f"{path}: safetensors data section is {data_size} bytes but the header describes {end} (truncated?)"
        )
    return header, metadata


def load_safetensors_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated safetensors read: (tensors on CPU, header metadata)."""
    from safetensors.torch import load_file

    _, metadata = read_safetensors_header(path)
    return load_file(str(path), device="cpu"), metadata


# ------------------------------------------------------------------------------------ config checks


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = "<absent>"  # a field one side does not have (configs from another library version)


def config_differences(
    stored: Union[Mapping, ModelConfig], current: Union[Mapping, ModelConfig], ignore=ADAPTABLE_CONFIG_FIELDS
) -> list[tuple[str, Any, Any]]:
    """[(dotted field, stored value, current value)] for the architecture fields that differ, `ignore` aside.

    MLP ratios that give the same hidden width (4.9231 and 8192 / 1664 for width 1664) are equal.
    """
    old, new = (_flatten(c if isinstance(c, Mapping) else model_config_to_dict(c)) for c in (stored, current))

    def same(key: str) -> bool:
        if old.get(key, _ABSENT) == new.get(key, _ABSENT):
            return True
        if key == "text.tokenizer" and _ABSENT not in (old.get(key, _ABSENT), new.get(key, _ABSENT)):
            return tokenizer_identity(old[key]) == tokenizer_identity(new[key])  # one vocabulary, two places
        tower, _, name = key.rpartition(".")
        if name != "mlp_ratio" or _ABSENT in (old.get(key, _ABSENT), new.get(key, _ABSENT)):
            return False
        width = f"{tower}.width"
        return old.get(width) == new.get(width) and int(old[width] * old[key]) == int(new[width] * new[key])

    return [
        (key, old.get(key, _ABSENT), new.get(key, _ABSENT))
        for key in sorted(set(old) | set(new))
        if key not in ignore and not same(key)
    ]


def check_model_config(
    stored: Mapping,
    current: ModelConfig,
    source: str = "checkpoint",
    hint: str = "Pass partial_init=True to load the matching tensors only.",
) -> None:
    """Raise `CheckpointMismatchError` if `stored` (a config dict from a checkpoint) is not `current`'s architecture.

    Call it before reading tensors. Fields in `ADAPTABLE_CONFIG_FIELDS` may differ.
    """
    diffs = config_differences(stored, current)
    if diffs:

        def show(value):
            return repr(value) if isinstance(value, str) and value is not _ABSENT else str(value)

        trained = ", ".join(f"model.{key}={show(old)}" for key, old, _ in diffs)
        now = ", ".join(show(new) for _, _, new in diffs)
        raise CheckpointMismatchError(f"{source} was trained with {trained}; current config has {now}. {hint}")


# ----------------------------------------------------------------------------------- strict loading


@dataclass
class LoadReport:
    """What `load_weights` did: loaded keys and everything it skipped (only non-empty when partial)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)  # "size mismatch for key: checkpoint [..] vs model [..]"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"] if self.loaded else []
        sections = (("missing", self.missing), ("unexpected", self.unexpected), ("size mismatch", self.mismatched))
        for title, keys in sections:
            if keys:
                lines.append(f"{title} ({len(keys)}): {_short_list(keys)}")
        return "; ".join(lines)


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], partial: bool = False, source: str = "checkpoint"
) -> LoadReport:
    """Copy `state_dict` into `model` strictly: every key present on both sides, every shape equal.

    On any difference raise `CheckpointMismatchError` listing missing keys, unexpected keys and shape
    mismatches. With `partial=True` (an explicit partial-init choice) load the tensors that fit, leave the
    rest as initialised, and log and return a report of what was skipped. Values are cast to the model's
    dtypes, as `nn.Module.load_state_dict` does.
    """
    expected = model.state_dict()
    report = LoadReport()
    report.missing = [key for key in expected if key not in state_dict]
    report.unexpected = [key for key in state_dict if key not in expected]
    fitting = {}
    for key, value in state_dict.items():
        if key not in expected:
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            report.mismatched.append(
                f"size mismatch for {key}: checkpoint {list(value.shape)} vs model {list(expected[key].shape)}"
            )
        else:
            fitting[key] = value
    if not report.complete and not partial:
        raise CheckpointMismatchError(f"{source} does not fit the model: {report}")
    model.load_state_dict(fitting, strict=not partial)
    report.loaded = list(fitting)
    if partial:
        logger.warning("partial load from %s: %s", source, report)
    return report


# -------------------------------------------------------------------------------------------- export


def _config_hash(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()


def export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    path: PathLike,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write `state_dict` (OpenAI key layout) and `config` as one safetensors file at `path`.

    For the trainer: pass the unwrapped (or EMA, or gathered FSDP) full state dict. Tensors are stored
    as they are (dtype kept), so loading the file back is bit-exact. The file appears atomically
    (written to `<path>.tmp`, fsynced, renamed). `metadata` adds string entries (e.g. the run name).
    """
    from safetensors.torch import save_file

    from clip import __version__  # here: clip/__init__.py imports this module

    path = Path(path)
    config_json = json.dumps(model_config_to_dict(config), sort_keys=True)
    header = {
        **(metadata or {}),
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "library_version": __version__,
        "model_config": config_json,
        "model_config_hash": _config_hash(config_json),
    }
    if config.text.tokenizer != "openai":  # the export must tokenize without the training machine's files
        tokenizer_json = get_tokenizer_json(config.text.tokenizer)
        header[EXPORT_TOKENIZER_KEY] = tokenizer_json
        header[EXPORT_TOKENIZER_HASH_KEY] = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=header)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def export_model(model: nn.Module, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Export a `clip.CLIP` (its `config` and weights) for `clip.load(path)` and OpenCLIP's `pretrained=`."""
    return export_state_dict(model.state_dict(), model.config, path, metadata)


def read_export_config(metadata: Mapping[str, str], path: PathLike) -> Optional[dict]:
    """The model config dict stored in an export's metadata, or None for a plain safetensors file."""
    if metadata.get("format") != EXPORT_FORMAT:
        return None
    version = metadata.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise CheckpointFormatError(f"{path}: export format version {version!r} is not supported (expected 1)")
    config_json = metadata.get("model_config", "")
    if metadata.get("model_config_hash") != _config_hash(config_json):
        raise CheckpointFormatError(f"{path}: the stored model config does not match its hash (edited or corrupt)")
    config = json.loads(config_json)
    if EXPORT_TOKENIZER_KEY in metadata:  # the vocabulary travels inside the export: read it from there
        config["text"]["tokenizer"] = str(Path(path).resolve())
    return config
