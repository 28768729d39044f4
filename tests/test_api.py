"""The notebook API: clip.load's name handling and dtype, factories and overrides, the import footprint."""

import copy
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from references import build_openclip, sample_inputs

import clip
from clip.api import _OPENAI_URLS, apply_openai_fp16
from clip.models import OPENAI_NAMES, get_model_config
from clip.models.weights import CheckpointError


def test_offline_load_says_which_file_to_put_where(tmp_path):
    # tests/conftest.py blocks the network, as on an offline cluster node.
    with pytest.raises(FileNotFoundError) as error:
        clip.load("ViT-B/32", device="cpu", download_root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "ViT-B-32.pt") in message
    assert _OPENAI_URLS["ViT-B/32"] in message
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_cached_file_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / "RN50.pt").write_bytes(b"half a download")
    with pytest.raises(CheckpointError, match="RN50.pt has sha256 .* expected afeb0e10"):
        clip.load("RN50", device="cpu", download_root=tmp_path)


def test_a_download_with_the_wrong_hash_never_takes_the_final_name(tmp_path, monkeypatch):
    # Verified downloads: streamed to <name>.tmp, verified, only then renamed; a bad download leaves nothing behind.
    requested = []

    def urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(b"not the RN50 weights")

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    with pytest.raises(FileNotFoundError, match=r"downloaded file has sha256 [0-9a-f]{64}, expected afeb0e10"):
        clip.load("RN50", device="cpu", download_root=tmp_path)
    assert requested == [_OPENAI_URLS["RN50"]]
    assert list(tmp_path.iterdir()) == []


def test_names_without_weights_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"clip.create_model\('ViT-H-14'\)"):
        clip.load("ViT-H-14", download_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a file, an hf-hub: name, nor one of"):
        clip.load("ViT-B/99", download_root=tmp_path)


def test_available_models_are_openais_with_their_published_files():
    from open_clip.pretrained import get_pretrained_url

    assert clip.available_models() == list(OPENAI_NAMES)
    for name, url in _OPENAI_URLS.items():
        assert url == get_pretrained_url(OPENAI_NAMES[name], "openai")


def test_gpu_dtypes_follow_openais_rule():
    # OpenCLIP's convert_weights_to_lp is a port of OpenAI's convert_weights: compare dtype per tensor.
    from open_clip.model import convert_weights_to_lp

    for name in ("tiny-vit", "tiny-resnet"):
        ours = apply_openai_fp16(clip.create_model(name))
        reference = build_openclip(get_model_config(name))
        convert_weights_to_lp(reference)
        expected = {key: value.dtype for key, value in reference.state_dict().items()}
        assert {key: value.dtype for key, value in ours.state_dict().items()} == expected


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-resnet"])
def test_fp16_weights_give_fp32_features_to_fp16_precision(name):
    # The forward pass casts inputs and fp32 embeddings to the weights' dtype; LayerNorm runs in fp32.
    model = clip.create_model(name).eval()
    half = apply_openai_fp16(copy.deepcopy(model))
    images, text = sample_inputs(model.config)
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            expected = getattr(model, encode)(images if encode == "encode_image" else text)
            got = getattr(half, encode)(images if encode == "encode_image" else text)
            assert got.dtype == torch.float16
            assert (got.float() - expected).abs().max() / expected.abs().max() < 1e-2


def test_create_model_overrides():
    model = clip.create_model("tiny-vit", image_size=48, patch_dropout=0.25, context_length=16, text_width=64,
                              text_heads=4, activation="quick_gelu")  # fmt: skip
    cfg = model.config
    assert (cfg.vision.image_size, cfg.vision.patch_dropout, cfg.text.context_length) == (48, 0.25, 16)
    assert model.positional_embedding.shape == (16, 64) and model.visual.positional_embedding.shape == (37, 64)
    assert get_model_config("tiny-vit").vision.image_size == 32  # the registry is not modified
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(TypeError, match="unknown model override 'imagesize'; did you mean 'image_size'"):
        clip.create_model("tiny-vit", imagesize=48)
    with pytest.raises(TypeError, match="'width'"):  # both towers have one: the prefix is required
        clip.create_model("tiny-vit", width=48)
    with pytest.raises(ValueError, match="model.vision.image_size=50 is not a multiple"):
        clip.create_model("tiny-vit", image_size=50)


def test_create_model_and_transforms_returns_openclips_triple():
    model, train, val = clip.create_model_and_transforms("tiny-resnet")
    assert isinstance(model, clip.CLIP) and model.training
    crop = train.transforms[0]
    assert tuple(crop.size) == (64, 64) and crop.scale == (0.9, 1.0)
    assert val.transforms[0].size == 64


def test_import_does_not_load_heavy_or_reference_packages():
    heavy = ("hydra", "omegaconf", "wandb", "webdataset", "open_clip", "transformers")
    code = f"import sys, clip; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])  # fmt: skip
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_docs_example_runs(tmp_path, monkeypatch):
    # The first python block of docs/api.md is runnable as written, in an empty directory.
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    if not hasattr(clip, "tokenize"):  # until the tokenizer lands: ids with an end-of-text token
        def tokenize(texts, context_length=77):
            ids = torch.zeros(len(texts), context_length, dtype=torch.long)
            ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, torch.arange(1, 4), 49407
            return ids

        monkeypatch.setattr(clip, "tokenize", tokenize, raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/api.md", "exec"), {})
