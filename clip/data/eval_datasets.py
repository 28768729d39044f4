"""Evaluation datasets: what zero-shot classification, retrieval and linear probes read.

Formats, detected by `load_classification_set` and `load_retrieval_set`:
- an ImageFolder with `classnames.txt` (one name per class directory, in sorted directory order)
  and optional `templates.txt` (one prompt per line, with `{}`): the synthetic held-out set of the
  smoke run, or any labelled folder;
- an ImageNet-style ImageFolder whose class directories are WordNet ids (`val/n01440764/...`):
  the names come from the shipped wnid -> name table, so class subsets get the right names too;
- CIFAR-10/100 in torchvision's local format (`cifar-10-batches-py/`, `cifar-100-python/`);
- WebDataset eval shards (`<key>.jpg|png|webp` with `<key>.cls`, or `<key>.txt` captions one per
  line), in CLIP_benchmark's layout (`classnames.txt`, `zeroshot_classification_templates.txt`,
  `test/*.tar`) or given as a tar path, glob or brace pattern;
- a caption file (Karpathy-split JSON of COCO / Flickr30k) plus the image directory.

A sample is `(image_tensor, target)`: an int class index, or a list of captions for retrieval.
Tar shards (uncompressed) are read with the training pipeline's reader (`clip.data.tar_reader`), not
webdataset: only image, `cls` and `txt` members of regular files under a size cap are read, nothing is
unpickled, unsafe members are skipped, images are decoded by `clip.data.decode`, and a shard without its
end-of-archive marker is an error (a cut at a member boundary is otherwise silent).
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from clip.config import DataConfig
from clip.data.decode import decode_image
from clip.data.records import IMAGE_EXTENSIONS, SkipEvent
from clip.data.sources import expand_pattern, is_pipe
from clip.data.tar_reader import MemberGroup, iter_member_groups

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]

# One prompt for labelled folders that bring no templates.txt.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CLASSNAMES_FILE = "classnames.txt"
# Ours first, then CLIP_benchmark's name for the same file.
TEMPLATES_FILES = ("templates.txt", "zeroshot_classification_templates.txt")

_CLASSNAME_ASSETS = {
    "imagenet1k": "imagenet1k_classnames.txt",
    "cifar10": "cifar10_classnames.txt",
    "cifar100": "cifar100_classnames.txt",
}
_TEMPLATE_ASSETS = {
    "imagenet1k": "imagenet1k_templates.txt",
    "cifar10": "cifar_templates.txt",
    "cifar100": "cifar_templates.txt",
}


@dataclass
class ClassificationSet:
    """A labelled eval set and the text that turns its labels into a zero-shot classifier."""

    name: str
    dataset: Dataset  # yields (image [3, H, W], class index)
    classnames: list[str]
    templates: list[str]


@dataclass
class RetrievalSet:
    """Images with one or more captions each."""

    name: str
    dataset: Dataset  # yields (image [3, H, W], list of captions)


# ---------------------------------------------------------------------------------------------
# Shipped class names and templates (clip/assets, see ZERO_SHOT_SOURCES.md there)


def read_lines(path: Any) -> list[str]:
    """The non-empty lines of a UTF-8 text file (a path or an importlib.resources file), stripped."""
    source = path if hasattr(path, "read_text") else Path(path)
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} has no lines")
    return lines


def _asset(filename: str) -> list[str]:
    return read_lines(resources.files("clip") / "assets" / filename)


def get_classnames(dataset: str) -> list[str]:
    """Class names in label order for a known dataset: imagenet1k (OpenAI's names), cifar10, cifar100."""
    if dataset not in _CLASSNAME_ASSETS:
        raise KeyError(f"no shipped class names for {dataset!r}; known: {sorted(_CLASSNAME_ASSETS)}")
    return _asset(_CLASSNAME_ASSETS[dataset])


def get_templates(dataset: str) -> list[str]:
    """OpenAI's prompt templates for a known dataset (80 for imagenet1k, 18 for CIFAR)."""
    if dataset not in _TEMPLATE_ASSETS:
        raise KeyError(f"no shipped templates for {dataset!r}; known: {sorted(_TEMPLATE_ASSETS)}")
    return _asset(_TEMPLATE_ASSETS[dataset])


def get_imagenet_wnids() -> list[str]:
    """ImageNet-1k's WordNet ids in label order (sorted, as ImageFolder orders `val/`)."""
    return _asset("imagenet1k_wnids.txt")


# ---------------------------------------------------------------------------------------------
# Batches


def collate_eval_batch(samples: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack images; class indices become a tensor, caption lists stay a list (one list per image)."""
    images = torch.stack([image for image, _ in samples])
    targets = [target for _, target in samples]
    if isinstance(targets[0], (list, tuple, str)):
        return images, targets
    return images, default_collate(targets)


# ---------------------------------------------------------------------------------------------
# Labelled image folders and CIFAR


def _class_directories(root: Path) -> list[str]:
    # torchvision's ImageFolder convention: class index = position in sorted directory names.
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def _image_folder(root: Path, transform: Transform) -> Dataset:
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), transform=transform, allow_empty=True)


def _templates_next_to(directories: Sequence[Path]) -> list[str] | None:
    for directory in directories:
        for filename in TEMPLATES_FILES:
            if (directory / filename).is_file():
                return read_lines(directory / filename)
    return None


def _named_image_folder(root: Path, transform: Transform, name: str) -> ClassificationSet:
    classnames = read_lines(root / CLASSNAMES_FILE)
    directories = _class_directories(root)
    if len(directories) != len(classnames):
        raise ValueError(
            f"{root / CLASSNAMES_FILE} lists {len(classnames)} class names but {root} has "
            f"{len(directories)} class directories (one name per directory, in sorted order)"
        )
    templates = _templates_next_to([root]) or list(DEFAULT_TEMPLATES)
    return ClassificationSet(name, _image_folder(root, transform), classnames, templates)


def _imagenet_folder(root: Path, transform: Transform, name: str) -> ClassificationSet:
    names_by_wnid = dict(zip(get_imagenet_wnids(), get_classnames("imagenet1k")))
    classnames = [names_by_wnid[wnid] for wnid in _class_directories(root)]
    return ClassificationSet(name, _image_folder(root, transform), classnames, get_templates("imagenet1k"))


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python files are pickles of dicts holding numpy arrays. Only the globals a pickled
    array needs are allowed, so a tampered file cannot run code (torchvision uses plain pickle)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR file")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; avoid the deprecation shim
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _load_cifar_file(path: Path) -> dict:
    with open(path, "rb") as file:
        return _CifarUnpickler(file, encoding="latin1").load()


@dataclass(frozen=True)
class _CifarLayout:
    name: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


_CIFAR_LAYOUTS = {
    "cifar-10-batches-py": _CifarLayout(
        "cifar10",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar-100-python": _CifarLayout(
        "cifar100",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _find_cifar(path: Path) -> Path | None:
    if path.name in _CIFAR_LAYOUTS:
        return path
    return next((path / folder for folder in _CIFAR_LAYOUTS if (path / folder).is_dir()), None)


class CifarDataset(Dataset):
    """CIFAR-10/100 from torchvision's local files (`<root>/cifar-10-batches-py` or the folder itself)."""

    def __init__(self, root: str | Path, transform: Transform, *, train: bool = False):
        folder = _find_cifar(Path(root))
        if folder is None:
            raise FileNotFoundError(f"{root} holds neither {' nor '.join(_CIFAR_LAYOUTS)}")
        self.layout = _CIFAR_LAYOUTS[folder.name]
        self.transform = transform
        arrays, labels = [], []
        for filename in self.layout.train_files if train else self.layout.test_files:
            entry = _load_cifar_file(folder / filename)
            arrays.append(entry["data"])
            labels.extend(entry[self.layout.label_key])
        self.images = np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, H, W, C]
        self.labels = [int(label) for label in labels]
        self.raw_classnames = list(_load_cifar_file(folder / self.layout.meta_file)[self.layout.names_key])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def _cifar_set(path: Path, transform: Transform, name: str | None, split: str) -> ClassificationSet:
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR has splits 'train' and 'test', not {split!r}")
    dataset = CifarDataset(path, transform, train=split == "train")
    known = dataset.layout.name
    classnames = get_classnames(known)
    # OpenAI's names are the files' own names with '_' -> ' '; a mismatch means a different dataset.
    if [raw.replace("_", " ") for raw in dataset.raw_classnames] != classnames:
        raise ValueError(f"{path}: class names in {dataset.layout.meta_file} are not {known}'s")
    return ClassificationSet(name or known, dataset, classnames, get_templates(known))


# ---------------------------------------------------------------------------------------------
# WebDataset eval shards, read with the training pipeline's tar reader


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Local shard paths from a path, a glob, a brace pattern (`eval-{000..009}.tar`) or a list.

    Eval data is local: URLs and `pipe:` commands are refused."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    shards: list[str] = []
    for item in map(str, specs):
        if "://" in item or is_pipe(item):
            raise ValueError(f"eval shards must be local files; got {item!r}")
        for pattern in expand_pattern(item):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            shards.extend(matches)
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"eval shards {spec!r}: no such file(s): {missing[:5] or 'no match'}")
    return shards


class TarEvalDataset(IterableDataset):
    """Samples of WebDataset eval shards: an image (`jpg/jpeg/png/webp`) and a `cls` label or `txt`
    captions (one per line). Only regular members no larger than `max_member_bytes` are read;
    every other member is skipped with a warning and nothing is unpickled or written to disk.

    Each DataLoader worker reads its own subset of the shards; `for_rank` gives a rank its share
    (the evaluations in `clip.zero_shot` call it).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Transform,
        target: str,
        *,
        max_member_bytes: int = DataConfig.max_member_bytes,
    ):
        if target not in ("cls", "txt"):
            raise ValueError(f"target must be 'cls' (labels) or 'txt' (captions), not {target!r}")
        self.shards = expand_shards(shards)
        self.transform = transform
        self.target = target
        self.max_member_bytes = max_member_bytes

    def for_rank(self, rank: int, world_size: int) -> TarEvalDataset:
        """The same dataset reading only shards rank, rank + world_size, ... (none if too few)."""
        share = copy.copy(self)
        share.shards = self.shards[rank::world_size]
        return share

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        worker = get_worker_info()
        shards = self.shards[worker.id :: worker.num_workers] if worker else self.shards
        for shard in shards:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: str) -> Iterator[tuple[torch.Tensor, Any]]:
        fields = (*IMAGE_EXTENSIONS, self.target)
        try:
            with open(shard, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                groups = iter_member_groups(
                    file, shard, extensions=fields, max_member_bytes=self.max_member_bytes, size=size
                )
                for item in groups:
                    if isinstance(item, SkipEvent):
                        self._check(shard, item)
                    elif not item.cut and (sample := self._decode(shard, item)) is not None:
                        yield sample
        except OSError as error:
            raise RuntimeError(f"cannot read eval shard {shard}: {error}") from error

    def _check(self, shard: str, event: SkipEvent) -> None:
        # A truncated eval set would give wrong metrics without a word: it is an error.
        if event.reason == "truncated_shard":
            raise RuntimeError(f"cannot read eval shard {shard}: {event.detail}")
        if event.reason == "unsafe_member":
            log.warning("eval shard %s: skipped member %r (not a regular file at a relative path)", shard, event.key)
        # ignored_member (neither an image nor the target, e.g. .json): never decoded, not worth a warning

    def _decode(self, shard: str, group: MemberGroup) -> tuple[torch.Tensor, Any] | None:
        for member in group.members.values():
            if member.data is None:
                log.warning("eval shard %s: skipped member %r of %d bytes (limit %d)",
                            shard, member.name, member.size, self.max_member_bytes)
        members = {ext: member.data for ext, member in group.members.items() if member.data is not None}
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image_ext is None or self.target not in members:
            log.warning("eval shard %s: sample %r has no image or no %s member; skipped", shard, group.key, self.target)
            return None
        try:
            image = decode_image(members[image_ext])
            text = members[self.target].decode("utf-8")
            target = int(text.strip()) if self.target == "cls" else [line for line in text.split("\n") if line]
            if not target and self.target == "txt":
                raise ValueError("no captions")
        except ValueError as error:  # ImageDecodeError, a label that is not an int, UnicodeDecodeError
            log.warning("eval shard %s: sample %r is unreadable (%s); skipped", shard, group.key, error)
            return None
        return self.transform(image), target


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


def _shard_set(shards: Sequence[str], transform: Transform, name: str | None, split: str) -> ClassificationSet:
    # Class names and templates sit next to the shards or one level up (CLIP_benchmark's layout).
    shard_dir = Path(shards[0]).parent
    directories = [shard_dir, shard_dir.parent]
    names_file = next((d / CLASSNAMES_FILE for d in directories if (d / CLASSNAMES_FILE).is_file()), None)
    if names_file is None:
        raise FileNotFoundError(f"eval shards in {shard_dir}: no {CLASSNAMES_FILE} there or one level up")
    templates = _templates_next_to(directories) or list(DEFAULT_TEMPLATES)
    dataset = TarEvalDataset(list(shards), transform, "cls")
    return ClassificationSet(name or _shard_set_name(shard_dir, split), dataset, read_lines(names_file), templates)


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
    if _find_cifar(root) is not None:
        return _cifar_set(root, transform, name, split)
    shards = _shards_in_directory(root, split)
    if shards:
        return _shard_set([str(shard) for shard in shards], transform, name, split)
    if (root / CLASSNAMES_FILE).is_file():
        return _named_image_folder(root, transform, name or root.name)
    directories = _class_directories(root)
    if directories and set(directories) <= set(get_imagenet_wnids()):
        return _imagenet_folder(root, transform, name or "imagenet1k")
    hint = " (an ImageNet root? pass its val/ directory)" if "val" in directories else ""
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
        return RetrievalSet(name or Path(path).stem, CaptionedImages(items, transform))
    if _looks_like_shards(text):
        shards = expand_shards(text)
    else:
        shards = [str(shard) for shard in _shards_in_directory(Path(path), split)]
        if not shards:
            raise FileNotFoundError(f"retrieval data {path}: not a caption .json, and no .tar shards there")
    set_name = name or _shard_set_name(Path(shards[0]).parent, split)
    return RetrievalSet(set_name, TarEvalDataset(shards, transform, "txt"))
