"""Read the weights of a TorchScript archive (OpenAI's released `.pt` files) without executing it.

`torch.jit.load` runs the archive's code, and `torch.load(weights_only=True)` refuses TorchScript
archives, so this module reads the zip itself. `data.pkl` is unpickled with a restricted unpickler whose
only constructible objects are tensors over the zip's `data/` records, ordered dicts, and inert
placeholders for the archive's `__torch__.*` module classes; any other global raises
`UnsafeCheckpointError`. The placeholder tree is then walked into a flat state dict that keeps exactly
the tensors each class declares in `__parameters__` / `__buffers__` in its `code/` file (the same keys
as `torch.jit.load(path).state_dict()`). The code files are read as text, never run.
"""

from __future__ import annotations

import ast
import io
import pickle
import re
import zipfile
from pathlib import PurePosixPath
from typing import Any

import torch

from clip.models.weights import CheckpointFormatError, PathLike, UnsafeCheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript_archive(path: PathLike) -> bool:
    """A zip whose records include TorchScript code (`<archive>/code/...` or `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


class _ScriptObject:
    """Inert stand-in for one `__torch__.*` object: its type name and attribute dict, nothing callable."""

    type_name = ""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _StorageType:
    """What the unpickler returns for `torch.FloatStorage` etc.: only a dtype, to pair with a record."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _identity(value: Any, *_: Any) -> Any:
    return value


def _checked_rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    # Replaces torch._utils._rebuild_tensor_v2: a strided view over a storage, bounds-checked here so a
    # crafted header cannot address memory outside the record it came from.
    if not isinstance(storage, torch.Tensor):
        raise UnsafeCheckpointError("tensor rebuilt from something that is not a storage record")
    storage_offset, size, stride = int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointFormatError(f"invalid tensor geometry: offset {storage_offset}, size {size}, stride {stride}")
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise CheckpointFormatError(f"tensor of size {size} reaches past its {storage.numel()}-element storage")
    return storage.as_strided(size, stride, storage_offset)


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _checked_rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _checked_rebuild_tensor,
        ("collections", "OrderedDict"): dict,
        # TorchScript's typed-container tags: the value passes through unchanged.
        **{("torch.jit._pickle", name): _identity for name in (
            "build_intlist", "build_floatlist", "build_boollist", "build_doublelist", "build_tensorlist",
            "build_genericlist", "restore_type_tag",
        )},
    }  # fmt: skip

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive = archive
        self._root = root
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"type_name": qualname})
            return self._classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise UnsafeCheckpointError(
            f"refusing to unpickle non-tensor objects (global: {module}.{name}) in a TorchScript archive"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ('storage', storage type, record key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unknown persistent id {pid!r} in a TorchScript archive")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"storage record {key!r} has no known storage type")
        if key not in self._storages:
            record = f"{self._root}/data/{key}"
            try:
                info = self._archive.getinfo(record)
            except KeyError:
                raise CheckpointFormatError(f"record {record} is missing from the archive") from None
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if info.file_size != numel * itemsize:
                raise CheckpointFormatError(
                    f"record {record} has {info.file_size} bytes, expected {numel} x {itemsize} (truncated?)"
                )
            raw = bytearray(self._archive.read(record))
            self._storages[key] = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(
                0, dtype=storage_type.dtype
            )
        return self._storages[key]


_CLASS_LINE = re.compile(r"^class (\w+)\(")
_DECLARATION_LINE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")


def _declared_tensors(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """{class qualname: names in its __parameters__ and __buffers__}, read from the code files as text."""
    declared: dict[str, set[str]] = {}
    code_root = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(code_root) and name.endswith(".py")):
            continue
        module = ".".join(PurePosixPath(name[len(code_root) : -len(".py")]).parts)  # __torch__/a/b.py -> __torch__.a.b
        current = None
        for line in io.TextIOWrapper(archive.open(name), encoding="utf-8"):
            if match := _CLASS_LINE.match(line):
                current = declared.setdefault(f"{module}.{match.group(1)}", set())
            elif current is not None and (match := _DECLARATION_LINE.match(line)):
                current.update(ast.literal_eval(match.group(2)))
    return declared


def _collect(obj: _ScriptObject, prefix: str, declared: dict[str, set[str]], out: dict[str, torch.Tensor]) -> None:
    if obj.type_name not in declared:
        raise CheckpointFormatError(f"class {obj.type_name} has no declaration in the archive's code/ files")
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, torch.Tensor) and name in declared[obj.type_name]:
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", declared, out)


def read_torchscript_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, keyed as `torch.jit.load(path).state_dict()`."""
    try:
        with zipfile.ZipFile(path) as archive:
            root = archive.namelist()[0].split("/")[0]
            if f"{root}/byteorder" in archive.namelist() and archive.read(f"{root}/byteorder").strip() != b"little":
                raise CheckpointFormatError("big-endian TorchScript archives are not supported")
            declared = _declared_tensors(archive, root)
            with archive.open(f"{root}/data.pkl") as data:
                top = _RestrictedUnpickler(data, archive, root).load()
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointFormatError(f"{path}: unreadable TorchScript archive: {exc}") from exc
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{path}: {exc}") from None
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    if not isinstance(top, _ScriptObject):
        raise CheckpointFormatError(f"{path}: data.pkl does not hold a TorchScript module")
    state_dict: dict[str, torch.Tensor] = {}
    _collect(top, "", declared, state_dict)
    return state_dict
