"""Weights by name from a fake Hugging Face hub cache, offline: OpenCLIP and transformers repositories,
OpenCLIP's pretrained tags, revision pinning, and the error when a file is not cached."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from references import (
    assert_same_outputs,
    build_hf_clip,
    build_openclip,
    openclip_model_cfg,
    randomize_norms,
    sample_inputs,
)

import clip
import clip.hub
from clip.models import get_model_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"
INCEPTION = [0.5, 0.5, 0.5]  # a mean/std other than OpenAI's, so the transforms must take it from the source


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache in tmp, offline; huggingface_hub reads both settings at call time."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def assert_same_embeddings(model, other, images, text):
    """Two of our models from the same file: bit-identical image and text embeddings."""
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), other.eval().encode_image(images))
        assert torch.equal(model.encode_text(text), other.encode_text(text))


def add_repo(cache, repo_id, write_files, revision=COMMIT):
    """The layout huggingface_hub's cache has: models--ORG--NAME/{refs/main, snapshots/<commit>/files}.
    `write_files(directory)` writes the repository's files (blobs/ holds no symlink targets here: the
    snapshot files are plain files, which huggingface_hub reads the same)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    write_files(snapshot)
    return snapshot


def openclip_repo(cache, repo_id="test-org/tiny-openclip"):
    """An OpenCLIP-format repository of a random tiny ViT (GELU), mean/std 0.5; returns (OpenCLIP model, dir)."""
    from safetensors.torch import save_file

    cfg = get_model_config("tiny-vit")
    model = build_openclip(cfg).eval()
    randomize_norms(model)
    config = {"model_cfg": openclip_model_cfg(cfg), "preprocess_cfg": {"mean": INCEPTION, "std": INCEPTION}}

    def write(directory):
        (directory / "open_clip_config.json").write_text(json.dumps(config))
        save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))

    return model, add_repo(cache, repo_id, write)


def test_openclip_format_repository_by_hf_hub_name(hub_cache):
    import open_clip

    reference, snapshot = openclip_repo(hub_cache)
    model, train_transform, eval_transform = clip.create_model_and_transforms("hf-hub:test-org/tiny-openclip")
    model.eval()
    direct = clip.create_model("tiny-vit", pretrained=snapshot / "open_clip_model.safetensors").eval()
    images, text = sample_inputs(model.config)
    assert_same_embeddings(model, direct, images, text)  # the same file, loaded by path
    assert_same_outputs(model, reference, images, text)
    # OpenCLIP itself reads the same cache entry and preprocesses with the repository's mean and std.
    theirs, _, their_eval = open_clip.create_model_and_transforms("hf-hub:test-org/tiny-openclip")
    assert_same_outputs(model, theirs.eval(), images, text)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert torch.equal(eval_transform(image), their_eval(image))
    assert list(train_transform.transforms[-1].mean) == INCEPTION
    pinned, _ = clip.load(f"hf-hub:test-org/tiny-openclip@{COMMIT}", device="cpu")
    assert_same_embeddings(pinned, model, images, text)


def test_transformers_format_repository_by_hf_hub_name(hub_cache):
    hf = build_hf_clip("gelu")
    processor = {"image_mean": INCEPTION, "image_std": INCEPTION, "crop_size": 32, "size": 32}
    snapshot = add_repo(hub_cache, "test-org/tiny-hf", lambda directory: (
        hf.save_pretrained(directory), (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    ))  # fmt: skip
    model, eval_transform = clip.load("hf-hub:test-org/tiny-hf", device="cpu")
    direct, _ = clip.load(snapshot, device="cpu")
    images, text = sample_inputs(model.config, eot_token_id=999)
    assert_same_embeddings(model, direct, images, text)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), hf.get_image_features(pixel_values=images).pooler_output,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(model.encode_text(text), hf.get_text_features(input_ids=text).pooler_output,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
    assert model.config.activation == "gelu" and list(eval_transform.transforms[-1].mean) == INCEPTION


def test_openclip_tag_by_pretrained(hub_cache, monkeypatch):
    # A tag of the shipped table, pointed at the fake repository (the real ones hold full-size weights).
    reference, snapshot = openclip_repo(hub_cache)
    entry = {"hf_hub": "test-org/tiny-openclip", "activation": "gelu", "mean": INCEPTION, "std": INCEPTION,
             "resize_mode": "squash"}  # fmt: skip
    monkeypatch.setitem(clip.hub._tags(), "tiny-vit", {"test_tag": entry})
    model, _, eval_transform = clip.create_model_and_transforms("tiny-vit", pretrained="test_tag")
    direct = clip.create_model("tiny-vit", pretrained=snapshot / "open_clip_model.safetensors")
    images, text = sample_inputs(model.config)
    assert_same_embeddings(model, direct, images, text)
    assert_same_outputs(model, reference, images, text)
    assert eval_transform.transforms[0].size == (32, 32) and list(eval_transform.transforms[-1].std) == INCEPTION
    loaded, _ = clip.load("tiny-vit", device="cpu", pretrained="test_tag")
    assert_same_embeddings(loaded, model, images, text)
    # The tag's activation is what its weights need: it replaces the name's.
    assert clip.create_model("tiny-vit", pretrained="test_tag").config.activation == "gelu"
    monkeypatch.setitem(entry, "activation", "quick_gelu")
    assert clip.create_model("tiny-vit", pretrained="test_tag").config.activation == "quick_gelu"
    with pytest.raises(
        FileNotFoundError, match=r"not a file, an hf-hub: name, or a pretrained tag of 'tiny-vit' \(its tags: test_tag"
    ):
        clip.create_model("tiny-vit", pretrained="no_such_tag")


def test_offline_miss_names_the_repository_the_file_and_the_cache(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        clip.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(error.value)
    assert "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "open_clip_model.safetensors" in message
    assert str(hub_cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in message and "HF_HUB_OFFLINE" in message
    openclip_repo(hub_cache)
    with pytest.raises(
        FileNotFoundError, match=r"hf-hub:test-org/tiny-openclip@v2: open_clip_config.json or config.json"
    ) as pinned:
        clip.load("hf-hub:test-org/tiny-openclip@v2")
    assert "`hf download test-org/tiny-openclip open_clip_config.json --revision v2`" in str(pinned.value)
    with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
        clip.load("hf-hub:no-slash")


def test_unsupported_openclip_options_are_named(hub_cache):
    cfg = openclip_model_cfg(get_model_config("tiny-vit"))
    cfg["vision_cfg"]["attentional_pool"] = True
    cfg["text_cfg"]["hf_tokenizer_name"] = "bert-base-uncased"
    add_repo(
        hub_cache, "test-org/odd", lambda d: (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    )
    with pytest.raises(
        clip.CheckpointFormatError, match="vision_cfg.attentional_pool=True; text_cfg.hf_tokenizer_name"
    ):
        clip.create_model("hf-hub:test-org/odd")


def test_tag_table_is_openclips():
    from open_clip.pretrained import _PRETRAINED

    from clip.models import list_models

    ours = clip.hub._tags()
    expected = {name: set(tags) for name, tags in _PRETRAINED.items() if name in list_models()}
    assert {name: set(tags) for name, tags in ours.items()} == expected
    for name, tags in ours.items():
        for tag, entry in tags.items():
            theirs = _PRETRAINED[name][tag]
            assert entry["hf_hub"] == theirs["hf_hub"].rstrip("/"), (name, tag)
            assert entry["activation"] == ("quick_gelu" if theirs.get("quick_gelu") else "gelu"), (name, tag)
            assert (tuple(entry["mean"]), tuple(entry["std"])) == (tuple(theirs["mean"]), tuple(theirs["std"]))
            assert entry["resize_mode"] == theirs["resize_mode"] and theirs["interpolation"] == "bicubic"
    assert ("ViT-B-32", "laion2b_s34b_b79k") in clip.list_pretrained()
