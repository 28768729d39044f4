"""The published zero-shot benchmarks by name: where each lives on disk, its classes, templates and metric.

`load_benchmark("imagenet-r", path, transform)` reads ImageNet-R from its release layout (or from
CLIP_benchmark's WebDataset export of it) as a `ClassificationSet` named `imagenet-r`, whose classes
are the benchmark's, in the benchmark's label order:

- `imagenet1k`, `imagenet-sketch`: WordNet-id class folders (`val/n01440764/...`,
  `sketch/n01440764/...`); the label is the wnid's index among ImageNet's 1000, whichever folders
  are present.
- `imagenet-v2`: numeric class folders `0` ... `999`; the label is the folder's number (read as a
  string, `10` would sort before `2`).
- `imagenet-r`, `-a`, `-o`: 200-class subsets in wnid folders; the classifier has those 200 classes
  only (the logits restricted to the subset, as the papers evaluate), the label is the wnid's index
  among the 200; a folder outside the subset is an error.
- `objectnet`: the release's `images/<folder>/` and `mappings/`; the 113 classes that
  `mappings/objectnet_to_imagenet_1k.json` maps to ImageNet, named by their ObjectNet label
  (lowercased), in folder order, with ImageNet's templates: CLIP_benchmark's protocol.
- The CLIP paper's other datasets (`CLIP_PAPER_SECTIONS`): CLIP_benchmark's WebDataset export
  (`wds_<name>/`), which carries its class names in label order; its templates, else OpenAI's.
- DataComp's tasks scored with per-sample metadata (`iwildcam`, `fmow`, `geode`, `dollar_street`):
  DataComp's export, whose `npy` rows give each sample's groups (`clip.group_metrics`).

A CLIP_benchmark export of any of them is read as it is (`clip.data.eval_datasets.load_export`),
with a check that its class count is the benchmark's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clip.data.eval_assets import (
    CLIP_PAPER_SECTIONS,
    get_classnames,
    get_imagenet_subset,
    get_imagenet_wnids,
    get_templates,
)
from clip.data.eval_datasets import (
    ClassificationSet,
    RetrievalSet,
    Transform,
    class_directories,
    image_folder,
    is_export,
    load_classification_set,
    load_export,
)
from clip.group_metrics import METADATA_TASKS

# The CLIP paper reports mean per-class recall for these (Radford et al. 2021, appendix A.2); DataComp too.
_MEAN_PER_CLASS = {"fgvc_aircraft", "pets", "caltech101", "flowers"}
IMAGENET_CLASSES = 1000
OBJECTNET_CLASSES = 113


@dataclass(frozen=True)
class Benchmark:
    name: str
    num_classes: int | None  # None: whatever the export says (retrieval, or lists read from the export)
    main_metric: str = "top1"
    # Where the data sits under a suite's data root: the release's directory names, then CLIP_benchmark's export.
    directories: tuple[str, ...] = ()
    read_release: Callable[[Path, Transform], ClassificationSet] | None = None


def _wnid_folder(root: Path, transform: Transform, name: str, wnids: list[str]) -> ClassificationSet:
    present = class_directories(root)
    outside = sorted(set(present) - set(wnids))
    if not present or outside:
        what = (
            f"{len(outside)} class folder(s) outside its {len(wnids)} classes, e.g. {outside[:3]}"
            if outside
            else "no class folders"
        )
        raise ValueError(f"{name} at {root}: {what} (expected WordNet-id folders such as {wnids[0]}/)")
    names_by_wnid = dict(zip(get_imagenet_wnids(), get_classnames("imagenet1k")))
    dataset = image_folder(root, transform, {wnid: label for label, wnid in enumerate(wnids)})
    classnames = [names_by_wnid[wnid] for wnid in wnids]
    return ClassificationSet(name, dataset, classnames, get_templates("imagenet1k"), str(root))


def _imagenet(name: str) -> Callable[[Path, Transform], ClassificationSet]:
    def read(root: Path, transform: Transform) -> ClassificationSet:
        wnids = get_imagenet_wnids() if name in ("imagenet1k", "imagenet-sketch") else get_imagenet_subset(name)
        return _wnid_folder(root, transform, name, wnids)

    return read


def _imagenet_v2(root: Path, transform: Transform) -> ClassificationSet:
    present = class_directories(root)
    numbers = {str(label) for label in range(IMAGENET_CLASSES)}
    outside = [folder for folder in present if folder not in numbers]
    if not present or outside:
        what = f"folders that are not class numbers 0-999, e.g. {outside[:3]}" if outside else "no class folders"
        raise ValueError(f"imagenet-v2 at {root}: {what} (the release's layout is <root>/0/ ... <root>/999/)")
    dataset = image_folder(root, transform, {str(label): label for label in range(IMAGENET_CLASSES)})
    return ClassificationSet(
        "imagenet-v2", dataset, get_classnames("imagenet1k"), get_templates("imagenet1k"), str(root)
    )


def _objectnet(root: Path, transform: Transform) -> ClassificationSet:
    release = root / "objectnet-1.0" if (root / "objectnet-1.0").is_dir() else root
    mappings, images = release / "mappings", release / "images"
    try:
        folder_to_label = json.loads((mappings / "folder_to_objectnet_label.json").read_text())
        to_imagenet = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"objectnet at {root}: no {error.filename} (the release's mappings/)") from None
    folders = sorted(folder for folder, label in folder_to_label.items() if label in to_imagenet)
    if len(folders) != OBJECTNET_CLASSES:
        raise ValueError(
            f"objectnet at {root}: mappings/ give {len(folders)} ImageNet classes, not {OBJECTNET_CLASSES}"
        )
    missing = [folder for folder in folders if not (images / folder).is_dir()]
    if len(missing) == len(folders):
        raise FileNotFoundError(f"objectnet at {root}: none of its class folders under {images}")
    # Only the 113 overlapping classes' folders are read; the other 200 ObjectNet classes are not ImageNet's.
    dataset = image_folder(images, transform, {folder: label for label, folder in enumerate(folders)})
    classnames = [folder_to_label[folder].lower() for folder in folders]
    return ClassificationSet("objectnet", dataset, classnames, get_templates("imagenet1k"), str(root))


_IMAGENET_FAMILY = [
    Benchmark(
        "imagenet1k",
        1000,
        directories=("imagenet/val", "imagenet1k/val", "wds_imagenet1k"),
        read_release=_imagenet("imagenet1k"),
    ),
    Benchmark(
        "imagenet-v2",
        1000,
        directories=("imagenetv2-matched-frequency-format-val", "imagenet-v2", "wds_imagenetv2"),
        read_release=_imagenet_v2,
    ),
    Benchmark(
        "imagenet-sketch",
        1000,
        directories=("sketch", "imagenet-sketch", "wds_imagenet_sketch"),
        read_release=_imagenet("imagenet-sketch"),
    ),
    Benchmark("imagenet-r", 200, directories=("imagenet-r", "wds_imagenet-r"), read_release=_imagenet("imagenet-r")),
    Benchmark("imagenet-a", 200, directories=("imagenet-a", "wds_imagenet-a"), read_release=_imagenet("imagenet-a")),
    Benchmark("imagenet-o", 200, directories=("imagenet-o", "wds_imagenet-o"), read_release=_imagenet("imagenet-o")),
    Benchmark("objectnet", 113, directories=("objectnet-1.0", "objectnet", "wds_objectnet"), read_release=_objectnet),
]
_CIFAR = [Benchmark(name, None, directories=(name, f"wds_{name}")) for name in ("cifar10", "cifar100")]
_MAIN_METRICS = {name: "mean_per_class_recall" for name in _MEAN_PER_CLASS} | {
    "voc2007_multilabel": "mean_average_precision_11point"  # the CLIP paper's VOC2007 metric
}
_CLIP_PAPER = [
    Benchmark(name, None, _MAIN_METRICS.get(name, "top1"), (name, f"wds_{name}", f"wds_vtab-{name}"))
    for name in CLIP_PAPER_SECTIONS
]  # (CLIP_benchmark's Hugging Face exports of the VTAB datasets are wds_vtab-<name>)
_RETRIEVAL = [
    Benchmark(name, None, "image_retrieval_recall@5", (name, f"wds_{name}"))
    for name in ("mscoco_captions", "flickr30k", "flickr8k")
]
# DataComp's tasks with metadata, in the directories its download script writes (class counts: its tasklist).
_METADATA = [
    Benchmark(name, count, METADATA_TASKS[name].main_metric, (directory,))
    for name, count, directory in (
        ("iwildcam", 182, "wds_wilds-iwildcam_test"),
        ("fmow", 62, "wds_wilds-fmow_test"),
        ("geode", 40, "wds_geode_test"),
        ("dollar_street", 58, "wds_dollar_street_test"),
    )
]
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for b in [*_IMAGENET_FAMILY, *_CIFAR, *_CLIP_PAPER, *_RETRIEVAL, *_METADATA]
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_benchmark(
    name: str, path: str | Path, transform: Transform, *, split: str = "test"
) -> ClassificationSet | RetrievalSet:
    """Benchmark `name` read from `path`: its release layout (ImageNet family), torchvision's CIFAR files,
    or CLIP_benchmark's (DataComp's) WebDataset export. The set is named `name` and carries the
    benchmark's main metric (and, for DataComp's metadata tasks, its `metadata_task`)."""
    benchmark = get_benchmark(name)
    root = Path(path)
    if is_export(root, split):
        templates = get_templates(name) if name in CLIP_PAPER_SECTIONS else None  # when the export has none
        eval_set = load_export(root, transform, name=name, split=split, default_templates=templates)
    elif benchmark.read_release is not None:
        eval_set = benchmark.read_release(root, transform)
    elif name in ("cifar10", "cifar100"):
        eval_set = load_classification_set(root, transform, name=name, split=split)
        if eval_set.classnames != get_classnames(name):
            raise ValueError(f"{name} at {root}: the CIFAR files there are not {name}'s")
    else:
        raise FileNotFoundError(f"{name} at {root}: no CLIP_benchmark export there (wds_{name}/: {split}/*.tar)")
    count = len(eval_set.classnames) if isinstance(eval_set, ClassificationSet) else None
    if benchmark.num_classes is not None and count != benchmark.num_classes:
        raise ValueError(f"{name} at {root}: {count} classes, but {name} has {benchmark.num_classes}")
    eval_set.main_metric = benchmark.main_metric
    if name in METADATA_TASKS:
        eval_set.metadata_task = name
    return eval_set
