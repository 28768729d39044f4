"""Entry points for notebooks and scripts: OpenAI's `load`/`available_models` and OpenCLIP-style factories.

    model, preprocess = clip.load("ViT-B/32")                      # OpenAI's API and behaviour
    model, train_tf, eval_tf = clip.create_model_and_transforms("ViT-B-32", pretrained="model.safetensors")
    model = clip.create_model("ViT-B-16", image_size=384, patch_dropout=0.5)

Which activation a loaded model uses (it cannot be read from weights):
- a model name decides (`ViT-B-32` is GELU, `ViT-B-32-quickgelu` and OpenAI's `ViT-B/32` QuickGELU);
- without a name, our exports and Hugging Face directories carry it in their config;
- without a name or a stored config (OpenAI archives, raw state dicts), QuickGELU, as OpenAI's `load` does.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import logging
import os
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from clip.config import ModelConfig, TextConfig, VisionConfig, model_config_from_dict, validate_model_config
from clip.models.clip import CLIP
from clip.models.convert import (
    ARCHITECTURE_ONLY,
    find_registered_name,
    infer_model_config,
    read_checkpoint,
    read_checkpoint_config,
    resize_positional_embeddings,
)
from clip.models.export import check_model_config
from clip.models.registry import get_model_config, list_models
from clip.models.weights import CheckpointError, CheckpointMismatchError, load_weights
from clip.transforms import image_transform_eval, image_transform_train

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DEFAULT_DOWNLOAD_ROOT = "~/.cache/clip"  # OpenAI's cache directory, so files it downloaded are found

# OpenAI's released weights. The second-to-last path component is the file's sha256.
_OPENAI_URLS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}  # fmt: skip


def available_models() -> list[str]:
    """Names `clip.load` can fetch OpenAI's released weights for (OpenAI's naming)."""
    return list(_OPENAI_URLS)


# -------------------------------------------------------------------------------------- overrides

_SECTIONS = {"vision": VisionConfig, "text": TextConfig}


def _override_targets() -> dict[str, tuple[Optional[str], str]]:
    """{override keyword: (config section or None, field)}: `vision_<field>`, `text_<field>`, top-level
    fields, and bare section field names where only one section has them (`image_size`, `context_length`)."""
    targets: dict[str, tuple[Optional[str], str]] = {
        f.name: (None, f.name) for f in fields(ModelConfig) if f.name not in _SECTIONS
    }
    owners: dict[str, list[str]] = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            targets[f"{section}_{f.name}"] = (section, f.name)
            owners.setdefault(f.name, []).append(section)
    for name, sections in owners.items():
        if len(sections) == 1 and name not in targets:
            targets[name] = (sections[0], name)
    return targets


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """A copy of `cfg` with keyword overrides applied and validated.

    Keywords: top-level fields (`embed_dim`, `activation`, ...), `vision_<field>` / `text_<field>`, or a
    field name alone where only one tower has it (`image_size`, `patch_dropout`, `context_length`).
    `width`, `layers` and `mlp_ratio` exist in both towers and need the prefix. Unknown keywords raise
    TypeError naming them.
    """
    targets = _override_targets()
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        if key not in targets:
            close = difflib.get_close_matches(key, targets, n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown model override {key!r}{suggestion} (valid: {', '.join(sorted(targets))})")
        section, name = targets[key]
        setattr(getattr(cfg, section) if section else cfg, name, value)
    validate_model_config(cfg)
    return cfg


# -------------------------------------------------------------------------------------- factories


def create_model(
    name: Optional[str] = None,
    pretrained: Optional[PathLike] = None,
    *,
    device: Union[str, torch.device, None] = None,
    partial_init: bool = False,
    **overrides: Any,
) -> CLIP:
    """Build a float32 CLIP by registered name, from a checkpoint, or both; in train mode like any new module.

    `name`: a registered architecture (`clip.list_models()`; OpenAI's names are aliases). Without it the
    architecture comes from the checkpoint: its stored config, else its tensor shapes.
    `pretrained`: a checkpoint path of any supported format (docs/api.md). A stored config that differs
    from the requested one raises `CheckpointMismatchError` before tensors are read; then loading is
    strict. At another image size, positional embeddings are interpolated.
    `partial_init=True` loads only the tensors that fit and logs what was skipped.
    `overrides`: config changes, e.g. `image_size=336`, `patch_dropout=0.5`, `activation="gelu"`,
    `context_length=64` (see `apply_overrides`).
    """
    if name is None and pretrained is None:
        raise ValueError("create_model needs a model name, a pretrained checkpoint path, or both")
    stored = read_checkpoint_config(pretrained) if pretrained is not None else None
    cfg = get_model_config(name) if name is not None else model_config_from_dict(stored) if stored else None
    if cfg is not None:
        cfg = apply_overrides(cfg, overrides)
        if stored is not None and not partial_init:
            check_model_config(stored, cfg, source=str(pretrained))
    if pretrained is None:
        return CLIP(cfg).to(device)

    checkpoint = read_checkpoint(pretrained)
    if cfg is None:
        cfg = apply_overrides(infer_model_config(checkpoint.state_dict), overrides)
    cfg.vision.timm_pretrained = False  # the checkpoint's weights replace timm's; never download them
    model = CLIP(cfg)
    state_dict = resize_positional_embeddings(checkpoint.state_dict, cfg)
    try:
        load_weights(model, state_dict, partial=partial_init, source=checkpoint.source)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{exc}{_architecture_hint(checkpoint.state_dict, name)}") from None
    return model.to(device)


def _architecture_hint(state_dict: dict, requested: Optional[str]) -> str:
    try:
        match = find_registered_name(infer_model_config(state_dict), ignore=ARCHITECTURE_ONLY)
    except CheckpointError:
        return ""
    if match is None or match == requested:
        return ""
    return f" (the checkpoint's shapes match the registered model {match!r}, not {requested!r})"


def create_model_and_transforms(
    name: Optional[str] = None,
    pretrained: Optional[PathLike] = None,
    *,
    device: Union[str, torch.device, None] = None,
    partial_init: bool = False,
    **overrides: Any,
) -> tuple[CLIP, Callable, Callable]:
    """`create_model(...)` plus (training transform, eval transform) for its image size, as in OpenCLIP."""
    model = create_model(name, pretrained, device=device, partial_init=partial_init, **overrides)
    size = model.config.vision.image_size
    return model, image_transform_train(size), image_transform_eval(size)


# ------------------------------------------------------------------------------------ OpenAI's load


def apply_openai_fp16(model: nn.Module) -> nn.Module:
    """Cast weights to float16 exactly as OpenAI's `clip.load` does on GPU, in place.

    Convolution, linear and attention weights and the `proj`/`text_projection` matrices become fp16;
    embeddings, LayerNorm and BatchNorm parameters and `logit_scale` stay fp32 (LayerNorm also computes
    in fp32), so features match OpenAI's to fp16 precision.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.half()
        for attr in ("in_proj_weight", "in_proj_bias", "proj", "text_projection"):
            value = getattr(module, attr, None)
            if isinstance(value, nn.Parameter):
                value.data = value.data.half()
    return model


def load(
    name_or_path: PathLike,
    device: Union[str, torch.device, None] = None,
    jit: bool = False,
    download_root: Optional[PathLike] = None,
) -> tuple[CLIP, Callable]:
    """OpenAI's `clip.load`: (model in eval mode, its eval preprocessing).

    `name_or_path`: a name from `available_models()` (OpenAI's weights, looked up in `download_root`,
    default ~/.cache/clip, and downloaded there with sha256 verification when absent), or a checkpoint
    path of any supported format, architecture read from the file. Off the CPU the weights are cast
    to fp16 as OpenAI does (`apply_openai_fp16`); on the CPU they are fp32. `jit=True` is refused: this
    library never executes TorchScript.
    """
    if jit:
        raise NotImplementedError(
            "jit=True is not supported: clip never runs TorchScript code from a file. Use jit=False (the default); "
            "the weights of OpenAI's archives are read without executing them."
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(pretrained=_resolve_weights(name_or_path, download_root)).to(device).eval()
    if device.type != "cpu":
        apply_openai_fp16(model)
    return model, image_transform_eval(model.config.vision.image_size)


def _resolve_weights(name_or_path: PathLike, download_root: Optional[PathLike]) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in _OPENAI_URLS:
        return _fetch_openai_weights(name, Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser())
    if name in list_models():
        raise FileNotFoundError(
            f"no released weights are known for {name!r}: use clip.create_model({name!r}) for a randomly "
            "initialised model, or pass a checkpoint path"
        )
    raise FileNotFoundError(f"{name!r} is neither a file nor one of {available_models()}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_openai_weights(name: str, root: Path) -> Path:
    url = _OPENAI_URLS[name]
    expected_sha256, filename = url.split("/")[-2:]
    target = root / filename
    if target.is_file():
        actual = _sha256(target)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{target} has sha256 {actual}, expected {expected_sha256} (incomplete or altered file); "
                "delete it to download it again"
            )
        return target
    try:
        _download(url, target, expected_sha256)
    except Exception as exc:  # offline, proxy, HTTP error, bad hash: the fix is the same for the user
        raise FileNotFoundError(
            f"weights for {name!r} are not in {root} and could not be downloaded ({exc}). Download {url} and put "
            f"it at {target} (or pass download_root= to the directory that holds {filename})."
        ) from exc
    return target


def _download(url: str, target: Path, expected_sha256: str) -> None:
    """Stream `url` to `<target>.tmp`, verify its sha256, then rename it to `target`: a failed download leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    logger.warning("downloading %s to %s", url, target)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected_sha256:
            raise CheckpointError(f"downloaded file has sha256 {digest.hexdigest()}, expected {expected_sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
