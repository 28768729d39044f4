"""Named model configurations: the one source of truth for architectures.

Names are OpenCLIP's (`ViT-B-32`, `RN50x4`, `ViT-L-14-336`, ...) for the same architectures, so
their users learn nothing new; `-quickgelu` variants use OpenAI's activation. OpenAI's own names
(`ViT-B/32`, `ViT-L/14@336px`, `RN50`) map to the QuickGELU variants their released weights need
(see `OPENAI_NAMES`). `clip.create_model(name)` and the trainer's `model.name=` both read this table.
"""

from __future__ import annotations

import copy

from clip.config import ModelConfig, TextConfig, VisionConfig


def _text(width: int = 512, layers: int = 12) -> TextConfig:
    # All registered text towers use 64-wide heads, like OpenAI's.
    return TextConfig(width=width, heads=width // 64, layers=layers)


def _vit(embed_dim, image_size, patch_size, width, layers, text, head_width=64, mlp_ratio=4.0) -> ModelConfig:
    vision = VisionConfig(
        kind="vit",
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        head_width=head_width,
        mlp_ratio=mlp_ratio,
    )
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text)


def _resnet(embed_dim, image_size, stage_blocks, width, text) -> ModelConfig:
    vision = VisionConfig(kind="resnet", image_size=image_size, stage_blocks=list(stage_blocks), width=width)
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text)


_BASE_MODELS: dict[str, ModelConfig] = {
    "RN50": _resnet(1024, 224, [3, 4, 6, 3], 64, _text(512)),
    "RN101": _resnet(512, 224, [3, 4, 23, 3], 64, _text(512)),
    "RN50x4": _resnet(640, 288, [4, 6, 10, 6], 80, _text(640)),
    "RN50x16": _resnet(768, 384, [6, 8, 18, 8], 96, _text(768)),
    "RN50x64": _resnet(1024, 448, [3, 15, 36, 10], 128, _text(1024)),
    "ViT-B-32": _vit(512, 224, 32, 768, 12, _text(512)),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, _text(512)),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, _text(768)),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, _text(768)),
    "ViT-H-14": _vit(1024, 224, 14, 1280, 32, _text(1024, 24), head_width=80),
    "ViT-g-14": _vit(1024, 224, 14, 1408, 40, _text(1024, 24), head_width=88, mlp_ratio=4.3637),
    "ViT-bigG-14": _vit(1280, 224, 14, 1664, 48, _text(1280, 32), head_width=104, mlp_ratio=4.9231),
}

# OpenCLIP ships `-quickgelu` variants for all of these (not for ViT-g-14).
_QUICKGELU_BASES = [name for name in _BASE_MODELS if name != "ViT-g-14"]


def _tiny_text() -> TextConfig:
    return TextConfig(width=32, heads=2, layers=2)


# Tiny models for tests and CPU smoke runs: real code paths, a few hundred thousand parameters in
# the towers (the 49,408-token embedding dominates).
_TINY_MODELS: dict[str, ModelConfig] = {
    "tiny-vit": ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="vit", image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=_tiny_text(),
    ),
    "tiny-resnet": ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="resnet", image_size=64, stage_blocks=[1, 1, 1, 1], width=16),
        text=_tiny_text(),
    ),
    "tiny-timm": ModelConfig(
        embed_dim=32,
        vision=VisionConfig(kind="timm", image_size=32, timm_model="test_resnet"),
        text=_tiny_text(),
    ),
}


def _quickgelu(cfg: ModelConfig) -> ModelConfig:
    cfg = copy.deepcopy(cfg)
    cfg.activation = "quick_gelu"
    return cfg


MODEL_CONFIGS: dict[str, ModelConfig] = {
    **_BASE_MODELS,
    **{f"{name}-quickgelu": _quickgelu(_BASE_MODELS[name]) for name in _QUICKGELU_BASES},
    **_TINY_MODELS,
}

# OpenAI's release names -> the registered architecture of their weights (all QuickGELU).
OPENAI_NAMES: dict[str, str] = {
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu",
    "RN50x64": "RN50x64-quickgelu",
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}


def list_models() -> list[str]:
    """Registered architecture names (OpenCLIP's naming)."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str) -> ModelConfig:
    """A fresh copy of the named config. Registry names win; OpenAI's names with a '/' are aliases.

    `RN50` etc. mean OpenCLIP's GELU configs here; `clip.load("RN50")` resolves through
    `OPENAI_NAMES` because it loads OpenAI's QuickGELU weights.
    """
    if name in MODEL_CONFIGS:
        return copy.deepcopy(MODEL_CONFIGS[name])
    if name in OPENAI_NAMES:
        return copy.deepcopy(MODEL_CONFIGS[OPENAI_NAMES[name]])
    raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
