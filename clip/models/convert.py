"""Checkpoints from OpenAI, OpenCLIP, Hugging Face and our own exports -> (config, OpenAI-layout state dict).

Formats, detected from the file's bytes (never from its name):
- our export: safetensors with the model config in its metadata (`clip.models.export`);
- OpenAI's release archives: TorchScript zips, read without running them (`clip.models.torchscript`);
- state dicts in OpenAI's key layout (OpenAI, OpenCLIP) as `.pt`/`.bin` (torch zip or legacy pickle,
  read with `weights_only=True`) or `.safetensors`, bare or wrapped in {"state_dict": ...}, with or
  without DDP's `module.` / torch.compile's `_orig_mod.` prefixes;
- a Hugging Face `CLIPModel` directory (config.json + weights), mapped to OpenAI's layout;
- OpenCLIP's hub configs (`open_clip_config.json`), whose weights are state dicts in OpenAI's layout.

When a checkpoint stores no config, `infer_model_config` reads the architecture from tensor shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from clip.config import ModelConfig, TextConfig, VisionConfig, model_config_to_dict
from clip.models.export import ADAPTABLE_CONFIG_FIELDS, config_differences, read_export_config
from clip.models.hf_format import (
    hf_config_to_model_config,
    hf_state_dict_to_openai,
    mlp_ratio_of,
    read_hf_config,
    read_hf_weights,
)
from clip.models.registry import get_model_config, list_models
from clip.models.torchscript import is_torchscript_archive, read_torchscript_state_dict
from clip.models.weights import (
    CheckpointFormatError,
    PathLike,
    load_safetensors_file,
    load_torch_file,
    read_safetensors_header,
)

# Scalars OpenAI's archives keep beside the weights; their values are implied by the tensor shapes.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


@dataclass
class Checkpoint:
    """A checkpoint read into memory: OpenAI-layout tensors, the stored model config if any, its kind."""

    state_dict: dict[str, torch.Tensor]
    config: Optional[dict]  # model config dict (export, HF); None when only tensors were stored
    source: str  # e.g. "OpenAI TorchScript archive ViT-B-32.pt", for messages


# ------------------------------------------------------------------------------------ format detection


def _file_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointFormatError(f"{path}: a directory without config.json is not a Hugging Face CLIPModel")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torchscript" if is_torchscript_archive(path) else "torch"
    if head.startswith(b"\x80"):  # pickle protocol >= 2: torch's legacy (pre-1.6) format
        return "torch"
    raise CheckpointFormatError(
        f"{path}: unknown checkpoint format (expected safetensors, a torch .pt/.bin zip or pickle, a TorchScript "
        "archive, or a Hugging Face directory)"
    )


def read_checkpoint_config(path: PathLike) -> Optional[dict]:
    """The model config a checkpoint stores (our export's metadata, HF's config.json), reading no tensors."""
    path = Path(path)
    kind = _file_kind(path)
    if kind == "safetensors":
        return read_export_config(read_safetensors_header(path)[1], path)
    if kind == "hf":
        return model_config_to_dict(hf_config_to_model_config(read_hf_config(path), path))
    return None


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read any supported checkpoint (see the module docstring) into an OpenAI-layout state dict."""
    path = Path(path)
    kind = _file_kind(path)
    if kind == "hf":
        hf_config = read_hf_config(path)
        cfg = hf_config_to_model_config(hf_config, path)
        state_dict = hf_state_dict_to_openai(read_hf_weights(path), cfg, path)
        return Checkpoint(state_dict, model_config_to_dict(cfg), f"Hugging Face CLIPModel {path}")
    if kind == "safetensors":
        tensors, metadata = load_safetensors_file(path)
        config = read_export_config(metadata, path)
        kind = "export" if config else "safetensors"
        return Checkpoint(as_openai_state_dict(tensors, path), config, f"{kind} {path}")
    if kind == "torchscript":
        return Checkpoint(
            as_openai_state_dict(read_torchscript_state_dict(path), path), None, f"OpenAI TorchScript archive {path}"
        )
    return Checkpoint(as_openai_state_dict(load_torch_file(path), path), None, f"state dict {path}")


def as_openai_state_dict(obj, path: PathLike) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...}, strip wrapper prefixes, drop OpenAI's scalar metadata, check it is all tensors.

    Returns a new dict (`obj` is not modified); `path` names the source in error messages."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # OpenCLIP training checkpoints
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointFormatError(f"{path}: expected a state dict (a mapping of names to tensors)")
    state_dict = dict(obj)
    while prefix := next((p for p in _WRAPPER_PREFIXES if all(key.startswith(p) for key in state_dict)), None):
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointFormatError(f"{path}: entries that are not tensors: {', '.join(map(str, not_tensors[:10]))}")
    if any(key.startswith(("text_model.", "vision_model.")) for key in state_dict):
        raise CheckpointFormatError(
            f"{path}: Hugging Face CLIPModel weights: pass the model's directory (with its config.json) instead"
        )
    for key in _OPENAI_METADATA_KEYS:
        state_dict.pop(key, None)
    return state_dict


# ------------------------------------------------------------------------------------- OpenCLIP

# OpenCLIP's defaults (CLIPVisionCfg, CLIPTextCfg) for the options our towers do not implement: a config
# may spell them out only with these values.
_OPENCLIP_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False, "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "timm_model_name": None,
    "attn_pooler_queries": 256, "attn_pooler_heads": 8,
}  # fmt: skip
_OPENCLIP_TEXT_DEFAULTS = {
    "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None, "ls_init_value": None,
    "embed_cls": False, "pad_id": 0, "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
}  # fmt: skip
_OPENCLIP_TOP_DEFAULTS = {"custom_text": False, "init_logit_bias": None}
_OPENCLIP_IGNORED = {
    "cast_dtype", "eos_id", "timm_model_pretrained", "hf_model_pretrained", "timm_pool", "timm_proj",
    "timm_proj_bias", "timm_drop", "timm_drop_path", "hf_proj_type", "hf_pooler_type",
}  # fmt: skip


def openclip_config_to_model_config(model_cfg: Mapping, path: PathLike = "open_clip_config.json") -> ModelConfig:
    """OpenCLIP's `model_cfg` (the dict in an `open_clip_config.json`) -> ModelConfig.

    ViT and ModifiedResNet image towers with OpenAI-style text towers; any other option (timm or
    Hugging Face towers, attentional pooling, custom text, ...) raises naming it. `cast_dtype` and the
    options that only matter for towers we refuse are ignored.
    """
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    problems = [
        f"{where}{key}={section[key]!r}"
        for where, section, defaults in (
            ("vision_cfg.", vision, _OPENCLIP_VISION_DEFAULTS),
            ("text_cfg.", text, _OPENCLIP_TEXT_DEFAULTS),
            ("", model_cfg, _OPENCLIP_TOP_DEFAULTS),
        )
        for key, default in defaults.items()
        if section.get(key, default) != default
    ]
    known = {"vision_cfg", "text_cfg", "embed_dim", "quick_gelu", "init_logit_scale", *_OPENCLIP_TOP_DEFAULTS}
    supported_vision = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout"}
    supported_text = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
    problems += [f"{key} (unknown option)" for key in model_cfg if key not in known | _OPENCLIP_IGNORED]
    problems += [f"vision_cfg.{key} (unknown option)" for key in vision
                 if key not in supported_vision | set(_OPENCLIP_VISION_DEFAULTS) | _OPENCLIP_IGNORED]  # fmt: skip
    problems += [f"text_cfg.{key} (unknown option)" for key in text
                 if key not in supported_text | set(_OPENCLIP_TEXT_DEFAULTS) | _OPENCLIP_IGNORED]  # fmt: skip
    if problems:
        raise CheckpointFormatError(f"{path}: OpenCLIP options this library does not implement: {'; '.join(problems)}")
    try:
        layers = vision.get("layers", 12)
        common = {
            "image_size": vision.get("image_size", 224),
            "width": vision.get("width", 768),
            "head_width": vision.get("head_width", 64),
            "patch_dropout": vision.get("patch_dropout", 0.0),
        }
        if isinstance(layers, (list, tuple)):  # OpenCLIP's ModifiedResNet: blocks per stage
            vision_cfg = VisionConfig(kind="resnet", stage_blocks=list(layers), **common)
        else:
            vision_cfg = VisionConfig(kind="vit", layers=layers, patch_size=vision.get("patch_size", 16),
                                      mlp_ratio=vision.get("mlp_ratio", 4.0), **common)  # fmt: skip
        vocab_size = text.get("vocab_size", 49408)
        text_cfg = TextConfig(
            context_length=text.get("context_length", 77),
            vocab_size=vocab_size,
            width=text.get("width", 512),
            heads=text.get("heads", 8),
            layers=text.get("layers", 12),
            mlp_ratio=text.get("mlp_ratio", 4.0),
            eot_token_id=vocab_size - 1,  # OpenCLIP pools at argmax(ids): the end-of-text token is the largest id
        )
        cfg = ModelConfig(
            embed_dim=model_cfg["embed_dim"],
            vision=vision_cfg,
            text=text_cfg,
            activation="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        )
    except KeyError as exc:
        raise CheckpointFormatError(f"{path}: OpenCLIP model config lacks {exc}") from None
    if "init_logit_scale" in model_cfg:
        cfg.init_logit_scale = model_cfg["init_logit_scale"]
    return cfg


# -------------------------------------------------------------------------------- shape inference

# Fields that only affect initialisation or training, never the function a set of weights computes.
_INIT_ONLY = frozenset({"vision.patch_dropout", "vision.timm_pretrained", "init_logit_scale", "init_logit_bias"})
# Ignoring these, two configs with equal fields have the same tensor shapes: the fields shapes cannot
# tell (a registered config that matches on everything else supplies them) and the adaptable ones.
ARCHITECTURE_ONLY = ADAPTABLE_CONFIG_FIELDS | {"vision.head_width", "text.heads", "activation", "text.tokenizer"}


def _count_blocks(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({match.group(1) for key in state_dict if (match := regex.match(key))})


def infer_model_config(state_dict: Mapping[str, torch.Tensor], activation: str = "quick_gelu") -> ModelConfig:
    """Architecture of an OpenAI-layout state dict, from tensor shapes.

    Attention heads are not visible in shapes: they come from a registered model with the same shapes
    (e.g. ViT-H-14's 80-wide heads), else OpenAI's convention of 64-wide heads. The activation is not
    visible either: it is an argument (QuickGELU, as OpenAI's weights need, by default).
    """
    sd = state_dict
    try:
        if "visual.class_embedding" in sd:
            width, _, patch, _ = sd["visual.conv1.weight"].shape
            grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
            vision = VisionConfig(
                kind="vit",
                image_size=grid * patch,
                patch_size=patch,
                width=width,
                layers=_count_blocks(sd, r"^visual\.transformer\.resblocks\.(\d+)\."),
                mlp_ratio=mlp_ratio_of(width, sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            )
            embed_dim = sd["visual.proj"].shape[1]
        elif "visual.layer1.0.conv1.weight" in sd:
            grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
            vision = VisionConfig(
                kind="resnet",
                image_size=grid * 32,
                width=sd["visual.layer1.0.conv1.weight"].shape[0],
                stage_blocks=[_count_blocks(sd, rf"^visual\.layer{stage}\.(\d+)\.") for stage in (1, 2, 3, 4)],
            )
            embed_dim = sd["visual.attnpool.c_proj.weight"].shape[0]
        elif any(key.startswith("visual.trunk.") for key in sd):
            raise CheckpointFormatError(
                "a timm image tower's architecture cannot be read from tensor shapes: pass the model name"
            )
        else:
            raise CheckpointFormatError("not a CLIP state dict in OpenAI's layout (no visual.class_embedding or "
                                        "visual.layer1.*)")  # fmt: skip
        vocab_size, text_width = sd["token_embedding.weight"].shape
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=vocab_size,
            width=text_width,
            heads=max(1, text_width // 64),
            layers=_count_blocks(sd, r"^transformer\.resblocks\.(\d+)\."),
            mlp_ratio=mlp_ratio_of(text_width, sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            eot_token_id=vocab_size - 1,  # OpenAI's convention: end-of-text is the last id
        )
    except KeyError as exc:
        raise CheckpointFormatError(f"state dict lacks {exc}, which every CLIP in OpenAI's layout has") from None
    cfg = ModelConfig(embed_dim=embed_dim, vision=vision, text=text, activation=activation)
    if "logit_bias" in sd:
        cfg.init_logit_bias = float(sd["logit_bias"])
    registered = find_registered_name(cfg, ignore=ARCHITECTURE_ONLY)
    if registered is not None:  # take what shapes cannot say, and the registry's spelling of the MLP ratios
        reference = get_model_config(registered)
        cfg.vision.head_width, cfg.text.heads = reference.vision.head_width, reference.text.heads
        cfg.vision.mlp_ratio, cfg.text.mlp_ratio = reference.vision.mlp_ratio, reference.text.mlp_ratio
    return cfg


def find_registered_name(cfg: ModelConfig, ignore=ADAPTABLE_CONFIG_FIELDS) -> Optional[str]:
    """A registered model name with `cfg`'s architecture (fields in `ignore` aside); among several, the one
    that also agrees on the most ignored fields (image size, activation)."""
    registered = {name: get_model_config(name) for name in list_models()}
    matches = [name for name, stored in registered.items() if not config_differences(stored, cfg, ignore=ignore)]
    matches.sort(key=lambda name: len(config_differences(registered[name], cfg, ignore=_INIT_ONLY)))
    return matches[0] if matches else None


# ------------------------------------------------------------------------- positional embeddings


def resize_positional_embedding(embedding: torch.Tensor, grid_size: int) -> torch.Tensor:
    """[1 + G*G, D] -> [1 + grid_size**2, D]: bicubic (antialiased) on the grid; the first token is kept.

    The first token is the ViT class token or, in the ResNet attention pool, the mean-feature query.
    """
    old_grid = math.isqrt(embedding.shape[0] - 1)
    if old_grid**2 + 1 != embedding.shape[0]:
        raise CheckpointFormatError(f"positional embedding of {embedding.shape[0]} tokens is not 1 + a square grid")
    if old_grid == grid_size:
        return embedding
    first, grid = embedding[:1], embedding[1:]
    grid = grid.float().reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)  # [1, D, G, G]
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1).to(embedding.dtype)  # [G'*G', D]
    return torch.cat([first, grid], dim=0)


def resize_positional_embeddings(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict:
    """Adapt a checkpoint's image positional embeddings to `cfg`'s image size (ViT grid, ResNet attention pool)."""
    key = {"vit": "visual.positional_embedding", "resnet": "visual.attnpool.positional_embedding"}.get(cfg.vision.kind)
    state_dict = dict(state_dict)
    if key in state_dict:
        state_dict[key] = resize_positional_embedding(state_dict[key], cfg.vision.grid_size)
    return state_dict
