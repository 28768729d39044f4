"""Image transforms equal OpenCLIP's (whose eval transform is OpenAI's preprocessing)."""

import numpy as np
import pytest
import torch
from PIL import Image

from clip.transforms import image_transform_eval, image_transform_train


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8), "RGB")  # non-square, odd sides
    return {"RGB": rgb, "L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P")}


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_eval_transform_equals_openclip(mode):
    from open_clip.transform import image_transform

    image = _images()[mode]
    for size in (32, 48):
        expected = image_transform(size, is_train=False)(image)
        got = image_transform_eval(size)(image)
        assert got.shape == (3, size, size) and torch.equal(got, expected)


@pytest.mark.parametrize("size", [(97, 61), (300, 500)])  # upscaled and downscaled crops
def test_train_transform_matches_openclip_with_the_same_seed(size):
    """Ours resizes the crop on uint8 tensors (torchvision), OpenCLIP's with PIL: the same crop boxes
    from the same seed, and pixels within 2 of 255 levels, well under 1% of them off at all."""
    from open_clip.transform import image_transform

    from clip.transforms import OPENAI_STD

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB")
    levels = 255 * torch.tensor(OPENAI_STD).view(3, 1, 1)  # normalised units -> 0..255 levels
    for scale in ((0.9, 1.0), (0.3, 0.6)):
        reference = image_transform(40, is_train=True, aug_cfg={"scale": scale})
        ours = image_transform_train(40, scale=scale)
        for seed in range(3):
            torch.manual_seed(seed)
            expected = reference(image)
            torch.manual_seed(seed)
            got = ours(image)
            assert got.shape == expected.shape == (3, 40, 40)
            difference = ((got - expected) * levels).abs().round()  # [3, 40, 40], whole levels
            assert difference.max() <= 2 and (difference > 0).float().mean() < 0.01, (scale, seed)
    torch.manual_seed(0)
    first = ours(image)
    assert not torch.equal(ours(image), first)  # random crops do vary
