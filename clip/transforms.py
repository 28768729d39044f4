"""Image preprocessing: OpenAI's eval transform and the training transform."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

# Channel statistics of OpenAI's CLIP training data (used by every released CLIP checkpoint).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform_eval(
    image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode: str = "shortest"
) -> T.Compose:
    """OpenAI's preprocessing: bicubic resize of the short side, center crop, RGB, normalise.

    `resize_mode="squash"` resizes the whole image to a square instead (OpenCLIP's option, which some
    released weights were evaluated with); `mean`/`std` are those the weights were trained with.
    """
    if resize_mode == "shortest":
        resize = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    elif resize_mode == "squash":
        resize = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        raise ValueError(f"resize_mode={resize_mode!r}; expected 'shortest' or 'squash'")
    return T.Compose([*resize, _to_rgb, T.ToTensor(), T.Normalize(mean, std)])


def image_transform_train(
    image_size: int, scale: tuple[float, float] = (0.9, 1.0), mean=OPENAI_MEAN, std=OPENAI_STD
) -> v2.Compose:
    """RGB, RandomResizedCrop (OpenCLIP's default scale range (0.9, 1.0)), normalise.

    The crop is resized on the uint8 pixels by torchvision's antialiased bicubic kernel, about 4x
    faster than PIL's (which OpenCLIP's transform uses) and the largest cost of loading a sample. It
    draws the same crop boxes from torch's RNG as OpenCLIP's transform, and its pixels differ from
    PIL's by at most 2 of 255 levels, in well under 1% of them (tests/test_transforms.py).
    """
    return v2.Compose(
        [
            _to_rgb,
            v2.PILToTensor(),  # [3, H, W] uint8, channels-last in memory: the layout the fast kernel takes
            v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std, inplace=True),  # on ToDtype's fresh tensor: no second copy
        ]
    )
