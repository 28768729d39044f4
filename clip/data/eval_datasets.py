"""Evaluation datasets: what zero-shot classification, retrieval and linear probes read.

Formats, detected by `load_classification_set` and `load_retrieval_set`:
- an ImageFolder with `classnames.txt` (one name per class directory, in sorted directory order)
  and optional `templates.txt` (one prompt per line, with `{}`): the synthetic held-out set of the
  smoke run, or any labelled folder;
- an ImageNet-style ImageFolder whose class directories are WordNet ids (`val/n01440764/...`):
  the names come from the shipped wnid -> name table, so class subsets get the right names too;
- CIFAR-10/100 in torchvision's local format (`clip.data.eval_cifar`);
- WebDataset eval shards (`clip.data.eval_shards`) in CLIP_benchmark's layout (`classnames.txt`,
  `zeroshot_classification_templates.txt`, `test/*.tar`) or given as a tar path, glob or brace pattern;
- a caption file (Karpathy-split JSON of COCO / Flickr30k) plus the image directory.

A sample is `(image_tensor, target)`: an int class index, or a list of captions for retrieval.
A set's name, which its metrics are keyed by, is the caller's, else what the data is (CIFAR's
files say which CIFAR), else the path's: never the class-name table, which ImageNet and its
shifts share. The published benchmarks by name (their layouts, subsets, metrics): `clip.benchmarks`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from clip.data.eval_assets import (
    CLASSNAMES_FILE,
    DEFAULT_TEMPLATES,
    TEMPLATES_FILES,
    get_classnames,
    get_imagenet_wnids,
    get_templates,
    read_lines,
)
from clip.data.eval_cifar import CifarDataset, find_cifar
from clip.data.eval_shards import TarEvalDataset, expand_shards

Transform = Callable[[Image.Image], torch.Tensor]

# Directory names that say which split a folder is, not which dataset: the set is named by the parent.
DATASET_TYPE_FILE = "dataset_type.txt"  # CLIP_benchmark's exports: what task the shards are for
_SPLIT_DIRECTORIES = {"val", "test", "train", "validation", "images"}


@dataclass
class ClassificationSet:
    """A labelled eval set and the text that turns its labels into a zero-shot classifier."""

    name: str
    dataset: Dataset  # yields (image [3, H, W], class index)
    classnames: list[str]
    templates: list[str]
    path: str = ""  # where it was read from (the results' record of it)
    main_metric: str = "top1"  # the metric its benchmark reports
    multilabel: bool = False  # targets are 0/1 rows over the classes (clip.multilabel)
    metadata_task: str | None = None  # scored with per-sample metadata too (clip.group_metrics)


@dataclass
class RetrievalSet:
    """Images with one or more captions each."""

    name: str
    dataset: Dataset  # yields (image [3, H, W], list of captions)
    path: str = ""
    main_metric: str = "image_retrieval_recall@5"


def name_from_path(path: str | Path) -> str:
    """`/data/pets` -> `pets`; a split directory is named by its parent (`/data/imagenet/val` -> `imagenet`)."""
    path = Path(path)
    return path.parent.name if path.name in _SPLIT_DIRECTORIES and path.parent.name else path.name


def check_unique_names(eval_sets: Sequence[ClassificationSet | RetrievalSet]) -> None:
    """Two sets with one name would write one row (the last): refuse it, naming both paths."""
    first: dict[str, str] = {}
    for eval_set in eval_sets:
        if eval_set.name in first:
            raise ValueError(
                f"two eval sets are named {eval_set.name!r} ({first[eval_set.name]} and {eval_set.path}): "
                f"name them, as name=path"
            )
        first[eval_set.name] = eval_set.path


def split_named_path(spec: str) -> tuple[str | None, str]:
    """`name=path` -> (name, path); a plain path (or one that exists with its `=`) -> (None, path)."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name or Path(spec).exists():
        return None, spec
    return name, path


# ---------------------------------------------------------------------------------------------
# Labelled image folders and CIFAR


def class_directories(root: Path) -> list[str]:
    # torchvision's ImageFolder convention: class index = position in sorted directory names.
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def image_folder(root: Path, transform: Transform, class_to_idx: dict[str, int] | None = None) -> Dataset:
    """torchvision's ImageFolder; `class_to_idx` gives each directory its label (only those it names
    are read), where the label is not the directory's position in sorted order."""
    from torchvision.datasets import ImageFolder

    class LabelledFolder(ImageFolder):
        def find_classes(self, directory):
            if class_to_idx is None:
                return super().find_classes(directory)
            present = {name: label for name, label in class_to_idx.items() if (Path(directory) / name).is_dir()}
            return sorted(present, key=present.get), present

    return LabelledFolder(str(root), transform=transform, allow_empty=True)


def _templates_next_to(directories: Sequence[Path]) -> list[str] | None:
    for directory in directories:
        for filename in TEMPLATES_FILES:
            if (directory / filename).is_file():
                return read_lines(directory / filename)
    return None


def _named_image_folder(root: Path, transform: Transform, name: str) -> ClassificationSet:
    classnames = read_lines(root / CLASSNAMES_FILE)
    directories = class_directories(root)
    if len(directories) != len(classnames):
        raise ValueError(
            f"{root / CLASSNAMES_FILE} lists {len(classnames)} class names but {root} has "
            f"{len(directories)} class directories (one name per directory, in sorted order)"
        )
    templates = _templates_next_to([root]) or list(DEFAULT_TEMPLATES)
    return ClassificationSet(name, image_folder(root, transform), classnames, templates, str(root))


def _imagenet_folder(root: Path, transform: Transform, name: str) -> ClassificationSet:
    names_by_wnid = dict(zip(get_imagenet_wnids(), get_classnames("imagenet1k")))
    classnames = [names_by_wnid[wnid] for wnid in class_directories(root)]
    return ClassificationSet(name, image_folder(root, transform), classnames, get_templates("imagenet1k"), str(root))


def _cifar_set(path: Path, transform: Transform, name: str | None, split: str) -> ClassificationSet:
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR has splits 'train' and 'test', not {split!r}")
    dataset = CifarDataset(path, transform, train=split == "train")
    known = dataset.layout.name
    classnames = get_classnames(known)
    # OpenAI's names are the files' own names with '_' -> ' '; a mismatch means a different dataset.
    if [raw.replace("_", " ") for raw in dataset.raw_classnames] != classnames:
        raise ValueError(f"{path}: class names in {dataset.layout.meta_file} are not {known}'s")
    return ClassificationSet(name or known, dataset, classnames, get_templates(known), str(path))


# ---------------------------------------------------------------------------------------------
# Shards in CLIP_benchmark's layout


def _shards_in_directory(directory: Path, split: str) -> list[Path]:
    # CLIP_benchmark's layout keeps the shards of each split in a subdirectory.
    for folder in (directory / split, directory):
        shards = sorted(folder.glob("*.tar"))
        if shards:
            return shards
    return []


def _looks_like_shards(path: str) -> bool:
    return path.endswith(".tar") or any(char in path for char in "*?[{")


def _shard_set_name(shard_dir: Path, split: str) -> str:
    return shard_dir.parent.name if shard_dir.name == split else shard_dir.name


def _shard_set(
    shards: Sequence[str],
    transform: Transform,
    name: str | None,
    split: str,
    default_templates: Sequence[str] | None = None,
    target: str = "cls",
) -> ClassificationSet:
    # Class names and templates sit next to the shards or one level up (CLIP_benchmark's layout).
    shard_dir = Path(shards[0]).parent
    directories = [shard_dir, shard_dir.parent]
    names_file = next((d / CLASSNAMES_FILE for d in directories if (d / CLASSNAMES_FILE).is_file()), None)
    if names_file is None:
        raise FileNotFoundError(f"eval shards in {shard_dir}: no {CLASSNAMES_FILE} there or one level up")
    templates = _templates_next_to(directories) or list(default_templates or DEFAULT_TEMPLATES)
    dataset = TarEvalDataset(list(shards), transform, target)
    set_name = name or _shard_set_name(shard_dir, split)
    return ClassificationSet(set_name, dataset, read_lines(names_file), templates, str(shard_dir))


def is_export(root: Path, split: str) -> bool:
    """Whether `root` holds shards (CLIP_benchmark's `<split>/*.tar` layout, or `*.tar` in it)."""
    return root.is_dir() and bool(_shards_in_directory(root, split))


def load_export(
    root: str | Path,
    transform: Transform,
    *,
    name: str | None = None,
    split: str = "test",
    default_templates: Sequence[str] | None = None,
) -> ClassificationSet | RetrievalSet:
    """A CLIP_benchmark WebDataset export, as its `dataset_type.txt` says (`retrieval`, `multilabel`
    with `npy` label rows; absent: classification, as CLIP_benchmark reads it). `default_templates`:
    where it ships none."""
    root = Path(root)
    type_file = root / DATASET_TYPE_FILE
    task = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if task == "retrieval":
        return load_retrieval_set(root, transform, name=name or name_from_path(root), split=split)
    if task not in ("classification", "multilabel"):
        raise ValueError(f"{type_file}: unknown dataset type {task!r} (classification, multilabel or retrieval)")
    shards = [str(shard) for shard in _shards_in_directory(root, split)]
    if not shards:
        raise FileNotFoundError(f"{root}: no .tar shards in {root / split} or {root}")
    eval_set = _shard_set(shards, transform, name, split, default_templates, "npy" if task == "multilabel" else "cls")
    if task == "multilabel":
        eval_set.multilabel, eval_set.main_metric = True, "mean_average_precision"
    return eval_set


def load_classification_set(
    path: str | Path, transform: Transform, *, name: str | None = None, split: str = "test"
) -> ClassificationSet:
    """A labelled eval set from any of the formats in this module's docstring.

    `split` selects CIFAR's train/test files and the shard subdirectory of CLIP_benchmark's layout;
    image folders are used as they are. `name` (default: from the path) names the metrics.
    """
    text = str(path)
    if _looks_like_shards(text):
        return _shard_set(expand_shards(text), transform, name, split)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"eval data {root} is not a directory, a .tar shard or a shard pattern")
    if find_cifar(root) is not None:
        return _cifar_set(root, transform, name, split)
    shards = _shards_in_directory(root, split)
    if shards:
        return _shard_set([str(shard) for shard in shards], transform, name, split)
    if (root / CLASSNAMES_FILE).is_file():
        return _named_image_folder(root, transform, name or name_from_path(root))
    directories = class_directories(root)
    if directories and set(directories) <= set(get_imagenet_wnids()):
        return _imagenet_folder(root, transform, name or name_from_path(root))
    hint = " (an ImageNet root? pass its val/ directory)" if "val" in directories else ""
    if directories and all(d.isdigit() for d in directories):
        hint = " (ImageNet-V2's numeric class folders? read it with --benchmark imagenet-v2)"
    raise ValueError(
        f"cannot tell the format of eval data {root}{hint}: expected class directories with a "
        f"{CLASSNAMES_FILE}, ImageNet WordNet-id directories, CIFAR's python files or .tar shards"
    )


# ---------------------------------------------------------------------------------------------
# Retrieval: caption files plus images, or shards with txt captions


class CaptionedImages(Dataset):
    """Image files, each with its list of captions."""

    def __init__(self, items: Sequence[tuple[Path, list[str]]], transform: Transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str]]:
        path, captions = self.items[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), list(captions)


def read_caption_file(
    path: str | Path, images: str | Path | None = None, split: str = "test"
) -> list[tuple[Path, list[str]]]:
    """(image path, captions) pairs from a Karpathy-split caption file.

    Two layouts are read: Karpathy's own `dataset_coco.json` / `dataset_flickr30k.json`
    (`{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}`, filtered by `split`)
    and the per-split lists used by ALBEF/BLIP (`[{"image", "caption": str | [str]}]`).
    Image paths are relative to `images` (default: the caption file's directory).
    """
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "images" in data:
        items = [
            (root / entry.get("filepath", "") / entry["filename"], [s["raw"] for s in entry["sentences"]])
            for entry in data["images"]
            if entry.get("split") == split
        ]
    elif isinstance(data, list) and all(isinstance(entry, dict) and "image" in entry for entry in data):
        items = [
            (root / entry["image"], [entry["caption"]] if isinstance(entry["caption"], str) else list(entry["caption"]))
            for entry in data
        ]
    else:
        raise ValueError(f"{path}: not a Karpathy caption file ({{'images': [...]}} or [{{'image', 'caption'}}])")
    if not items:
        raise ValueError(f"{path}: no images in split {split!r}")
    missing = [str(image) for image, _ in items if not image.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} image(s) not found under {root}, e.g. {missing[0]}")
    empty = [str(image) for image, captions in items if not captions]
    if empty:
        raise ValueError(f"{path}: image(s) without captions, e.g. {empty[0]}")
    return items


def load_retrieval_set(
    path: str | Path,
    transform: Transform,
    *,
    images: str | Path | None = None,
    name: str | None = None,
    split: str = "test",
) -> RetrievalSet:
    """Images with captions: a caption JSON (+ `images` root) or shards with `txt` captions."""
    text = str(path)
    if text.endswith(".json"):
        items = read_caption_file(path, images, split)
        return RetrievalSet(name or Path(path).stem, CaptionedImages(items, transform), str(path))
    if _looks_like_shards(text):
        shards = expand_shards(text)
    else:
        shards = [str(shard) for shard in _shards_in_directory(Path(path), split)]
        if not shards:
            raise FileNotFoundError(f"retrieval data {path}: not a caption .json, and no .tar shards there")
    set_name = name or _shard_set_name(Path(shards[0]).parent, split)
    return RetrievalSet(set_name, TarEvalDataset(shards, transform, "txt"), str(Path(shards[0]).parent))
