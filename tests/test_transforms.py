"""Image transforms against OpenCLIP's (whose eval transform is OpenAI's preprocessing), for every PIL
mode web data holds.

Train-transform bound for RGB and L (resized on uint8 tensors, OpenCLIP's with Pillow): both kernels
compute the same bicubic weights, run the same two passes in the same order (clip/transforms.py picks
Pillow's), round to uint8 after each and clip; only the weights' fixed-point precision differs
(Pillow 22 bits, torchvision 15 bits of the largest weight: under 0.1 level over a whole kernel). So
the first pass's pixels differ by at most 1 level, the second pass spreads that by at most the L1 norm
of its normalised weights (at most 1.27 for bicubic with a = -0.5, reached at the image edges), and
two results less than 2 levels apart round to at most 2 levels apart.
"""

import io
import warnings

import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from clip.transforms import OPENAI_MEAN, OPENAI_STD, image_transform_eval, image_transform_train

MODES = ["RGB", "RGB-JPEG", "L", "LA", "RGBA", "P", "P-transparent-index", "P-transparent-bytes", "1", "CMYK", "I;16"]
TENSOR_RESIZED = {"RGB", "RGB-JPEG", "L"}  # the rest take Pillow's path: OpenCLIP's pixels exactly
MEAN, STD = (torch.tensor(stats).view(3, 1, 1) for stats in (OPENAI_MEAN, OPENAI_STD))
HEIGHT, WIDTH = 120, 90
# (top, left, height, width): upscaled; shrunk with the horizontal pass first; shrunk with the vertical
# pass first under Pillow >= 13 (the height shrinks by more than twice the width); the whole image
BOXES = [(30, 20, 24, 30), (10, 5, 100, 80), (0, 0, 120, 60), (0, 0, HEIGHT, WIDTH)]


def _image(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), "RGB")  # noise: worst case
    alpha = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8))
    alpha.paste(0, (0, 0, WIDTH // 3, HEIGHT))  # a fully transparent band, colours under it arbitrary
    if mode == "RGB":
        return rgb
    if mode == "RGB-JPEG":
        smooth = np.stack([*np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT)), np.zeros((HEIGHT, WIDTH))], -1)
        pixels = np.clip(smooth * 2 + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=85)
        return Image.open(io.BytesIO(buffer.getvalue()))
    if mode in ("L", "1"):
        return rgb.convert(mode)
    if mode in ("LA", "RGBA"):
        image = rgb.convert(mode[:-1])
        image.putalpha(alpha)
        return image
    if mode.startswith("P"):
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        if mode == "P-transparent-index":  # GIF style: one palette entry is transparent
            image.info["transparency"] = 3
        elif mode == "P-transparent-bytes":  # PNG tRNS style: an alpha per palette entry
            image.info["transparency"] = bytes(range(0, 256, 4))
        return image
    if mode == "CMYK":
        return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8), "CMYK")
    assert mode == "I;16"  # 16-bit grayscale PNG
    return Image.fromarray(rng.integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16))


def _pixels(normalised: torch.Tensor) -> torch.Tensor:
    """The uint8 pixels a transform normalised (k/255 is recovered to 1e-4 level: exact after rounding)."""
    return ((normalised * STD + MEAN) * 255).round().to(torch.uint8)


def _levels_apart(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    assert got.shape == expected.shape == (3, 40, 40)
    return (_pixels(got).int() - _pixels(expected).int()).abs()  # [3, 40, 40]


@pytest.fixture(autouse=True)
def _quiet_palette_warning():
    with warnings.catch_warnings():  # Pillow warns converting P with bytes transparency; OpenCLIP does it too
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        yield


@pytest.mark.parametrize("mode", MODES)
def test_eval_transform_equals_openclip(mode):
    """Same steps in the same order (resize in the image's mode, crop, RGB, normalise): equal."""
    from open_clip.transform import image_transform

    image = _image(mode)
    assert image.mode == mode.split("-")[0]
    for size in (32, 48):
        expected = image_transform(size, is_train=False)(image)
        got = image_transform_eval(size)(image)
        assert got.shape == (3, size, size) and torch.equal(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_train_transform_matches_openclip_on_the_same_crop(mode, monkeypatch):
    from open_clip.transform import image_transform

    image = _image(mode)
    for box in BOXES:
        monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(lambda *args, box=box: box))
        expected = image_transform(40, is_train=True)(image)
        got = image_transform_train(40)(image)
        if mode in TENSOR_RESIZED:
            assert _levels_apart(got, expected).max() <= 2, box  # the bound derived above
        else:
            assert torch.equal(_pixels(got), _pixels(expected)), box
            # The same pixels to float: OpenCLIP's ToTensor divides by 255, v2.ToDtype multiplies by
            # 1/255 (1 ulp apart in [0, 1]); Normalize's two roundings follow: a few float32 ulps of
            # |output| <= 2.2 (2.4e-7 each), far under one level (0.015).
            assert (got - expected).abs().max() <= 1e-6, box


@pytest.mark.skipif(int(PIL.__version__.split(".")[0]) < 13, reason="Pillow < 13 always resizes horizontally first")
def test_pass_order_matters_so_the_bound_can_fail(monkeypatch):
    """torchvision's own pass order on the vertical-first box is far outside the bound."""
    from open_clip.transform import image_transform
    from torchvision.transforms import v2

    image = _image("RGB")
    monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(lambda *args: BOXES[2]))
    expected = image_transform(40, is_train=True)(image)
    horizontal_first = v2.functional.resized_crop(
        v2.functional.pil_to_tensor(image), *BOXES[2], [40, 40], InterpolationMode.BICUBIC, antialias=True
    )
    assert (horizontal_first.int() - _pixels(expected).int()).abs().max() > 2
    assert _levels_apart(image_transform_train(40)(image), expected).max() <= 2


def test_train_transform_draws_openclips_crops_from_the_same_seed():
    from open_clip.transform import image_transform

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), "RGB")
    for scale in ((0.9, 1.0), (0.08, 1.0)):  # OpenCLIP's default, and torchvision's (tall and wide crops)
        reference = image_transform(40, is_train=True, aug_cfg={"scale": scale})
        ours = image_transform_train(40, scale=scale)
        for seed in range(4):
            torch.manual_seed(seed)
            expected = reference(image)
            torch.manual_seed(seed)
            assert _levels_apart(ours(image), expected).max() <= 2, (scale, seed)
    torch.manual_seed(0)
    first = ours(image)
    assert not torch.equal(ours(image), first)  # random crops do vary
