"""Image preprocessing: OpenAI's eval transform and the training transform."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

# Channel statistics of OpenAI's CLIP training data (used by every released CLIP checkpoint).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform_eval(image_size: int) -> T.Compose:
    """OpenAI's preprocessing: bicubic resize of the short side, center crop, RGB, normalise."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            _to_rgb,
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )


def image_transform_train(image_size: int, scale: tuple[float, float] = (0.9, 1.0)) -> T.Compose:
    """RandomResizedCrop (OpenCLIP's default scale range (0.9, 1.0)), RGB, normalise."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            _to_rgb,
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
