"""CLIP training library with OpenAI's `clip` API.

    import clip
    model, preprocess = clip.load("ViT-B/32")

Importing `clip` loads torch and the model code only: never Hydra, wandb or webdataset.
"""

from clip.models import CLIP, list_models
from clip.tokenizer import get_tokenizer, tokenize

__version__ = "0.1.0"

__all__ = ["CLIP", "get_tokenizer", "list_models", "tokenize", "__version__"]
