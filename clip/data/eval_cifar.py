"""CIFAR-10/100 in torchvision's local format (`cifar-10-batches-py/`, `cifar-100-python/`), read with an
unpickler that allows only what numpy arrays need."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Transform = Callable[[Image.Image], torch.Tensor]


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python files are pickles of dicts holding numpy arrays. Only the globals a pickled
    array needs are allowed, so a tampered file cannot run code (torchvision uses plain pickle)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
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


CIFAR_LAYOUTS = {
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


def find_cifar(path: Path) -> Path | None:
    if path.name in CIFAR_LAYOUTS:
        return path
    return next((path / folder for folder in CIFAR_LAYOUTS if (path / folder).is_dir()), None)


class CifarDataset(Dataset):
    """CIFAR-10/100 from torchvision's local files (`<root>/cifar-10-batches-py` or the folder itself)."""

    def __init__(self, root: str | Path, transform: Transform, *, train: bool = False):
        folder = find_cifar(Path(root))
        if folder is None:
            raise FileNotFoundError(f"{root} holds neither {' nor '.join(CIFAR_LAYOUTS)}")
        self.layout = CIFAR_LAYOUTS[folder.name]
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
