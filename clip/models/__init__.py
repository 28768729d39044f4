"""Model definitions (towers, the CLIP module, the registry of named architectures) and their weights:
`weights` (safe readers, strict loading, export), `convert` (other checkpoint formats), `torchscript`."""

from clip.models.clip import CLIP
from clip.models.registry import OPENAI_NAMES, get_model_config, list_models

__all__ = ["CLIP", "OPENAI_NAMES", "get_model_config", "list_models"]
