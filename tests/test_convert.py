"""Checkpoint conversion: OpenCLIP and Hugging Face parity, architecture inference, positional embeddings."""

import json
import math

import pytest
import torch
from references import assert_same_outputs, build_hf_clip, build_openclip, randomize_norms, sample_inputs

import clip
from clip.config import model_config_to_dict
from clip.models import get_model_config, list_models
from clip.models.clip import CLIP
from clip.models.convert import (
    find_registered_name,
    infer_model_config,
    read_checkpoint,
    resize_positional_embedding,
)
from clip.models.hub_export import export_model
from clip.models.weights import CheckpointFormatError, CheckpointMismatchError


# Parity with OpenCLIP and Hugging Face is checked in float64 (the loaded float32 weights, cast): two
# implementations of one function sum in different orders, and in float32 their difference depends
# on the CPU's kernels (vector width, BLAS, threads); in float64 it is ~1e-15 of the outputs' size,
# so a relative tolerance of 1e-10 keeps a margin of about 1e5 on any CPU and still fails on any
# wrong weight, activation or pooling (those are errors of 1e-3 and more).
PARITY_RTOL = 1e-10


def assert_same_outputs_in_float64(model, reference, images, text) -> None:
    assert_same_outputs(model.double(), reference.double(), images.double(), text, rtol=PARITY_RTOL)


def _save_openclip(model, path, layout):
    """Save an OpenCLIP model's weights the ways OpenCLIP users have them on disk."""
    state_dict = model.state_dict()
    if layout == "raw":
        torch.save(state_dict, path)
    elif layout == "training-checkpoint":  # OpenCLIP's train script: DDP prefixes, wrapped with optimizer state
        wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
        torch.save(wrapped, path)
    else:
        from safetensors.torch import save_file

        save_file(state_dict, str(path))


@pytest.mark.parametrize(
    ("name", "layout", "suffix"),
    [
        ("tiny-vit", "raw", ".bin"),
        ("tiny-resnet", "training-checkpoint", ".pt"),
        ("tiny-timm", "safetensors", ".safetensors"),
    ],
)
def test_openclip_checkpoint_gives_openclip_outputs(tmp_path, name, layout, suffix):
    cfg = get_model_config(name)
    reference = build_openclip(cfg).eval()
    randomize_norms(reference)
    path = tmp_path / f"openclip{suffix}"
    _save_openclip(reference, path, layout)

    model, preprocess_train, preprocess_val = clip.create_model_and_transforms(name, pretrained=path)
    model.eval()
    assert_same_outputs_in_float64(model, reference, *sample_inputs(cfg))
    assert preprocess_val.transforms[0].size == cfg.vision.image_size


def test_openclip_quickgelu_activation_comes_from_the_name(tmp_path):
    cfg = get_model_config("tiny-vit")
    cfg.activation = "quick_gelu"
    reference = build_openclip(cfg).eval()
    path = tmp_path / "quickgelu.pt"
    torch.save(reference.state_dict(), path)
    images, text = sample_inputs(cfg)
    model = clip.create_model("tiny-vit", pretrained=path, activation="quick_gelu").eval()
    assert_same_outputs_in_float64(model, reference, images, text)
    # The same weights under the GELU name are a different function: the test can fail.
    gelu_model = clip.create_model("tiny-vit", pretrained=path).eval().double()
    with torch.no_grad():
        gelu_features, features = gelu_model.encode_image(images.double()), reference.encode_image(images.double())
        assert not torch.allclose(gelu_features, features, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_full_size_openclip_parity(tmp_path, name):
    cfg = get_model_config(name)
    reference = build_openclip(cfg).eval()
    randomize_norms(reference)
    torch.save(reference.state_dict(), tmp_path / "full.pt")
    model = clip.create_model(name, pretrained=tmp_path / "full.pt").eval()
    assert_same_outputs_in_float64(model, reference, *sample_inputs(cfg, num_images=2, num_texts=2))


# ------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(
    ("hidden_act", "eos_token_id"),
    [("quick_gelu", 2), ("gelu", 500)],  # legacy configs pool at argmax(ids); newer ones at the first eos id
)
def test_hugging_face_directory_gives_hf_embeddings(tmp_path, hidden_act, eos_token_id):
    hf = build_hf_clip(hidden_act, eos_token_id)
    hf.save_pretrained(tmp_path / "hf")
    if hidden_act == "quick_gelu":  # Hugging Face's default: a config may leave it out
        config_path = tmp_path / "hf" / "config.json"
        config = json.loads(config_path.read_text())
        for tower in ("text_config", "vision_config"):
            del config[tower]["hidden_act"]
        config_path.write_text(json.dumps(config))
    model, _ = clip.load(tmp_path / "hf", device="cpu")
    model, hf = model.double(), hf.double()

    eot = 999 if eos_token_id == 2 else eos_token_id
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    text = torch.randint(1, 999, (4, 24), generator=generator)
    for row in range(4):
        text[row, 2 + 5 * row] = eot
    if eos_token_id != 2:
        text[:, -1] = 998  # ids above the eos id: pooling must not be argmax-based here
    with torch.no_grad():
        expected_image = hf.get_image_features(pixel_values=images).pooler_output
        expected_text = hf.get_text_features(input_ids=text).pooler_output
        expected_logits = hf(input_ids=text, pixel_values=images).logits_per_image
        for got, expected in [(model.encode_image(images), expected_image), (model.encode_text(text), expected_text),
                              (model(images, text)[0], expected_logits)]:
            # relative to the largest output (max-norm), as assert_same_outputs does
            torch.testing.assert_close(got, expected, rtol=0, atol=PARITY_RTOL * expected.abs().max().item())
    assert model.config.activation == hidden_act


def test_hugging_face_unsupported_option_is_named(tmp_path):
    hf = build_hf_clip("gelu_new", 2)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointFormatError, match="hidden_act.*gelu_new"):
        clip.load(tmp_path / "hf", device="cpu")


# ----------------------------------------------------------------------------- shape inference


@pytest.mark.parametrize("name", [n for n in list_models() if "timm" not in n])
def test_architecture_is_inferred_from_shapes(name):
    # Meta tensors: full-size models cost no memory or time.
    cfg = get_model_config(name)
    with torch.device("meta"):
        state_dict = CLIP(cfg).state_dict()
    inferred = infer_model_config(state_dict, activation=cfg.activation)
    assert model_config_to_dict(inferred) == model_config_to_dict(cfg)
    assert find_registered_name(inferred) == name


def test_unregistered_architecture_uses_openai_head_convention():
    cfg = get_model_config("tiny-vit")
    cfg.vision.width, cfg.vision.layers, cfg.vision.head_width = 128, 3, 64
    with torch.device("meta"):
        inferred = infer_model_config(CLIP(cfg).state_dict())
    assert (inferred.vision.width, inferred.vision.layers, inferred.vision.heads) == (128, 3, 2)
    assert find_registered_name(inferred) is None


def test_timm_tower_needs_a_name(tmp_path):
    torch.save(CLIP(get_model_config("tiny-timm")).state_dict(), tmp_path / "timm.pt")
    with pytest.raises(CheckpointFormatError, match="timm.*pass the model name"):
        clip.create_model(pretrained=tmp_path / "timm.pt")


def test_wrong_name_for_checkpoint_names_keys_and_the_matching_model(tmp_path):
    torch.save(CLIP(get_model_config("tiny-vit")).state_dict(), tmp_path / "vit.pt")
    with pytest.raises(CheckpointMismatchError) as error:
        clip.create_model("tiny-resnet", pretrained=tmp_path / "vit.pt")
    message = str(error.value)
    assert "missing" in message and "visual.bn1.weight" in message
    assert "unexpected" in message and "visual.class_embedding" in message
    assert "'tiny-vit'" in message


def test_state_dict_wrappers_are_removed(tmp_path):
    state_dict = CLIP(get_model_config("tiny-vit")).state_dict()
    ddp = {f"module.{k}": v for k, v in state_dict.items()}  # a compiled DDP model: _orig_mod.module.<key>
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in ddp.items()}}, tmp_path / "wrapped.pt")
    loaded = read_checkpoint(tmp_path / "wrapped.pt").state_dict
    assert loaded.keys() == state_dict.keys()


# -------------------------------------------------------------------------- positional embeddings


def test_resize_matches_openclip():
    from open_clip.model import resize_pos_embed

    embedding = torch.randn(1 + 7 * 7, 16)
    reference = {"visual.positional_embedding": embedding.clone()}

    class Visual(torch.nn.Module):
        grid_size = (10, 10)

    model = torch.nn.Module()
    model.visual = Visual()
    resize_pos_embed(reference, model)
    assert torch.equal(resize_positional_embedding(embedding, 10), reference["visual.positional_embedding"])


def test_resize_there_and_back_is_close():
    # A smooth embedding (as trained ones are) survives 7x7 -> 10x10 -> 7x7 nearly unchanged; the class
    # token is copied untouched.
    grid = torch.linspace(0, 1, 7)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    features = torch.stack([torch.sin(math.pi * f * x + g * y) for f in (0.5, 1.0) for g in (0.3, 0.7)], dim=-1)
    embedding = torch.cat([torch.randn(1, 4), features.reshape(49, 4)])
    there = resize_positional_embedding(embedding, 10)
    back = resize_positional_embedding(there, 7)
    assert there.shape == (101, 4) and torch.equal(there[0], embedding[0])
    torch.testing.assert_close(back, embedding, atol=0.05, rtol=0)  # 5% of the amplitude, at the borders


@pytest.mark.parametrize(("name", "new_size"), [("tiny-vit", 48), ("tiny-resnet", 96)])
def test_checkpoint_loads_at_another_image_size(tmp_path, name, new_size):
    source = clip.create_model(name).eval()
    export_model(source, tmp_path / "model.safetensors")
    model, _, preprocess = clip.create_model_and_transforms(pretrained=tmp_path / "model.safetensors",
                                                            image_size=new_size)  # fmt: skip
    key = "visual.positional_embedding" if name == "tiny-vit" else "visual.attnpool.positional_embedding"
    grid = model.config.vision.grid_size
    assert model.state_dict()[key].shape[0] == 1 + grid * grid
    torch.testing.assert_close(model.state_dict()[key], resize_positional_embedding(source.state_dict()[key], grid))
    assert model.eval().encode_image(torch.randn(2, 3, new_size, new_size)).shape == (2, model.config.embed_dim)
    assert preprocess.transforms[0].size == new_size
