"""Reading TorchScript archives (OpenAI's release format) without executing them."""

import collections
import io
import pickle
import warnings
import zipfile

import pytest
import torch
from payloads import SystemCallPayload
from references import write_openai_archive
from torch import nn

import clip
from clip.models.torchscript import read_torchscript_state_dict
from clip.models.weights import CheckpointFormatError, UnsafeCheckpointError


def _jit_state_dict(path):
    # The trusted reference: torch.jit.load runs the archive, fine for files this test wrote.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path)).state_dict()


class _Scripted(nn.Module):
    """Mangled classes (two Linear types), BatchNorm buffers, a fp16 parameter and a tensor that is an
    attribute, neither parameter nor buffer, which state_dict() leaves out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.norm = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.randn(4).half())
        self.mask = torch.ones(2, 2)

    def forward(self, x):
        return self.norm(self.b(self.a(x))) * self.scale.float() + self.mask.sum()


@pytest.mark.parametrize("kind", ["traced-clip", "scripted"])
def test_reader_matches_torch_jit_state_dict(tmp_path, kind):
    path = tmp_path / "archive.pt"
    if kind == "traced-clip":
        write_openai_archive(path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(_Scripted()).save(str(path))
    expected = _jit_state_dict(path)
    state_dict = read_torchscript_state_dict(path)
    assert list(state_dict) == list(expected)
    for key, value in expected.items():
        assert state_dict[key].dtype == value.dtype and torch.equal(state_dict[key], value), key


def test_clip_load_reads_anwrite_openai_archive(tmp_path):
    original = write_openai_archive(tmp_path / "ViT-tiny.pt")
    model, _ = clip.load(tmp_path / "ViT-tiny.pt", device="cpu")
    assert model.config.activation == "quick_gelu"  # what OpenAI's weights need
    loaded = model.state_dict()
    for key, value in original.state_dict().items():
        if key in ("input_resolution", "context_length", "vocab_size"):
            assert key not in loaded
        else:
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value.half().float()), key


def _write_archive(path, data_pkl: bytes, records=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/constants.pkl", pickle.dumps(()))
        archive.writestr("archive/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        for name, payload in (records or {}).items():
            archive.writestr(f"archive/data/{name}", payload)



def test_malicious_archive_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    _write_archive(tmp_path / "evil.pt", pickle.dumps({"payload": SystemCallPayload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"global: posix.system"):
        clip.load(tmp_path / "evil.pt", device="cpu")
    assert not marker.exists()


class _Storage:
    pass


class _CraftedTensor:
    """A tensor record with the given geometry over a 4-element storage."""

    def __init__(self, offset, size, stride):
        self.geometry = (offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(), *self.geometry, False, collections.OrderedDict())


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, _Storage) else None


@pytest.mark.parametrize(
    "offset, size, stride, message",
    [
        (0, (100,), (1,), "reaches past its 4-element storage"),
        (0, (5,), (1,), "reaches past its 4-element storage"),  # one element too many
        (1, (2, 2), (2, 1), "reaches past its 4-element storage"),
        (-1, (2,), (1,), "invalid tensor geometry"),
        (3, (2,), (-1,), "invalid tensor geometry"),
    ],
)
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, message):
    buffer = io.BytesIO()
    _ArchivePickler(buffer, protocol=2).dump({"weight": _CraftedTensor(offset, size, stride)})
    _write_archive(tmp_path / "oob.pt", buffer.getvalue(), records={"0": bytes(16)})
    with pytest.raises(CheckpointFormatError, match=message):
        read_torchscript_state_dict(tmp_path / "oob.pt")


def test_jit_true_is_refused(tmp_path):
    with pytest.raises(NotImplementedError, match="never runs TorchScript"):
        clip.load(tmp_path / "any.pt", jit=True)
