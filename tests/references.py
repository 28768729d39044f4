"""Reference models for parity tests: OpenCLIP and Hugging Face CLIPs built to match our configs.

Test-only: the library never imports open_clip or transformers.
"""

from __future__ import annotations

import warnings

import torch

from clip.config import ModelConfig


def openclip_model_cfg(cfg: ModelConfig) -> dict:
    """OpenCLIP's `model_cfg` (as in its open_clip_config.json files) for the architecture of `cfg`."""
    v, t = cfg.vision, cfg.text
    if v.kind == "vit":
        vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                      head_width=v.head_width, mlp_ratio=v.mlp_ratio)  # fmt: skip
    elif v.kind == "resnet":
        vision = dict(image_size=v.image_size, layers=tuple(v.stage_blocks), width=v.width, head_width=v.head_width)
    else:  # timm: the trunk's own pooling (timm_pool='') and a bias-free linear projection, like ours
        vision = dict(image_size=v.image_size, timm_model_name=v.timm_model, timm_pool="", timm_proj="linear")
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                layers=t.layers, mlp_ratio=t.mlp_ratio)  # fmt: skip
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text,
            "quick_gelu": cfg.activation == "quick_gelu"}  # fmt: skip


def build_openclip(cfg: ModelConfig):
    """An OpenCLIP `CLIP` with the same architecture as `cfg` (random init)."""
    import open_clip

    return open_clip.model.CLIP(**openclip_model_cfg(cfg))


def build_hf_clip(hidden_act="quick_gelu", eos_token_id=2, vocab_size=1000):
    """A small random transformers `CLIPModel` (ViT 32px / 8px patches, 24-token text), norms randomised."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=24,
        hidden_act=hidden_act,
        eos_token_id=eos_token_id,
    )
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act=hidden_act)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    randomize_norms(model)
    return model


def randomize_norms(model: torch.nn.Module) -> None:
    """Non-trivial LayerNorm/BatchNorm parameters and statistics, so that parity tests see them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(1 + 0.1 * torch.rand(module.running_var.shape, generator=generator))


def sample_inputs(cfg: ModelConfig, eot_token_id: int = 49407, num_images: int = 3, num_texts: int = 4):
    """Random images and token rows whose end-of-text tokens sit at different positions."""
    generator = torch.Generator().manual_seed(2)
    size = cfg.vision.image_size
    images = torch.randn(num_images, 3, size, size, generator=generator)
    text = torch.randint(1, min(eot_token_id, 1000), (num_texts, cfg.text.context_length), generator=generator)
    for row in range(num_texts):
        text[row, 3 + 4 * row] = eot_token_id
        text[row, 4 + 4 * row :] = 0
    return images, text


def assert_same_outputs(ours, reference, images, text, rtol: float = 1e-4) -> None:
    """encode_image, encode_text and logits equal to `rtol` relative error (max-norm)."""
    with torch.no_grad():
        pairs = {
            "encode_image": (ours.encode_image(images), reference.encode_image(images)),
            "encode_text": (ours.encode_text(text), reference.encode_text(text)),
            "logits": (ours(images, text)[0], _reference_logits(reference, images, text)),
        }
    for what, (got, expected) in pairs.items():
        error = (got - expected).abs().max() / expected.abs().max()
        assert error < rtol, f"{what}: relative error {error:.2e}"


def _reference_logits(reference, images, text):
    out = reference(images, text)
    if isinstance(out, dict):  # OpenCLIP with output_dict
        return out["logit_scale"] * out["image_features"] @ out["text_features"].t()
    image_features, text_features, logit_scale = out[:3]
    return logit_scale * image_features @ text_features.t()


def write_openai_archive(path, name: str = "tiny-vit", **overrides):
    """Like OpenAI's releases: a traced CLIP in fp16 with their scalar `input_resolution`... buffers.
    Returns the fp32 model it was traced from."""
    import clip

    model = clip.create_model(name, **overrides).eval()
    del model.context_length, model.vocab_size  # they become buffers, as in OpenAI's archives
    size = model.config.vision.image_size
    for key, value in [("input_resolution", size), ("context_length", 77), ("vocab_size", 49408)]:
        model.register_buffer(key, torch.tensor(value))
    images, text = torch.randn(2, 3, size, size), torch.randint(1, 1000, (2, 77))
    text[:, 5] = model.eot_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        traced = torch.jit.trace(model, (images, text)).half()
        traced.save(str(path))
    return model
