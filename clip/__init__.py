"""CLIP training library with OpenAI's `clip` API.

    import clip
    model, preprocess = clip.load("ViT-B/32")

Importing `clip` loads torch and the model code only: never Hydra, wandb or webdataset.
"""

from clip.api import available_models, create_model, create_model_and_transforms, load
from clip.hub import list_pretrained
from clip.models import CLIP, list_models
from clip.models.hub_export import export_model
from clip.models.weights import CheckpointFormatError, CheckpointMismatchError, UnsafeCheckpointError
from clip.tokenizer import get_tokenizer, tokenize
from clip.version import __version__

# OpenAI's submodules, attributes of the package after `import clip` as in OpenAI's package.
from clip import clip, model, simple_tokenizer  # noqa: F401  (isort: skip)

__all__ = [
    "CLIP",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "available_models",
    "create_model",
    "create_model_and_transforms",
    "export_model",
    "get_tokenizer",
    "list_models",
    "list_pretrained",
    "load",
    "tokenize",
    "__version__",
]
