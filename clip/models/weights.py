"""Model weights in: safe file readers and strict loading.

Nothing here executes code from a file: `.pt`/`.bin` files are read with `torch.load(weights_only=True)`
and never retried without it (docs/guarantees.md); `.safetensors` files have their header checked against
the file size before any tensor is read. TorchScript archives have their own reader in
`clip.models.torchscript`; our export format (weights + config + tokenizer) is `clip.models.export`.
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
from typing import Any, Mapping, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class CheckpointError(Exception):
    """A checkpoint or export that cannot be used; the message names the file and the problem."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle wants to build objects other than tensors and plain containers: refused, never run."""


class CheckpointFormatError(CheckpointError):
    """Unreadable file: unknown format, truncated, or a layout we do not know."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was made for another architecture than the model it is loaded into: never loaded partially."""


# --------------------------------------------------------------------------------------------- readers


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
