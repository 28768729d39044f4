import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clip.flops import (
    FLOPS_PER_MAC,
    flops_per_sample,
    get_device_kind,
    get_mfu,
    get_peak_flops,
    main,
    text_training_flops,
    training_flops_per_sample,
)
from clip.models import CLIP, get_model_config, list_models
from clip.models.text_packing import pack_text

# OpenCLIP's published forward GFLOPs per sample (image_gflops, text_gflops), from
# github.com/mlfoundations/open_clip docs/model_profile.csv (commit 3b37473b7178479e2494f60392442648ed262e8a),
# every row whose name is in our registry. They are made by src/training/profiler.py with
# torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add, matmuls, convolutions and
# attention products only, causal attention counted in full.
OPENCLIP_GFLOPS = {
    "RN50": (12.22, 5.96),
    "RN50-quickgelu": (12.22, 5.96),
    "RN101": (19.54, 5.96),
    "RN101-quickgelu": (19.54, 5.96),
    "RN50x4": (42.56, 9.27),
    "RN50x16": (149.39, 13.3),
    "RN50x64": (529.11, 23.55),
    "ViT-B-32": (8.82, 5.96),
    "ViT-B-32-quickgelu": (8.82, 5.96),
    "ViT-B-16": (35.13, 5.96),
    "ViT-B-16-quickgelu": (35.13, 5.96),
    "ViT-L-14": (162.03, 13.3),
    "ViT-L-14-quickgelu": (162.03, 13.3),
    "ViT-L-14-336": (381.92, 13.3),
    "ViT-H-14": (334.59, 47.09),
    "ViT-H-14-quickgelu": (334.59, 47.09),
    "ViT-g-14": (534.06, 47.09),
    "ViT-bigG-14": (967.5, 97.86),
}


def openclip_attention_pool_extra_macs(cfg) -> float:
    """OpenCLIP's ResNet attention pool projects queries and outputs at all 1 + G*G positions and keeps
    position 0; ours (like OpenAI's current code) computes position 0 only. Their table counts the rest."""
    channels, positions = 32 * cfg.vision.width, cfg.vision.grid_size**2 + 1
    others = positions - 1
    return others * channels * channels + others * channels * cfg.embed_dim + 2 * others * positions * channels


@pytest.mark.parametrize("name", sorted(OPENCLIP_GFLOPS))
def test_forward_flops_match_openclip_profile(name):
    cfg = get_model_config(name)
    flops = flops_per_sample(cfg)
    image_extra = FLOPS_PER_MAC * openclip_attention_pool_extra_macs(cfg) if cfg.vision.kind == "resnet" else 0.0
    image_gflops, text_gflops = OPENCLIP_GFLOPS[name]
    assert (flops.image_flops + image_extra) / 1e9 == pytest.approx(image_gflops, rel=0.01)
    assert flops.text_flops / 1e9 == pytest.approx(text_gflops, rel=0.01)
    # Within rounding of the table's 2 decimals, not merely within 1%.
    assert (flops.image_flops + image_extra) / 1e9 == pytest.approx(image_gflops, abs=0.006)
    assert flops.text_flops / 1e9 == pytest.approx(text_gflops, abs=0.006)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50x4", "ViT-B-32"])
def test_openclip_counted_live_equals_ours_plus_its_attention_pool(name):
    # The installed OpenCLIP, counted the way its profiler does, on the meta device: checks the
    # attention-pool adjustment above directly (importing open_clip takes several seconds).
    open_clip = pytest.importorskip("open_clip")
    cfg = get_model_config(name)
    batch = 2
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta").train()
        images, text = _inputs(cfg, batch)
    extra = openclip_attention_pool_extra_macs(cfg) if cfg.vision.kind == "resnet" else 0.0
    expected = flops_per_sample(cfg)
    assert _count_macs(lambda: model.encode_image(images)) / batch == expected.image_macs + extra
    assert _count_macs(lambda: model.encode_text(text)) / batch == expected.text_macs


def test_a_packed_caption_costs_the_flops_of_its_group_length():
    cfg = get_model_config("tiny-vit")
    model = CLIP(cfg)
    text = torch.ones(12, cfg.text.context_length, dtype=torch.long)
    text[torch.arange(12), torch.tensor([2, 5, 9, 3, 30, 76, 14, 7, 40, 1, 20, 11])] = cfg.text.eot_token_id
    packed = pack_text(text, cfg.text.eot_token_id, num_groups=4)
    assert len({group.shape[1] for group in packed.groups}) == 4  # four different lengths
    expected = sum(
        group.shape[0] * text_training_flops(cfg.text, cfg.embed_dim, group.shape[1]) for group in packed.groups
    )
    assert 3 * FLOPS_PER_MAC * _count_macs(lambda: model.encode_text(packed)) == expected
    padded = text_training_flops(cfg.text, cfg.embed_dim, cfg.text.context_length)
    assert padded == 3 * flops_per_sample(cfg).text_flops and expected < 12 * padded


def test_reference_table_names_are_registered():
    assert set(OPENCLIP_GFLOPS) <= set(list_models())


def _count_macs(fn) -> float:
    # The math SDPA backend decomposes attention into matmuls that FlopCounterMode counts (it does
    # not count the CPU flash kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / FLOPS_PER_MAC


def _inputs(cfg, batch, device=None):
    images = torch.ones(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    text = torch.ones(batch, cfg.text.context_length, dtype=torch.long, device=device)
    return images, text


@pytest.mark.parametrize(
    "name, num_layers, patch_dropout",
    [
        ("tiny-vit", 0, 0.0),
        ("tiny-resnet", 0, 0.0),
        ("ViT-B-32", 0, 0.0),  # full depth
        ("RN50x4", 0, 0.0),  # 288 px, a 9x9 final map
        ("ViT-H-14", 2, 0.0),  # head width 80
        ("ViT-g-14", 2, 0.0),  # fractional mlp_ratio
        ("ViT-B-16", 2, 0.5),  # FLIP patch dropout in training
    ],
)
def test_analytic_count_equals_flop_counter(name, num_layers, patch_dropout):
    # The real module code on the meta device (no memory, no compute); `num_layers` > 0 cuts both
    # towers to that depth to keep the test fast (the count is linear in depth).
    cfg = get_model_config(name)
    if num_layers:
        cfg.vision.layers = cfg.text.layers = num_layers
    cfg.vision.patch_dropout = patch_dropout
    training = patch_dropout > 0
    batch = 2
    with torch.device("meta"):
        model = CLIP(cfg).train(training)
        images, text = _inputs(cfg, batch)
    expected = flops_per_sample(cfg, global_batch=batch, training=training)
    assert _count_macs(lambda: model.encode_image(images)) / batch == pytest.approx(expected.image_macs, rel=1e-9)
    assert _count_macs(lambda: model.encode_text(text)) / batch == pytest.approx(expected.text_macs, rel=1e-9)
    assert _count_macs(lambda: model(images, text)) / batch == pytest.approx(expected.macs, rel=1e-9)


def test_analytic_count_equals_flop_counter_on_real_reduced_depth_model():
    # Real CPU tensors (not meta) at full width, cut to one block per tower to stay fast.
    cfg = get_model_config("ViT-B-32")
    cfg.vision.layers = cfg.text.layers = 1
    model = CLIP(cfg).eval()
    images, text = _inputs(cfg, batch=1)
    with torch.no_grad():
        counted = _count_macs(lambda: model(images, text))
    assert counted == pytest.approx(flops_per_sample(cfg, global_batch=1).macs, rel=1e-9)


def test_training_flops_are_three_forwards():
    cfg = get_model_config("ViT-B-16")
    batch = 2
    with torch.device("meta"):
        model = CLIP(cfg)
        images, text = _inputs(cfg, batch)

    def train_step():
        logits_per_image, logits_per_text = model(images, text)
        (logits_per_image.sum() + logits_per_text.sum()).backward()

    counted = FLOPS_PER_MAC * _count_macs(train_step) / batch
    # Backward skips the gradient of the image (the patch conv's input): the counted cost is a little
    # below 3 forwards, by 0.15% here.
    assert counted == pytest.approx(training_flops_per_sample(cfg, global_batch=batch), rel=0.005)
    assert counted < training_flops_per_sample(cfg, global_batch=batch)


def test_logits_cost_grows_with_global_batch():
    cfg = get_model_config("ViT-L-14")
    small, large = flops_per_sample(cfg), flops_per_sample(cfg, global_batch=32768)
    assert large.macs - small.macs == 32768 * cfg.embed_dim
    assert large.macs / small.macs - 1 < 5e-4  # negligible: 0.03% of the forward


def test_timm_tower_is_refused_with_the_key():
    with pytest.raises(ValueError, match="model.vision.kind='timm'"):
        flops_per_sample(get_model_config("tiny-timm"))


@pytest.mark.parametrize(
    "device_name, kind",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "h200"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("h100", "h100-sxm"),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_kind_from_cuda_device_name(device_name, kind):
    assert get_device_kind(device_name) == kind


def test_peak_flops_and_mfu():
    assert get_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert get_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert get_peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert get_peak_flops("cpu", "fp32") is None
    assert get_mfu(1000.0, 500e9, None) is None
    # 8 GPUs at 312 TFLOP/s each, 1,000 samples/s of 500 GFLOPs: 5e14 / 2.496e15.
    assert get_mfu(1000.0, 500e9, 312e12, num_devices=8) == pytest.approx(5e14 / 2.496e15)


def test_command_line_table_and_its_errors(capsys):
    """`python -m clip.flops`: one row per model asked for (OpenAI's names too); --help and an
    unknown name exit through argparse, naming the registered models, before any row is printed."""
    main(["ViT-B-32", "ViT-B/32"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[2] == "| ViT-B-32 | 8.82 | 5.96 | 14.78 | 44.33 |" and rows[3].startswith("| ViT-B/32 | 8.82 |")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m clip.flops" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["ViT-B-32", "ViT-X"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert "unknown model 'ViT-X'; registered models: RN101" in captured.err
