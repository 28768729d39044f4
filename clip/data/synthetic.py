"""Learnable image-text data generated locally: coloured shapes with captions that describe them.

Used by the smoke training job and the tests (no downloads). Every sample is a pure function of
`(seed, index)`, so the output is identical however it is split into shards. Layout (docs/data.md):

    <out>/train/000000.tar ...   WebDataset shards: <key>.jpg, <key>.txt, <key>.json (uid, objects, ...)
    <out>/train/sizes.json       per-shard sample counts (epoch mode, truncation checks)
    <out>/zeroshot/00_red_circle/000000.jpg ...   held-out classification set, one folder per class
    <out>/zeroshot/classnames.txt, templates.txt  class names (folder order) and prompt templates
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from clip.data.subset import uid_from_key

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
# The zero-shot classes: every colour x shape below (12 classes), one object per image.
ZEROSHOT_COLORS = ("red", "green", "blue", "yellow")
ZEROSHOT_SHAPES = ("circle", "square", "triangle")
ZEROSHOT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a {} on a plain background.",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "center", "right")
_JPEG_QUALITY = 90
_MTIME = 1_700_000_000  # fixed member times: the same seed gives byte-identical shards


@dataclass
class SyntheticDataset:
    """Where `write_synthetic_dataset` put things."""

    train_shards: str  # brace pattern for data.train_shards
    zeroshot_dir: str
    num_train: int
    num_classes: int


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(rng: random.Random, size: int, r: float) -> tuple[float, float, str]:
    """A centre inside one cell of a 3x3 grid, and the words for that cell."""
    row, col = rng.randrange(3), rng.randrange(3)
    cell = size / 3
    cx = min(max((col + rng.uniform(0.3, 0.7)) * cell, r), size - r)
    cy = min(max((row + rng.uniform(0.3, 0.7)) * cell, r), size - r)
    if (row, col) == (1, 1):
        words = "in the center"
    elif row == 1:
        words = f"on the {_COLUMNS[col]}"
    elif col == 1:
        words = f"at the {_ROWS[row]}"
    else:
        words = f"in the {_ROWS[row]} {_COLUMNS[col]}"
    return cx, cy, words


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def render_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, str, dict]:
    """One image and a caption describing it (colour, shape, size, position, count, background)."""
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    kind = rng.random()
    if kind < 0.7:  # one object: the most informative captions
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        large = rng.random() < 0.5
        r = image_size * (rng.uniform(0.25, 0.33) if large else rng.uniform(0.16, 0.22))
        cx, cy, where = _place(rng, image_size, r)
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        size_word = "large" if large else "small"
        template = rng.choice(
            (
                "a {size} {color} {shape} {where}.",
                "a {color} {shape} on a {bg} background.",
                "a photo of a {color} {shape}.",
                "there is a {size} {color} {shape} {where} of the picture.",
                "a {color} {shape} {where}, on {bg}.",
                "one {size} {color} {shape}.",
                "an image of a {color} {shape} against a {bg} background.",
                "{color} {shape}",
            )
        )
        caption = template.format(size=size_word, color=color, shape=shape, where=where, bg=background)
        meta = {"objects": [{"color": color, "shape": shape, "size": size_word}], "background": background}
    elif kind < 0.9:  # several copies of one object
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        count = rng.choice((2, 3))
        r = image_size * rng.uniform(0.12, 0.16)
        for _ in range(count):
            cx, cy = rng.uniform(r, image_size - r), rng.uniform(r, image_size - r)
            _draw_shape(draw, shape, cx, cy, r, COLORS[color])
        template = rng.choice(
            ("{n} {color} {shapes}.", "a picture of {n} {color} {shapes} on a {bg} background.", "{n} small {color} {shapes}.")
        )
        caption = template.format(n=NUMBER_WORDS[count], color=color, shapes=_plural(shape), bg=background)
        meta = {"objects": [{"color": color, "shape": shape, "size": "small"}] * count, "background": background}
    else:  # two different objects
        objects = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(2)]
        r = image_size * rng.uniform(0.15, 0.2)
        left, right = (image_size * 0.27, image_size * 0.73)
        for (color, shape), cx in zip(objects, (left, right)):
            _draw_shape(draw, shape, cx, rng.uniform(r, image_size - r), r, COLORS[color])
        (c1, s1), (c2, s2) = objects
        caption = rng.choice(
            (
                f"a {c1} {s1} and a {c2} {s2}.",
                f"a {c1} {s1} on the left and a {c2} {s2} on the right.",
                f"two shapes: a {c1} {s1} and a {c2} {s2}, on a {background} background.",
            )
        )
        meta = {"objects": [{"color": c, "shape": s, "size": "medium"} for c, s in objects], "background": background}
    return image, caption, meta


def render_class_image(rng: random.Random, image_size: int, color: str, shape: str) -> Image.Image:
    """One object of the given class, with random size, position and background."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[rng.choice(list(BACKGROUNDS))])
    r = image_size * rng.uniform(0.16, 0.33)
    cx, cy, _ = _place(rng, image_size, r)
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def zeroshot_classes() -> list[tuple[str, str]]:
    return [(color, shape) for color in ZEROSHOT_COLORS for shape in ZEROSHOT_SHAPES]


def _mismatched_caption(seed: int, index: int, image_size: int, meta: dict) -> str:
    """A caption of another scene that names none of the image's (colour, shape) objects."""
    drawn = {(o["color"], o["shape"]) for o in meta["objects"]}
    for attempt in range(100):
        _, caption, other = render_scene(random.Random(f"{seed}/mismatch/{index}/{attempt}"), image_size)
        if not drawn & {(o["color"], o["shape"]) for o in other["objects"]}:
            return caption
    raise RuntimeError(f"no mismatched caption for sample {index}")  # 100 draws that all overlap: never in practice


def write_train_shards(
    out_dir: str, *, num_samples: int, samples_per_shard: int, image_size: int, seed: int, mismatched_fraction: float = 0.0
) -> str:
    """Write WebDataset shards and their sizes.json; returns the brace pattern of the shards.

    A `mismatched_fraction` of the samples (drawn from the seed) get the caption of another scene, as web
    data has pairs whose text does not describe the image; their json has `"mismatched": true`. Each
    sample's json holds its uid (clip.data.subset), as img2dataset's does.
    """
    if not 0.0 <= mismatched_fraction <= 1.0:
        raise ValueError(f"mismatched_fraction={mismatched_fraction} must be in [0, 1]")
    from webdataset import TarWriter

    os.makedirs(out_dir, exist_ok=True)
    num_shards = math.ceil(num_samples / samples_per_shard)
    digits = max(6, len(str(num_shards - 1)))
    sizes = {}
    for shard in range(num_shards):
        name = f"{shard:0{digits}d}.tar"
        tmp = os.path.join(out_dir, name + ".tmp")
        first, last = shard * samples_per_shard, min(num_samples, (shard + 1) * samples_per_shard)
        with open(tmp, "wb") as f, TarWriter(f, encoder=False, mtime=_MTIME) as writer:
            for index in range(first, last):
                image, caption, meta = render_scene(random.Random(f"{seed}/train/{index}"), image_size)
                mismatched = random.Random(f"{seed}/mismatched/{index}").random() < mismatched_fraction
                if mismatched:
                    caption = _mismatched_caption(seed, index, image_size, meta)
                meta = {**meta, "uid": uid_from_key(f"synthetic/{seed}/{index}"), "mismatched": mismatched}
                writer.write(
                    {
                        "__key__": f"{index:09d}",
                        "jpg": _jpeg(image),
                        "txt": caption.encode("utf-8"),
                        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                    }
                )
        os.replace(tmp, os.path.join(out_dir, name))  # a half-written shard never has the final name
        sizes[name] = last - first
    with open(os.path.join(out_dir, "sizes.json"), "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    return os.path.join(out_dir, f"{{{0:0{digits}d}..{num_shards - 1:0{digits}d}}}.tar")


def write_zeroshot_set(out_dir: str, *, images_per_class: int, image_size: int, seed: int) -> int:
    """ImageFolder layout (class index = sorted folder position) plus classnames.txt and templates.txt."""
    classes = zeroshot_classes()
    for class_index, (color, shape) in enumerate(classes):
        folder = os.path.join(out_dir, f"{class_index:02d}_{color}_{shape}")
        os.makedirs(folder, exist_ok=True)
        for i in range(images_per_class):
            image = render_class_image(random.Random(f"{seed}/zeroshot/{class_index}/{i}"), image_size, color, shape)
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(_jpeg(image))
    with open(os.path.join(out_dir, "classnames.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{color} {shape}\n" for color, shape in classes)
    with open(os.path.join(out_dir, "templates.txt"), "w", encoding="utf-8") as f:
        f.writelines(template + "\n" for template in ZEROSHOT_TEMPLATES)
    return len(classes)


def write_synthetic_dataset(
    out_dir: str,
    *,
    num_train: int = 20_000,
    samples_per_shard: int = 1000,
    image_size: int = 64,
    images_per_class: int = 50,
    seed: int = 0,
    mismatched_fraction: float = 0.0,
) -> SyntheticDataset:
    """Write train shards and the zero-shot set under `out_dir` (deterministic from `seed`)."""
    train = write_train_shards(
        os.path.join(out_dir, "train"),
        num_samples=num_train,
        samples_per_shard=samples_per_shard,
        image_size=image_size,
        seed=seed,
        mismatched_fraction=mismatched_fraction,
    )
    zeroshot_dir = os.path.join(out_dir, "zeroshot")
    num_classes = write_zeroshot_set(zeroshot_dir, images_per_class=images_per_class, image_size=image_size, seed=seed)
    return SyntheticDataset(train, zeroshot_dir, num_train, num_classes)
