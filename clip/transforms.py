"""Image preprocessing: OpenAI's eval transform and the training transform (docs/data.md "Pixels")."""

from __future__ import annotations

import PIL
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms import v2

# Channel statistics of OpenAI's CLIP training data (used by every released CLIP checkpoint).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Modes whose conversion to RGB commutes with resizing: RGB itself, and L, whose RGB is its one band
# three times. Any other mode's conversion does not (Pillow premultiplies alpha for the resize, resizes
# palette and 1-bit images nearest-neighbour; CMYK's conversion multiplies channels, I;16's clips), so
# those are resized by Pillow in their own mode and converted afterwards, as OpenCLIP does.
_TENSOR_RESIZE_MODES = ("RGB", "L")

# Pillow resizes in two passes, rounding to uint8 between them, so the pass order changes pixels (by up
# to 20 levels on noise). torchvision runs the horizontal pass first, as Pillow did before 13.0; Pillow
# 13 runs the vertical pass first when the height shrinks by more than twice what the width does.
_PILLOW_MAY_RESIZE_VERTICALLY_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def _resize_uint8(pixels: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Bicubic antialiased resize of [C, H, W] uint8 pixels, its passes in the order Pillow runs them."""
    height, width = pixels.shape[-2:]
    shrink_height, shrink_width = height - size[0], width - size[1]
    if _PILLOW_MAY_RESIZE_VERTICALLY_FIRST and shrink_height > 0 and shrink_height > 2 * shrink_width:
        pixels = v2.functional.resize(pixels, [size[0], width], T.InterpolationMode.BICUBIC, antialias=True)
    return v2.functional.resize(pixels, size, T.InterpolationMode.BICUBIC, antialias=True)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform_eval(image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode: str = "shortest") -> T.Compose:
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


class RandomResizedCropRGB:
    """OpenCLIP's training crop: a PIL image of any mode -> [3, S, S] uint8 RGB.

    The crop box comes from torchvision's `RandomResizedCrop.get_params`, the draws OpenCLIP's
    transform makes. RGB and L crops are resized on uint8 tensors by torchvision's antialiased bicubic
    kernel, about 4x faster than Pillow's and the largest cost of loading a sample; its pixels are
    within 2 of 255 levels of Pillow's (docs/data.md "Pixels"). Other modes take Pillow's path,
    OpenCLIP's exact pixels.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = [size, size], tuple(scale), tuple(ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        if image.mode in _TENSOR_RESIZE_MODES:
            pixels = v2.functional.pil_to_tensor(image)  # [C, H, W] uint8, channels-last in memory
            crop = _resize_uint8(pixels[:, top : top + height, left : left + width], self.size)
            return crop.expand(3, -1, -1)  # L: its band as R, G and B, as Pillow's convert("RGB") does
        crop = F.resized_crop(image, top, left, height, width, self.size, T.InterpolationMode.BICUBIC)
        return v2.functional.pil_to_tensor(crop.convert("RGB"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size[0]}, scale={self.scale}, ratio={self.ratio})"


def image_transform_train(
    image_size: int, scale: tuple[float, float] = (0.9, 1.0), mean=OPENAI_MEAN, std=OPENAI_STD
) -> v2.Compose:
    """OpenCLIP's training transform: random resized crop (default scale range (0.9, 1.0)), RGB, normalise."""
    return v2.Compose(
        [
            RandomResizedCropRGB(image_size, scale=tuple(scale)),
            # Kept as the last two steps: the data loader runs them on the batch where the model runs.
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std, inplace=True),  # on ToDtype's fresh tensor: no second copy
        ]
    )
