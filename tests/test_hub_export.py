"""clip.export_model(format="hf" | "open_clip"): directories that transformers and OpenCLIP load as the same model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from references import randomize_norms

import clip
from clip.config import ModelConfig
from clip.models import CLIP, get_model_config
from clip.transforms import OPENAI_STD, image_transform_eval

CAPTIONS = [
    "a photo of a cat",
    "A Photo Of A CAT",  # lowercased like ours
    "  two\tdogs\n running   on the  beach ",  # whitespace runs collapse
    "it's 2024! (really)",
    "café naïve 東京",
]


def _trained_looking(name: str, **overrides) -> CLIP:
    """A random model away from its initialisation: every tensor non-trivial, logit_scale not ln(1/0.07)."""
    torch.manual_seed(0)
    model = clip.create_model(name, **overrides).eval()
    randomize_norms(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))  # e.g. non-zero q/k/v biases
        model.logit_scale.fill_(3.3)
    return model


def _images() -> list[Image.Image]:
    """Smooth RGB images of several shapes; for each, our and HF's center crops start at the same pixel."""
    images = []
    for height, width in [(40, 50), (64, 64), (100, 37), (45, 32), (120, 90)]:
        y, x = np.mgrid[0:height, 0:width]
        channels = [127 + 120 * np.sin(x / 5 + c) * np.cos(y / 7 - c) for c in range(3)]
        images.append(Image.fromarray(np.stack(channels, -1).astype(np.uint8)))
    return images


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 5 returns a model output


def _hf_processor(path, backend: str):
    import transformers
    from transformers import CLIPProcessor

    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x: PIL is the default (slow) image processor
        return CLIPProcessor.from_pretrained(path, use_fast=backend == "torchvision")
    return CLIPProcessor.from_pretrained(path, backend=backend)


def _levels(pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels -> 8-bit levels (undoing the division by std)."""
    return pixels * torch.tensor(OPENAI_STD)[:, None, None] * 255


@pytest.mark.parametrize(("activation", "context_length"), [("quick_gelu", 77), ("gelu", 24)])
def test_hf_export_gives_our_embeddings_in_transformers(tmp_path, activation, context_length):
    from transformers import CLIPModel

    model = _trained_looking("tiny-vit", activation=activation, context_length=context_length)
    path = clip.export_model(model, tmp_path / "hf", format="hf")
    hf = CLIPModel.from_pretrained(path).eval()
    processor = _hf_processor(path, backend="pil")
    tokenizer = clip.get_tokenizer(model.config.text)
    images = _images()

    ours_ids = tokenizer(CAPTIONS)
    for caption, row in zip(CAPTIONS, ours_ids.tolist()):  # equal up to the padding (HF pads with end-of-text)
        assert processor.tokenizer(caption)["input_ids"] == row[: row.index(tokenizer.eot_token_id) + 1], caption
    # Documented differences: transformers skips OpenAI's HTML unescaping and matches special-token strings.
    for caption, hf_length in [("fish &amp; chips", 7), ("a <|endoftext|> b", 5)]:
        row = tokenizer([caption])[0].tolist()
        hf_ids = processor.tokenizer(caption)["input_ids"]
        assert len(hf_ids) == hf_length and hf_ids != row[: row.index(tokenizer.eot_token_id) + 1], caption
    inputs = processor(text=CAPTIONS, images=images, padding="max_length", max_length=context_length,
                       return_tensors="pt")  # fmt: skip
    ours_pixels = torch.stack([image_transform_eval(model.config.vision.image_size)(image) for image in images])
    torch.testing.assert_close(inputs["pixel_values"], ours_pixels, rtol=0, atol=1e-6)  # PIL's resize, as ours

    with torch.no_grad():
        ours_image, ours_text = model.encode_image(ours_pixels), model.encode_text(ours_ids)
        torch.testing.assert_close(_features(hf.get_image_features(pixel_values=inputs["pixel_values"])), ours_image,
                                   rtol=0, atol=1e-5)  # fmt: skip
        hf_text = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        torch.testing.assert_close(_features(hf_text), ours_text, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(**inputs).logits_per_image, model(ours_pixels, ours_ids)[0], rtol=0, atol=1e-4)
        # The same weights with the other activation are another function: the comparison can fail.
        other_cfg = copy.deepcopy(model.config)
        other_cfg.activation = "gelu" if activation == "quick_gelu" else "quick_gelu"
        other = CLIP(other_cfg).eval()
        other.load_state_dict(model.state_dict())
        assert not torch.allclose(_features(hf_text), other.encode_text(ours_ids), rtol=0, atol=1e-5)


def test_hf_image_processor_pixels_match_ours_within_a_level_or_a_one_pixel_crop_shift(tmp_path):
    model = clip.create_model("tiny-vit")
    path = clip.export_model(model, tmp_path / "hf", format="hf")
    ours = image_transform_eval(32)
    # The torchvision backend (transformers 5's default) resizes tensors, not PIL images: a level apart.
    default = _hf_processor(path, backend="torchvision")
    for image in _images():
        theirs = default(images=[image], return_tensors="pt")["pixel_values"][0]
        assert _levels(theirs - ours(image)).abs().max() <= 1.01
    # Odd crop margins: torchvision rounds half the margin to even (13.5 -> 14), transformers floors it (13).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 61, 3), dtype=np.uint8))  # -> 32 x 59
    theirs = _hf_processor(path, backend="pil")(images=[image], return_tensors="pt")["pixel_values"][0]
    assert not torch.allclose(theirs, ours(image), atol=1e-2)
    torch.testing.assert_close(theirs[..., 1:], ours(image)[..., :-1], rtol=0, atol=1e-6)


def test_hf_export_reads_back_bit_exact(tmp_path):
    model = _trained_looking("tiny-vit", activation="quick_gelu")
    path = clip.export_model(model, tmp_path / "hf", format="hf")
    config = json.loads((path / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == "quick_gelu"
    loaded = clip.create_model(pretrained=path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert not clip.models.export.config_differences(loaded.config, model.config)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tiny-vit", {"activation": "quick_gelu", "init_logit_bias": -10.0}), ("tiny-resnet", {}), ("tiny-timm", {})],
)
def test_open_clip_export_loads_in_open_clip_with_our_embeddings(tmp_path, name, overrides):
    import open_clip

    model = _trained_looking(name, **overrides)
    path = clip.export_model(model, tmp_path / "open_clip", format="open_clip")
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    reference.eval()
    ids = open_clip.get_tokenizer(f"local-dir:{path}")(CAPTIONS)
    assert torch.equal(ids, clip.get_tokenizer(model.config.text)(CAPTIONS))
    ours_preprocess = image_transform_eval(model.config.vision.image_size)
    pixels = torch.stack([preprocess(image) for image in _images()])
    torch.testing.assert_close(pixels, torch.stack([ours_preprocess(image) for image in _images()]), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reference.encode_image(pixels), model.encode_image(pixels), rtol=0, atol=1e-5)
        torch.testing.assert_close(reference.encode_text(ids), model.encode_text(ids), rtol=0, atol=1e-5)
    assert reference.logit_scale.item() == model.logit_scale.item()
    if model.logit_bias is not None:
        assert reference.logit_bias.item() == model.logit_bias.item()


def _custom_tokenizer_model(tmp_path) -> CLIP:
    cfg: ModelConfig = get_model_config("tiny-vit")
    cfg.text.tokenizer = str(tmp_path / "tokenizer.json")  # never read: the refusal comes first
    return CLIP(cfg)


@pytest.mark.parametrize(
    ("build", "format", "reason"),
    [
        (lambda tmp: clip.create_model("tiny-resnet"), "hf", r"vision.kind='resnet'.*ViT image tower only"),
        (lambda tmp: clip.create_model("tiny-timm"), "hf", r"vision.kind='timm'.*ViT image tower only"),
        (lambda tmp: clip.create_model("tiny-vit", init_logit_bias=-10.0), "hf", "no logit bias"),
        (_custom_tokenizer_model, "hf", "tokenizer=.*custom vocabulary.*format='clip'"),
        (_custom_tokenizer_model, "open_clip", "tokenizer=.*custom vocabulary.*format='clip'"),
        (lambda tmp: clip.create_model("tiny-vit"), "onnx", "unknown export format 'onnx'"),
    ],
)
def test_export_refuses_what_a_format_cannot_hold_before_writing(tmp_path, build, format, reason):
    with pytest.raises(ValueError, match=reason):
        clip.export_model(build(tmp_path), tmp_path / "out", format=format)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_directory_exports_never_mix_with_existing_files(tmp_path):
    model = clip.create_model("tiny-vit")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="used exists and is not an empty directory"):
        clip.export_model(model, tmp_path / "used", format="hf")
    (tmp_path / "empty").mkdir()
    assert (clip.export_model(model, tmp_path / "empty", format="open_clip") / "open_clip_config.json").is_file()
    with pytest.raises(ValueError, match="metadata= is stored by format='clip' only"):
        clip.export_model(model, tmp_path / "new", format="hf", metadata={"run": "x"})
