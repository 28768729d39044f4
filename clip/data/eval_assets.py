"""The class names and prompt templates shipped in clip/assets (sources and licences: ZERO_SHOT_SOURCES.md there),
and the file names an eval set's own lists go by."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

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


# CLIP_benchmark's dataset names (its WebDataset exports are `wds_<name>`) -> the section of OpenAI's
# data/prompts.md (shipped as clip_paper_prompts.json) that holds the dataset's class names and templates.
CLIP_PAPER_SECTIONS = {
    "food101": "Food101",
    "sun397": "SUN397",
    "cars": "StanfordCars",
    "fgvc_aircraft": "FGVCAircraft",
    "dtd": "DescribableTextures",
    "pets": "OxfordPets",
    "caltech101": "Caltech101",
    "flowers": "Flowers102",
    "mnist": "MNIST",
    "stl10": "STL10",
    "eurosat": "EuroSAT",
    "resisc45": "RESISC45",
    "gtsrb": "GTSRB",
    "kitti_closest_vehicle_distance": "KITTI",
    "country211": "Country211",
    "pcam": "PatchCamelyon",
    "renderedsst2": "SST2",
    "fer2013": "FacialEmotionRecognition2013",
    "clevr_count_all": "CLEVRCounts",
    "voc2007": "PascalVOC2007",
    "voc2007_multilabel": "PascalVOC2007",
    "birdsnap": "Birdsnap",
    "ucf101": "UCF101",
    "kinetics700": "Kinetics700",
    "hateful_memes": "HatefulMemes",
}


@functools.cache
def _clip_paper_prompts() -> dict[str, dict[str, list]]:
    return json.loads((resources.files("clip") / "assets" / "clip_paper_prompts.json").read_text(encoding="utf-8"))


def known_datasets() -> list[str]:
    """The datasets with shipped class names and templates."""
    return sorted({*_CLASSNAME_ASSETS, *CLIP_PAPER_SECTIONS})


def get_classnames(dataset: str) -> list[str]:
    """Class names in label order for a known dataset (`known_datasets()`): imagenet1k (OpenAI's names),
    CIFAR, and OpenAI's lists for the CLIP paper's datasets. FER2013's classes have several names in
    OpenAI's list; the first is used, as CLIP_benchmark does."""
    if dataset in _CLASSNAME_ASSETS:
        return _asset(_CLASSNAME_ASSETS[dataset])
    if dataset in CLIP_PAPER_SECTIONS:
        return [
            c if isinstance(c, str) else c[0] for c in _clip_paper_prompts()[CLIP_PAPER_SECTIONS[dataset]]["classes"]
        ]
    raise KeyError(f"no shipped class names for {dataset!r}; known: {known_datasets()}")


def get_templates(dataset: str) -> list[str]:
    """OpenAI's prompt templates for a known dataset (80 for imagenet1k, 18 for CIFAR, ...)."""
    if dataset in _TEMPLATE_ASSETS:
        return _asset(_TEMPLATE_ASSETS[dataset])
    if dataset in CLIP_PAPER_SECTIONS:
        return list(_clip_paper_prompts()[CLIP_PAPER_SECTIONS[dataset]]["templates"])
    raise KeyError(f"no shipped templates for {dataset!r}; known: {known_datasets()}")


def get_imagenet_subset(benchmark: str) -> list[str]:
    """The 200 WordNet ids, sorted, of ImageNet-R, -A or -O (Hendrycks et al.'s class subsets)."""
    return _asset(f"{benchmark.replace('-', '_')}_wnids.txt")


def get_imagenet_wnids() -> list[str]:
    """ImageNet-1k's WordNet ids in label order (sorted, as ImageFolder orders `val/`)."""
    return _asset("imagenet1k_wnids.txt")
