"""Model definitions: towers, the CLIP module and the registry of named architectures."""

from clip.models.clip import CLIP
from clip.models.registry import OPENAI_NAMES, get_model_config, list_models

__all__ = ["CLIP", "OPENAI_NAMES", "get_model_config", "list_models"]
