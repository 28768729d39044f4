"""OpenAI's `clip.clip` module: the names OpenAI's code and notebooks import from it, as aliases.

from clip.clip import _transform, available_models, load, tokenize
"""

from torchvision.transforms import InterpolationMode

from clip.api import _OPENAI_URLS as _MODELS  # noqa: F401
from clip.api import available_models, load
from clip.model import build_model  # noqa: F401
from clip.tokenizer import tokenize
from clip.transforms import _to_rgb as _convert_image_to_rgb  # noqa: F401
from clip.transforms import image_transform_eval as _transform  # noqa: F401

BICUBIC = InterpolationMode.BICUBIC

__all__ = ["available_models", "load", "tokenize"]
