"""Entry points for notebooks and scripts: OpenAI's `load`/`available_models` and OpenCLIP-style factories.

    model, preprocess = clip.load("ViT-B/32")                      # OpenAI's API and behaviour
    model, train_tf, eval_tf = clip.create_model_and_transforms("ViT-B-32", pretrained="model.safetensors")
    model, train_tf, eval_tf = clip.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")
    model, preprocess = clip.load("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    model = clip.create_model("ViT-B-16", image_size=384, patch_dropout=0.5)

Which activation a loaded model uses (it cannot be read from weights):
- an OpenCLIP pretrained tag decides (its table says what its weights were trained with);
- else a model name decides (`ViT-B-32` is GELU, `ViT-B-32-quickgelu` and OpenAI's `ViT-B/32` QuickGELU);
- an OpenCLIP hub repository's `open_clip_config.json` says it (`quick_gelu`);
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

from clip.config import (
    ModelConfig,
    TextConfig,
    VisionConfig,
    model_config_from_dict,
    model_config_to_dict,
    validate_model_config,
)
from clip.hub import Preprocess, is_hub_name, list_pretrained, resolve_hub_repo, resolve_pretrained
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
from clip.models.weights import CheckpointError, CheckpointMismatchError, file_sha256, load_weights
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
    cache_dir: Optional[PathLike] = None,
    **overrides: Any,
) -> CLIP:
    """Build a float32 CLIP by registered name, from a checkpoint, or both; in train mode like any new module.

    `name`: a registered architecture (`clip.list_models()`; OpenAI's names are aliases), or an
    `hf-hub:ORG/NAME[@REVISION]` repository (OpenCLIP or transformers format) that holds both the
    architecture and the weights. Without it the architecture comes from the checkpoint: its stored
    config, else its tensor shapes.
    `pretrained`: a checkpoint path of any supported format (docs/api.md), an OpenCLIP pretrained tag of
    `name` (`clip.list_pretrained()`), or an `hf-hub:` name; tags and repositories come from
    huggingface_hub's cache, offline first (`clip.hub`; `cache_dir` overrides the cache directory). A tag
    sets the activation its weights were trained with. A stored config that differs from the requested one
    raises `CheckpointMismatchError` before tensors are read; then loading is strict. At another image
    size, positional embeddings are interpolated.
    `partial_init=True` loads only the tensors that fit and logs what was skipped.
    `overrides`: config changes, e.g. `image_size=336`, `patch_dropout=0.5`, `activation="gelu"`,
    `context_length=64` (see `apply_overrides`).
    """
    return _create_model(name, pretrained, device, partial_init, cache_dir, overrides)[0]


def _create_model(name, pretrained, device, partial_init, cache_dir, overrides) -> tuple[CLIP, Preprocess]:
    if name is None and pretrained is None:
        raise ValueError("create_model needs a model name, a pretrained checkpoint path, or both")
    weights = None
    if is_hub_name(name):
        if pretrained is not None:
            raise ValueError(f"{name!r} names its weights already; pretrained={pretrained!r} cannot be added to it")
        weights, name = resolve_hub_repo(name, cache_dir), None
    elif pretrained is not None:
        weights = resolve_pretrained(pretrained, name, cache_dir)
    stored = None
    if weights is not None:
        stored = model_config_to_dict(weights.config) if weights.config else read_checkpoint_config(weights.path)
    cfg = get_model_config(name) if name is not None else model_config_from_dict(stored) if stored else None
    if cfg is not None:
        if weights is not None and weights.activation not in (None, cfg.activation):
            logger.warning("%s was trained with %s: using it instead of %s", weights.source, weights.activation,
                           cfg.activation)  # fmt: skip
            cfg.activation = weights.activation
        cfg = apply_overrides(cfg, overrides)
        if stored is not None and not partial_init:
            check_model_config(stored, cfg, source=weights.source)
    if weights is None:
        return CLIP(cfg).to(device), Preprocess()

    checkpoint = read_checkpoint(weights.path)
    if cfg is None:
        inferred = infer_model_config(checkpoint.state_dict, activation=weights.activation or "quick_gelu")
        cfg = apply_overrides(inferred, overrides)
    cfg.vision.timm_pretrained = False  # the checkpoint's weights replace timm's; never download them
    model = CLIP(cfg)
    state_dict = resize_positional_embeddings(checkpoint.state_dict, cfg)
    try:
        load_weights(model, state_dict, partial=partial_init, source=checkpoint.source)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{exc}{_architecture_hint(checkpoint.state_dict, name)}") from None
    return model.to(device), weights.preprocess


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
    cache_dir: Optional[PathLike] = None,
    **overrides: Any,
) -> tuple[CLIP, Callable, Callable]:
    """`create_model(...)` plus (training transform, eval transform) for its image size, as in OpenCLIP.

    The transforms normalise with the mean and std the weights were trained with (a tag's or a hub
    repository's, else OpenAI's)."""
    model, preprocess = _create_model(name, pretrained, device, partial_init, cache_dir, overrides)
    return model, *_transforms(model, preprocess)


def _transforms(model: CLIP, preprocess: Preprocess) -> tuple[Callable, Callable]:
    size = model.config.vision.image_size
    stats = dict(mean=preprocess.mean, std=preprocess.std)
    return (
        image_transform_train(size, **stats),
        image_transform_eval(size, resize_mode=preprocess.resize_mode, **stats),
    )


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
    name: PathLike,
    device: Union[str, torch.device, None] = None,
    jit: bool = False,
    download_root: Optional[PathLike] = None,
    *,
    pretrained: Optional[str] = None,
) -> tuple[CLIP, Callable]:
    """OpenAI's `clip.load`: (model in eval mode, its eval preprocessing).

    `name`: a name from `available_models()` (OpenAI's weights, looked up in `download_root`, default
    ~/.cache/clip, and downloaded there with sha256 verification when absent), a checkpoint path of any
    supported format (architecture read from the file), an `hf-hub:ORG/NAME[@REVISION]` repository, or
    a registered model name with `pretrained=` one of its OpenCLIP tags (`clip.list_pretrained()`).
    Hub files come from huggingface_hub's cache, offline first (`download_root`, when given, replaces
    its directory). Off the CPU the weights are cast to fp16 as OpenAI does (`apply_openai_fp16`); on the
    CPU they are fp32. `jit=True` is refused: this library never executes TorchScript.
    """
    if jit:
        raise NotImplementedError(
            "jit=True is not supported: clip never runs TorchScript code from a file. Use jit=False (the default); "
            "the weights of OpenAI's archives are read without executing them."
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if pretrained is not None or is_hub_name(name):
        model, preprocess = _create_model(name, pretrained, None, False, download_root, {})
    else:
        model, preprocess = _create_model(None, _resolve_weights(name, download_root), None, False, None, {})
    model = model.to(device).eval()
    if device.type != "cpu":
        apply_openai_fp16(model)
    return model, _transforms(model, preprocess)[1]


def _resolve_weights(name: PathLike, download_root: Optional[PathLike]) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path
    name = str(name)
    if name in _OPENAI_URLS:
        return _fetch_openai_weights(name, Path(download_root or DEFAULT_DOWNLOAD_ROOT).expanduser())
    if name in list_models():
        tags = [tag for _, tag in list_pretrained(name)]
        with_tags = f", or clip.load({name!r}, pretrained=TAG) with one of its tags: {', '.join(tags)}" if tags else ""
        raise FileNotFoundError(
            f"no OpenAI weights are known for {name!r}: use clip.create_model({name!r}) for a randomly "
            f"initialised model, pass a checkpoint path{with_tags}"
        )
    raise FileNotFoundError(f"{name!r} is neither a file, an hf-hub: name, nor one of {available_models()}")


def _fetch_openai_weights(name: str, root: Path) -> Path:
    url = _OPENAI_URLS[name]
    expected_sha256, filename = url.split("/")[-2:]
    target = root / filename
    if target.is_file():
        actual = file_sha256(target)
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
