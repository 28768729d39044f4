"""`export_model`: one entry point for every export format, and the writers of other libraries' directories.

- ``"clip"`` (the default): our single safetensors file (`clip.models.export`), read by `clip.load` and
  by OpenCLIP's `pretrained=`. Holds every architecture and tokenizer.
- ``"hf"``: a transformers `CLIPModel` directory (config.json, model.safetensors, OpenAI's tokenizer
  files, preprocessor_config.json) for `CLIPModel`/`CLIPProcessor.from_pretrained`. ViT image towers
  only: transformers has no CLIP class with a ResNet or timm tower, nor a logit bias.
- ``"open_clip"``: OpenCLIP's hub layout (open_clip_config.json + open_clip_model.safetensors) for
  `open_clip.create_model_and_transforms("local-dir:DIR")`, or `"hf-hub:ORG/NAME"` once uploaded. ViT,
  ResNet and timm towers.

Both directory formats tokenize with OpenAI's BPE, so a model with its own tokenizer.json is refused.
Their image preprocessing is our eval transform's: shortest side resized (bicubic) to the model's image
size, center crop, OpenAI's mean and std.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

from safetensors.torch import save_file

from clip.config import ModelConfig
from clip.models.clip import CLIP
from clip.models.export import export_state_dict
from clip.models.hf_format import model_config_to_hf_config, openai_state_dict_to_hf
from clip.models.weights import PathLike
from clip.tokenizer import EOT_TEXT, OPENAI, SOT_TEXT, get_tokenizer, openai_bpe
from clip.transforms import OPENAI_MEAN, OPENAI_STD

EXPORT_FORMATS = ("clip", "hf", "open_clip")


def export_model(
    model: CLIP, path: PathLike, format: str = "clip", metadata: Optional[Mapping[str, str]] = None
) -> Path:
    """Export a `clip.CLIP` (its `config` and weights) to `path` in one of `EXPORT_FORMATS` (module docstring).

    `format="clip"` writes one file; `"hf"` and `"open_clip"` write a new directory (an existing one must
    be empty: stale weights beside the new ones could be read instead). `metadata` (string entries, e.g.
    the run name) is stored by the "clip" format only. A model a format cannot hold raises ValueError
    naming the reason, before anything is written.
    """
    if format == "clip":
        return export_state_dict(model.state_dict(), model.config, path, metadata)
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if metadata:
        raise ValueError(f"metadata= is stored by format='clip' only; format={format!r} has no place for it")
    _check_openai_tokenizer(model.config, format)
    if format == "hf":
        files = _hf_files(model)
    else:
        files = _open_clip_files(model)
    return _write_directory(Path(path), files)


def _check_openai_tokenizer(cfg: ModelConfig, format: str) -> None:
    text = cfg.text
    if text.tokenizer != OPENAI:
        raise ValueError(
            f"cannot export as {format!r}: model.text.tokenizer={text.tokenizer!r} is a custom vocabulary, and "
            "the CLIP tokenizers of transformers and OpenCLIP implement OpenAI's BPE only. Use format='clip', "
            "which carries the tokenizer.json."
        )
    get_tokenizer(text)  # raises if vocab_size or eot_token_id contradict OpenAI's vocabulary


# -------------------------------------------------------------------------------- transformers


def _hf_files(model: CLIP) -> dict:
    cfg = model.config
    hf_config = model_config_to_hf_config(cfg)  # raises for towers CLIPModel cannot hold
    weights = openai_state_dict_to_hf(model.state_dict())
    tokens, merges = openai_bpe()
    special = {"bos_token": SOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
    size = cfg.vision.image_size
    return {
        "config.json": hf_config,
        # transformers reads only safetensors files whose metadata names the framework
        "model.safetensors": lambda file: save_file(_contiguous(weights), str(file), metadata={"format": "pt"}),
        "vocab.json": {token: i for i, token in enumerate(tokens)},
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": special,
        "tokenizer_config.json": {
            "tokenizer_class": "CLIPTokenizer",
            "processor_class": "CLIPProcessor",
            "model_max_length": cfg.text.context_length,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            **special,
        },
        "preprocessor_config.json": {
            "image_processor_type": "CLIPImageProcessor",
            "processor_class": "CLIPProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"shortest_edge": size},
            "resample": 3,  # PIL's BICUBIC
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(OPENAI_MEAN),
            "image_std": list(OPENAI_STD),
        },
    }


# -------------------------------------------------------------------------------------- OpenCLIP


def open_clip_model_config(cfg: ModelConfig) -> dict:
    """Our ModelConfig as OpenCLIP's `model_cfg` (the keyword arguments of its `CLIP` class)."""
    vision = cfg.vision
    if vision.kind == "vit":
        vision_cfg = {"patch_size": vision.patch_size, "width": vision.width, "layers": vision.layers,
                      "head_width": vision.head_width, "mlp_ratio": vision.mlp_ratio}  # fmt: skip
    elif vision.kind == "resnet":
        vision_cfg = {"layers": list(vision.stage_blocks), "width": vision.width, "head_width": vision.head_width}
    else:  # timm: the trunk's own pooling ("" keeps it) and a bias-free linear projection, as ours
        vision_cfg = {"timm_model_name": vision.timm_model, "timm_model_pretrained": False, "timm_pool": "",
                      "timm_proj": "linear", "timm_proj_bias": False}  # fmt: skip
    text = cfg.text
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.activation == "quick_gelu",
        "init_logit_scale": cfg.init_logit_scale,
        "vision_cfg": {"image_size": vision.image_size, **vision_cfg},
        # OpenCLIP pools at argmax(ids): the end-of-text token, the largest of OpenAI's ids
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
        },  # fmt: skip
    }
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


def _open_clip_files(model: CLIP) -> dict:
    preprocess = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # fmt: skip
    state_dict = model.state_dict()
    return {
        "open_clip_config.json": {"model_cfg": open_clip_model_config(model.config), "preprocess_cfg": preprocess},
        "open_clip_model.safetensors": lambda file: save_file(_contiguous(state_dict), str(file)),
    }


# ----------------------------------------------------------------------------------------- files


def _contiguous(tensors: Mapping) -> dict:
    return {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}


def _write_directory(path: Path, files: dict) -> Path:
    """Write {name: JSON object, text, or writer(file)} into a sibling temporary directory, then rename it
    to `path`, so that a failed export leaves no half-written directory behind."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory: export into a new directory")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, content in files.items():
            if callable(content):
                content(tmp / name)
            elif isinstance(content, str):
                (tmp / name).write_text(content, encoding="utf-8")
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
