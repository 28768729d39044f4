"""OpenAI's `clip.model` module: `build_model(state_dict)` and the names OpenAI's code imports from it.

Aliases onto the library's model code (`clip.models`); nothing here is a second implementation.
"""

from __future__ import annotations

from typing import Mapping

import torch

from clip.api import apply_openai_fp16 as convert_weights
from clip.models.clip import CLIP
from clip.models.convert import as_openai_state_dict, infer_model_config
from clip.models.layers import LayerNorm, QuickGELU
from clip.models.weights import load_weights

__all__ = ["CLIP", "LayerNorm", "QuickGELU", "build_model", "convert_weights"]


def build_model(state_dict: Mapping[str, torch.Tensor]) -> CLIP:
    """OpenAI's `build_model`: the CLIP of an OpenAI-layout state dict, in eval mode, as OpenAI builds it.

    The architecture comes from the tensor shapes (`infer_model_config`; QuickGELU, as OpenAI's weights
    need), loading is strict, and the weights end in OpenAI's mixed fp16 (`convert_weights`); call
    `.float()` for fp32, as OpenAI's `load` does on the CPU. Unlike OpenAI's, `state_dict` is not modified.
    """
    state_dict = as_openai_state_dict(state_dict, "build_model(state_dict)")
    model = CLIP(infer_model_config(state_dict))
    load_weights(model, state_dict, source="build_model(state_dict)")
    return convert_weights(model).eval()
