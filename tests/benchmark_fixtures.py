"""An oracle CLIP whose predictions are known, and images that carry their class in their colour.

An image of class `g` (an index in some global class list, e.g. ImageNet's 1000) is one flat colour
that encodes `g`; the oracle's image feature is the one-hot of `g` (plus, optionally, a stronger
one-hot of a distractor class), and its text feature for a prompt is the one-hot of the class whose
name the prompt holds. Zero-shot with the right class names in the right order is then exactly 100 %
top-1; a wrong label mapping, class order or class subset gives less.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from clip.transforms import OPENAI_MEAN, OPENAI_STD
from clip.zero_shot import format_prompt


def colour_png(global_id: int, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size + 8, size), (global_id % 256, global_id // 256, 77)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_colour_image(path: Path, global_id: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(colour_png(global_id))


def decode_colour(images: torch.Tensor) -> torch.Tensor:
    """The global ids of a batch of eval-transformed flat-colour images [B, 3, H, W]."""
    centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2]
    pixels = centre * torch.tensor(OPENAI_STD) + torch.tensor(OPENAI_MEAN)
    levels = (pixels * 255).round().long()
    return levels[:, 0] + 256 * levels[:, 1]


class OracleCLIP(nn.Module):
    """Reads the class from an image's colour; knows each class name's global id.

    `names[g]` is the name of global class `g`; `tokenize` turns prompts made from `templates` and
    those names into ids. `distractor`: a global class scored above the true one on every image."""

    def __init__(self, names: list[str], templates: list[str], distractor: int | None = None):
        super().__init__()
        self.dim = len(names)
        self.distractor = distractor
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the evaluation a device to read
        self.prompt_ids: dict[str, int] = {}
        for global_id, name in enumerate(names):
            for template in templates:
                self.prompt_ids.setdefault(format_prompt(template, name), global_id)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.prompt_ids[prompt]] for prompt in prompts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return nn.functional.one_hot(tokens[:, 0], self.dim).float()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = nn.functional.one_hot(decode_colour(images), self.dim).float()
        if self.distractor is not None:
            features[:, self.distractor] += 2.0
        return nn.functional.normalize(features, dim=-1)
