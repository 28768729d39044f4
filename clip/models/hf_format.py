"""Hugging Face `CLIPModel` directories <-> our config and OpenAI's state-dict layout.

Read by `clip.models.convert.read_checkpoint` (any HF CLIP directory loads) and written by
`clip.models.hub_export` (`export_model(..., format="hf")`). The two mappings are inverses: a ViT
CLIP exported and read back has the same config and tensors.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch

from clip.config import ModelConfig, TextConfig, VisionConfig
from clip.models.weights import CheckpointFormatError, PathLike, load_safetensors_file, load_torch_file


def read_hf_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{path / 'config.json'}: not valid JSON: {exc}") from None
    if config.get("model_type") != "clip":
        raise CheckpointFormatError(
            f"{path / 'config.json'}: model_type={config.get('model_type')!r}; only Hugging Face CLIPModel ('clip') "
            "directories are supported"
        )
    return config


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_safetensors_file(path / "model.safetensors")[0]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if Path(shard).name != shard:  # shard names are plain file names; never follow a path out of the dir
                raise CheckpointFormatError(f"{index}: shard name {shard!r} is not a file name")
            tensors.update(load_safetensors_file(path / shard)[0])
        return tensors
    if (path / "pytorch_model.bin").is_file():
        return load_torch_file(path / "pytorch_model.bin")
    raise CheckpointFormatError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def mlp_ratio_of(width: int, mlp_width: int) -> float:
    # The config stores a ratio and the model truncates width * ratio; nudge the float up when the
    # division rounded below the exact hidden size (e.g. 1408 * (6144 / 1408) < 6144 in floating point).
    ratio = mlp_width / width
    return ratio if int(width * ratio) == mlp_width else math.nextafter(ratio, math.inf)


def hf_config_to_model_config(hf: dict, path: PathLike = "config.json") -> ModelConfig:
    """Hugging Face `CLIPConfig` dict -> ModelConfig; raises for options our towers do not implement."""
    try:
        vision, text = hf["vision_config"], hf["text_config"]
        activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
        problems = []
        if len(activations) > 1 or not activations <= {"quick_gelu", "gelu"}:
            problems.append(f"hidden_act {sorted(activations)} (supported: one of quick_gelu, gelu for both towers)")
        for section in (vision, text):
            if section.get("layer_norm_eps", 1e-5) != 1e-5:
                problems.append(f"layer_norm_eps={section['layer_norm_eps']} (supported: 1e-5)")
        if vision.get("num_channels", 3) != 3:
            problems.append(f"vision num_channels={vision['num_channels']} (supported: 3)")
        if problems:
            raise CheckpointFormatError(f"{path}: unsupported Hugging Face CLIP config: {'; '.join(problems)}")
        # Configs written before transformers PR #24773 say eos_token_id=2 and pool at argmax(input_ids),
        # which is the end-of-text token exactly when it is the largest id, as in OpenAI's vocabulary.
        eos = text.get("eos_token_id", 2)
        vision_cfg = VisionConfig(
            kind="vit",
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            width=vision["hidden_size"],
            layers=vision["num_hidden_layers"],
            head_width=vision["hidden_size"] // vision["num_attention_heads"],
            mlp_ratio=mlp_ratio_of(vision["hidden_size"], vision["intermediate_size"]),
        )
        text_cfg = TextConfig(
            context_length=text["max_position_embeddings"],
            vocab_size=text["vocab_size"],
            width=text["hidden_size"],
            heads=text["num_attention_heads"],
            layers=text["num_hidden_layers"],
            mlp_ratio=mlp_ratio_of(text["hidden_size"], text["intermediate_size"]),
            eot_token_id=text["vocab_size"] - 1 if eos == 2 else eos,
        )
        return ModelConfig(
            embed_dim=hf["projection_dim"],
            vision=vision_cfg,
            text=text_cfg,
            activation=activations.pop(),
            init_logit_scale=hf.get("logit_scale_init_value", math.log(1 / 0.07)),
        )
    except KeyError as exc:
        raise CheckpointFormatError(f"{path}: Hugging Face CLIP config lacks {exc}") from None


def model_config_to_hf_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> Hugging Face `CLIPConfig` dict (config.json), the inverse of `hf_config_to_model_config`.

    Raises ValueError naming what transformers' CLIPModel cannot hold: an image tower that is not a ViT,
    a logit bias, an end-of-text id of 2 (which transformers reads as its legacy argmax pooling).
    """
    problems = []
    if cfg.vision.kind != "vit":
        problems.append(
            f"model.vision.kind={cfg.vision.kind!r}: transformers' CLIPModel has a ViT image tower only "
            "(no ResNet or timm backbone)"
        )
    if cfg.init_logit_bias is not None:
        problems.append("model.init_logit_bias is set: transformers' CLIPModel has no logit bias (SigLIP's)")
    if cfg.text.eot_token_id == 2:
        problems.append("model.text.eot_token_id=2: transformers pools such configs at argmax(input_ids) instead")
    if problems:
        raise ValueError("cannot export as a Hugging Face CLIPModel: " + "; ".join(problems))
    vision, text = cfg.vision, cfg.text
    common = {"hidden_act": cfg.activation, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim}  # same names
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "hidden_size": vision.width,
            "intermediate_size": vision.mlp_width,
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.heads,
            **common,
        },
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.context_length,
            "hidden_size": text.width,
            "intermediate_size": text.mlp_width,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "eos_token_id": text.eot_token_id,
            **common,
        },
    }


# One table of names, read in both directions: Hugging Face -> OpenAI layout when loading a
# CLIPModel directory, OpenAI layout -> Hugging Face when exporting one.
_HF_TOWERS = {"text_model": "", "vision_model": "visual."}  # block prefix in each layout
_HF_BLOCK = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_BLOCK_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's attribute name
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear weights [E, D] in HF, plain [D, E] matrices in OpenAI's layout.
_HF_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_OPENAI_BLOCK = re.compile(r"^(visual\.|)transformer\.resblocks\.(\d+)\.(.+)$")
# The same tables inverted, for the export.
_OPENAI_TOWERS = {ours: hf for hf, ours in _HF_TOWERS.items()}
_OPENAI_BLOCK_PARTS = {ours: hf for hf, ours in _HF_BLOCK_PARTS.items()}
_OPENAI_TOP = {ours: hf for hf, ours in _HF_TOP.items()}
_OPENAI_TRANSPOSED = {ours: hf for hf, ours in _HF_TRANSPOSED.items()}


def hf_state_dict_to_openai(hf: Mapping[str, torch.Tensor], cfg: ModelConfig, path: PathLike = "") -> dict:
    """Rename HF `CLIPModel` weights to OpenAI's layout; q/k/v projections are stacked into `in_proj`.

    Every HF key must be understood: anything else raises, naming the keys (strict loading starts here).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # "<block>.attn.in_proj_weight" -> {q, k, v}
    unknown = []
    for key, value in hf.items():
        if key.endswith("position_ids"):  # an index buffer older transformers versions saved
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _HF_BLOCK.match(key):
            tower, index, rest = match.groups()
            block = f"{_HF_TOWERS[tower]}transformer.resblocks.{index}"
            if attn := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv[f"{block}.attn.in_proj_{attn.group(2)}"][attn.group(1)] = value
                continue
            module, _, param = rest.rpartition(".")
            if module not in _HF_BLOCK_PARTS:
                unknown.append(key)
                continue
            out[f"{block}.{_HF_BLOCK_PARTS[module]}.{param}"] = value
        else:
            unknown.append(key)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointFormatError(f"{path}: {key} lacks {sorted({'q', 'k', 'v'} - set(parts))} projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise CheckpointFormatError(f"{path}: Hugging Face keys with no CLIP counterpart: {', '.join(unknown[:10])}")
    return out


def openai_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hf_state_dict_to_openai` for a ViT CLIP: `in_proj` is split into q/k/v projections.

    A key the table does not know (a ResNet or timm tower, a SigLIP logit_bias) raises ValueError naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _OPENAI_TOP:
            out[_OPENAI_TOP[key]] = value
        elif key in _OPENAI_TRANSPOSED:
            out[_OPENAI_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _OPENAI_BLOCK.match(key):
            tower, index, rest = match.groups()
            block = f"{_OPENAI_TOWERS[tower]}.encoder.layers.{index}"
            module, _, param = rest.rpartition(".")
            if attn := re.fullmatch(r"attn\.in_proj_(weight|bias)", rest):
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{block}.self_attn.{name}_proj.{attn.group(1)}"] = part.contiguous()
            elif module in _OPENAI_BLOCK_PARTS:
                out[f"{block}.{_OPENAI_BLOCK_PARTS[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"weights with no Hugging Face CLIPModel counterpart: {', '.join(unknown[:10])}")
    return out
