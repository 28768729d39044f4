"""Small generated eval data for the zero-shot / retrieval tests (written into tmp_path)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.models import CLIP, get_model_config
from tests.data_shards import add_member

IMAGE_SIZE = 40  # larger than tiny-vit's 32 so the eval transform really resizes and crops

WORDS = [
    "red",
    "green",
    "blue",
    "dog",
    "cat",
    "bird",
    "car",
    "boat",
    "tree",
    "house",
    "small",
    "large",
    "bright",
    "dark",
    "old",
    "new",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module to run its tests on one intra-op thread. These tensors are tiny, and
    on a shared 2-core machine two OpenMP threads made each small op ~300x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zero_shot_script():
    """scripts/zero_shot.py as a fresh module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "zero_shot.py"
    spec = importlib.util.spec_from_file_location("zero_shot_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model() -> CLIP:
    # Seeded by conftest's autouse fixture, so every test gets the same random weights.
    return CLIP(get_model_config("tiny-vit")).eval()


def image_bytes(rng: np.random.Generator, fmt: str = "PNG", size: int = IMAGE_SIZE) -> bytes:
    pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_folder(
    root: Path, num_classes: int = 10, per_class: int = 4, *, seed: int = 0, templates: list[str] | None = None
) -> list[str]:
    """The synthetic zero-shot format: one directory per class, classnames.txt, templates.txt."""
    rng = np.random.default_rng(seed)
    classnames = [f"{WORDS[i % len(WORDS)]} thing {i}" for i in range(num_classes)]
    for index in range(num_classes):
        directory = root / f"class_{index:03d}"
        directory.mkdir(parents=True)
        for sample in range(per_class):
            (directory / f"{sample}.png").write_bytes(image_bytes(rng))
    (root / "classnames.txt").write_text("".join(f"{name}\n" for name in classnames))
    if templates is not None:
        (root / "templates.txt").write_text("".join(f"{template}\n" for template in templates))
    return classnames


def random_captions(rng: np.random.Generator, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(count)]


def write_caption_set(root: Path, num_images: int = 12, *, seed: int = 0, karpathy: bool = True) -> Path:
    """Images plus a caption JSON, with 1 to 4 captions per image; returns the JSON path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    entries = []
    for index in range(num_images):
        filename = f"{index:04d}.jpg"
        (root / "images" / filename).write_bytes(image_bytes(rng, "JPEG"))
        captions = random_captions(rng, int(rng.integers(1, 5)))
        if karpathy:
            entries.append(
                {
                    "filepath": "images",
                    "filename": filename,
                    "split": "test",
                    "sentences": [{"raw": caption} for caption in captions],
                }
            )
        else:
            entries.append({"image": f"images/{filename}", "caption": captions})
    if karpathy:  # a train image that the test split must leave out
        entries.append({"filepath": "images", "filename": "0000.jpg", "split": "train", "sentences": [{"raw": "x"}]})
    path = root / ("dataset_coco.json" if karpathy else "coco_karpathy_test.json")
    path.write_text(json.dumps({"images": entries} if karpathy else entries))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of regular-file members, in the given order (WebDataset groups consecutive keys)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def classification_members(rng: np.random.Generator, labels: list[int], start: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for offset, label in enumerate(labels):
        key = f"{start + offset:06d}"
        members += [(f"{key}.webp", image_bytes(rng, "WEBP")), (f"{key}.cls", str(label).encode())]
    return members
