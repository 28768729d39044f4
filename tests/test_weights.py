"""Safe reading, strict loading, config checks and the export format."""

import json
import logging
import struct

import pytest
import torch
from payloads import SystemCallPayload
from references import assert_same_outputs, build_openclip, sample_inputs

import clip
from clip.models import get_model_config
from clip.models.hub_export import export_model
from clip.models.weights import (
    CheckpointFormatError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_weights,
    read_safetensors_header,
)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2), "payload": SystemCallPayload(marker)}, path)
    for load in (lambda: clip.load(path, device="cpu"), lambda: clip.create_model("tiny-vit", pretrained=path)):
        refused = r"refusing to unpickle non-tensor objects \(global: posix.system\)"
        with pytest.raises(UnsafeCheckpointError, match=refused):
            load()
    assert not marker.exists()


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet", "tiny-timm"])
def test_export_round_trip_is_bit_exact(tmp_path, name):
    model = clip.create_model(name).eval()
    with torch.no_grad():  # non-default BatchNorm statistics, so buffers are checked too
        for buffer_name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    path = export_model(model, tmp_path / "model.safetensors", metadata={"run": "test"})
    loaded, preprocess = clip.load(path, device="cpu")
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert loaded.config == model.config
    assert not loaded.training
    assert read_safetensors_header(path)[1]["run"] == "test"
    assert not list(tmp_path.glob("*.tmp"))


def test_openclip_loads_our_export(tmp_path):
    from open_clip.factory import load_checkpoint

    cfg = get_model_config("tiny-vit")
    ours = clip.create_model("tiny-vit").eval()
    path = export_model(ours, tmp_path / "model.safetensors")
    reference = build_openclip(cfg).eval()
    load_checkpoint(reference, str(path))  # what OpenCLIP's pretrained=<path> runs; strict
    assert_same_outputs(ours, reference, *sample_inputs(cfg))


def test_stored_config_mismatch_is_named_before_tensors_are_read(tmp_path, monkeypatch):
    path = export_model(clip.create_model("tiny-vit", vision_width=32), tmp_path / "narrow.safetensors")

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensors were read before the config check")

    monkeypatch.setattr("safetensors.torch.load_file", no_tensor_reads)
    with pytest.raises(CheckpointMismatchError) as error:
        clip.create_model("tiny-vit", pretrained=path)
    message = str(error.value)
    assert "model.vision.width=32" in message and "current config has 64" in message
    assert "partial_init=True" in message


def test_wrong_architecture_names_the_differing_fields(tmp_path):
    path = export_model(clip.create_model("tiny-vit"), tmp_path / "vit.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"model.vision.kind='vit'.*current config has .*'resnet'"):
        clip.create_model("tiny-resnet", pretrained=path)
    # Another activation is another function, even though every tensor fits.
    with pytest.raises(CheckpointMismatchError, match="model.activation='gelu'"):
        clip.create_model("tiny-vit", pretrained=path, activation="quick_gelu")


def test_checkpoint_without_config_falls_back_to_the_tensor_check(tmp_path):
    from safetensors.torch import save_file

    save_file(clip.create_model("tiny-vit", vision_width=32).state_dict(), str(tmp_path / "legacy.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"size mismatch for visual.conv1.weight: checkpoint \[32"):
        clip.create_model("tiny-vit", pretrained=tmp_path / "legacy.safetensors")


def test_partial_init_loads_what_fits_and_reports_the_rest(tmp_path, caplog):
    source = clip.create_model("tiny-vit", vision_width=32)
    path = export_model(source, tmp_path / "narrow.safetensors")
    with caplog.at_level(logging.WARNING):
        model = clip.create_model("tiny-vit", pretrained=path, partial_init=True)
    assert "size mismatch for visual.conv1.weight" in caplog.text
    # Text tower tensors fit and are loaded; the image tower keeps its initialisation.
    assert torch.equal(model.token_embedding.weight, source.token_embedding.weight)
    assert model.visual.conv1.weight.shape[0] == 64

    report = load_weights(clip.create_model("tiny-vit"), source.state_dict(), partial=True)
    assert "visual.class_embedding" in " ".join(report.mismatched)
    assert "token_embedding.weight" in report.loaded and not report.missing and not report.unexpected


def test_strict_load_lists_missing_and_unexpected_keys():
    model = clip.create_model("tiny-vit")
    state_dict = dict(model.state_dict())
    del state_dict["ln_final.weight"]
    state_dict["extra.weight"] = torch.zeros(1)
    listed = r"missing \(1\): ln_final.weight; unexpected \(1\): extra.weight"
    with pytest.raises(CheckpointMismatchError, match=listed):
        load_weights(model, state_dict)


def test_truncated_files_are_reported(tmp_path):
    path = export_model(clip.create_model("tiny-vit"), tmp_path / "model.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.safetensors.*truncated"):
        clip.load(tmp_path / "cut.safetensors", device="cpu")

    torch.save(clip.create_model("tiny-vit").state_dict(), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.pt"):
        clip.load(tmp_path / "cut.pt", device="cpu")


def test_safetensors_header_must_describe_the_file(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64 + 8))  # 8 stray bytes at the end
    with pytest.raises(CheckpointFormatError, match="data section is 72 bytes but the header describes 64"):
        read_safetensors_header(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(CheckpointFormatError, match="'w'.*needs 64 bytes"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + header)  # a header length beyond the file is not read
    with pytest.raises(CheckpointFormatError, match=f"header claims 1000 bytes but the file has {8 + len(header)}"):
        read_safetensors_header(path)


def test_unknown_format_is_named(tmp_path):
    (tmp_path / "notes.pt").write_bytes(b"these are not weights at all")
    with pytest.raises(CheckpointFormatError, match="notes.pt: unknown checkpoint format"):
        clip.load(tmp_path / "notes.pt", device="cpu")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointFormatError, match="without config.json"):
        clip.load(tmp_path / "dir", device="cpu")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointFormatError, match="not tensors: weights"):
        clip.load(tmp_path / "list.pt", device="cpu")


@pytest.mark.slow
def test_openclip_factory_loads_full_size_export(tmp_path):
    import open_clip

    ours = clip.create_model("ViT-B-32-quickgelu").eval()
    path = export_model(ours, tmp_path / "model.safetensors")
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=str(path)).eval()
    assert_same_outputs(ours, reference, *sample_inputs(ours.config, num_images=2, num_texts=2))
