"""Our export format: one safetensors file holding a model's weights, config and tokenizer.

The tensors are the state dict in OpenAI's key layout (so OpenAI-layout loaders such as OpenCLIP's
`pretrained=` read the file too). The header metadata holds the model config as JSON with its hash
and, for a vocabulary other than OpenAI's, the tokenizer.json, so `clip.load(path)` needs nothing
else. This module writes and reads that format and decides when a stored config fits a model.
Other libraries' formats (transformers, OpenCLIP's hub layout) are written by `clip.models.hub_export`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from clip.config import ModelConfig, model_config_to_dict
from clip.models.weights import CheckpointFormatError, CheckpointMismatchError, PathLike, read_safetensors_header
from clip.version import __version__

EXPORT_FORMAT = "clip-train-export"
EXPORT_FORMAT_VERSION = "1"
TOKENIZER_KEY = "tokenizer_json"
TOKENIZER_HASH_KEY = "tokenizer_sha256"

# Config fields a checkpoint may differ in from the model it is loaded into: image size is adapted by
# interpolating positional embeddings, the others do not change the trained function.
ADAPTABLE_CONFIG_FIELDS = frozenset(
    {"vision.image_size", "vision.patch_dropout", "vision.timm_pretrained", "init_logit_scale", "init_logit_bias"}
)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- write


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
    path = Path(path)
    config_json = json.dumps(model_config_to_dict(config), sort_keys=True)
    header = {
        **(metadata or {}),
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "library_version": __version__,
        "model_config": config_json,
        "model_config_hash": _sha256(config_json),
    }
    if config.text.tokenizer != "openai":  # the export must tokenize without the training machine's files
        tokenizer_json = get_tokenizer_json(config.text.tokenizer)
        header[TOKENIZER_KEY] = tokenizer_json
        header[TOKENIZER_HASH_KEY] = _sha256(tokenizer_json)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=header)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------------------------------- read


def read_export_config(metadata: Mapping[str, str], path: PathLike) -> Optional[dict]:
    """The model config dict stored in an export's metadata, or None for a plain safetensors file."""
    if metadata.get("format") != EXPORT_FORMAT:
        return None
    version = metadata.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise CheckpointFormatError(f"{path}: export format version {version!r} is not supported (expected 1)")
    config_json = metadata.get("model_config", "")
    if metadata.get("model_config_hash") != _sha256(config_json):
        raise CheckpointFormatError(f"{path}: the stored model config does not match its hash (edited or corrupt)")
    config = json.loads(config_json)
    if TOKENIZER_KEY in metadata:  # the vocabulary travels inside the export: read it from there
        config["text"]["tokenizer"] = str(Path(path).resolve())
    return config


def get_tokenizer_json(source: str) -> str:
    """The tokenizer.json text of `source`: a tokenizer.json file, or an export that carries one."""
    if not Path(source).is_file():
        raise FileNotFoundError(
            f"tokenizer file {source!r} does not exist (expected 'openai', a tokenizer.json or a model export)"
        )
    if not source.endswith(".safetensors"):
        return Path(source).read_text(encoding="utf-8")
    _, metadata = read_safetensors_header(source)
    text = metadata.get(TOKENIZER_KEY)
    if text is None:
        raise ValueError(f"{source!r} carries no tokenizer (its model uses 'openai', or it is not a clip export)")
    if _sha256(text) != metadata.get(TOKENIZER_HASH_KEY):
        raise ValueError(f"{source!r}: the embedded tokenizer does not match its hash (edited or corrupt)")
    return text


def tokenizer_identity(source: str) -> str:
    """What makes two `model.text.tokenizer` values the same vocabulary: 'openai', or the sha256 of
    the tokenizer.json content (key order and layout aside) wherever it is stored; a source that
    cannot be read is its own string."""
    if source == "openai":
        return source
    try:
        content = json.loads(get_tokenizer_json(source))
    except (OSError, ValueError):
        return source
    return _sha256(json.dumps(content, sort_keys=True))


# ------------------------------------------------------------------------- does a stored config fit


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

    Call it before reading tensors, so a wrong file is named before gigabytes are read. Fields in
    `ADAPTABLE_CONFIG_FIELDS` may differ.
    """
    diffs = config_differences(stored, current)
    if diffs:

        def show(value):
            return repr(value) if isinstance(value, str) and value is not _ABSENT else str(value)

        trained = ", ".join(f"model.{key}={show(old)}" for key, old, _ in diffs)
        now = ", ".join(show(new) for _, _, new in diffs)
        raise CheckpointMismatchError(f"{source} was trained with {trained}; current config has {now}. {hint}")
