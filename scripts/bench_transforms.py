"""The training crop: our uint8-tensor resize against Pillow's, in time and in pixels, on one thread.

    PYTHONPATH=. python scripts/bench_transforms.py [--sizes 375x500 768x1024 1200x1600] [--repeats 50]

For each image size a photo-like JPEG is generated from a seed (smooth colour fields plus noise,
encoded at quality 90, so decoding is not part of the timing), then the same crop boxes are resized
to 224 px by `RandomResizedCropRGB` (torchvision's antialiased bicubic kernel on uint8 tensors) and by
Pillow (`resized_crop` on the PIL image, OpenCLIP's path). Reported: the median time per crop of
each, their ratio, and the largest and the share of differing pixel values (docs/data.md "Pixels"
derives the 2-level bound). Results: docs/benchmarks.md "Training transform".
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms import v2

from clip.transforms import RandomResizedCropRGB

CROP = 224
SCALE = (0.9, 1.0)  # the training transform's default range


def photo_like_jpeg(height: int, width: int, seed: int) -> Image.Image:
    """A decoded JPEG with smooth regions and fine detail: what the resize sees on web photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def pillow_crop(image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
    return v2.functional.pil_to_tensor(F.resized_crop(image, *box, [CROP, CROP], T.InterpolationMode.BICUBIC))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["375x500", "768x1024", "1200x1600"], help="HxW")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours = RandomResizedCropRGB(CROP, scale=SCALE)
    print(f"one thread, {cpu_name()}, torch {torch.__version__}, Pillow {PIL.__version__}")
    print(f"{'image':>10} {'Pillow ms':>10} {'ours ms':>8} {'speed-up':>9} {'max diff':>9} {'values off':>11}")
    for index, size in enumerate(args.sizes):
        height, width = map(int, size.split("x"))
        image = photo_like_jpeg(height, width, args.seed + index)
        torch.manual_seed(args.seed)
        box = T.RandomResizedCrop.get_params(image, SCALE, (3 / 4, 4 / 3))
        torch.manual_seed(args.seed)  # ours draws the same box from the same seed
        got = ours(image)
        expected = pillow_crop(image, box)
        difference = (got.int() - expected.int()).abs()

        def draw_and_resize_ours():
            torch.manual_seed(args.seed)
            ours(image)

        def draw_and_resize_pillow():
            torch.manual_seed(args.seed)
            pillow_crop(image, T.RandomResizedCrop.get_params(image, SCALE, (3 / 4, 4 / 3)))

        pillow_ms = median_ms(draw_and_resize_pillow, args.repeats)
        ours_ms = median_ms(draw_and_resize_ours, args.repeats)
        print(f"{size:>10} {pillow_ms:>10.2f} {ours_ms:>8.2f} {pillow_ms / ours_ms:>8.1f}x "
              f"{int(difference.max()):>9} {100 * (difference > 0).float().mean():>10.2f}%")  # fmt: skip


if __name__ == "__main__":
    main()
