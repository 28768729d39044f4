"""The trainer's fast path, proven on CPU where a GPU is not needed to prove it.

torch.compile of the towers traces without graph breaks and gives eager's gradients; channels_last
changes the ResNet's layout, not its result; every attention call of the registered architectures
meets the CUDA flash kernel's input conditions under bf16 autocast; the ViT residual stream stays in
bf16 under autocast; and a non-logging training step never reads the device: it reads host flags
and the previous step's numbers, once the next step is queued.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip.train as train_module
from clip.config import OptimConfig, to_model_config
from clip.loss import ClipLoss
from clip.models import CLIP, get_model_config
from clip.objective import ContrastiveModel, forward_backward
from clip.optim import build_optimizer
from clip.parallelize import build_train_module
from clip.step import StepOutcome, TrainStep
from clip.train import train
from tests.train_fixtures import tiny_train_config, use_memory_data

CLIP_PACKAGE = Path(train_module.__file__).resolve().parent


def _tiny(name: str, **vision):
    cfg = get_model_config(name)
    cfg.text.context_length = 8
    for key, value in vision.items():
        setattr(cfg.vision, key, value)
    return cfg


def _batch(cfg, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, cfg.vision.image_size, cfg.vision.image_size, generator=generator)
    texts = torch.randint(1, 1000, (size, cfg.text.context_length), generator=generator)
    texts[:, 5] = cfg.text.eot_token_id
    return images, texts


def _gradients(module, images, texts, num_microbatches: int = 1, seed: int = 5):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # patch dropout draws from the global generator
    loss = forward_backward(module, images, texts, ClipLoss(), num_microbatches=num_microbatches)
    return loss, {name: p.grad.clone() for name, p in module.named_parameters()}


def _assert_close_gradients(got: dict, expected: dict, rtol: float) -> None:
    assert got.keys() == expected.keys()
    # Some gradients are zero up to rounding (an attention key bias shifts every score equally), so
    # each is compared relative to its own size, but at least 1e-3 of the model's largest.
    floor = 1e-3 * max(g.abs().max() for g in expected.values())
    for name in expected:
        error = (got[name] - expected[name]).abs().max() / expected[name].abs().max().clamp_min(floor)
        assert error <= rtol, f"{name}: relative error {error:.2e}"


def _compiled_matches_eager(cfg, backend: str, num_microbatches: tuple[int, ...], rtol: float) -> None:
    torch.manual_seed(0)
    module = ContrastiveModel(CLIP(cfg))
    images, texts = _batch(cfg)
    eager = {k: _gradients(module, images, texts, k) for k in num_microbatches}
    # fullgraph=True: a graph break anywhere in either tower (or in the features' normalisation) fails.
    module.compile(backend=backend, fullgraph=True)
    for k in num_microbatches:
        loss, gradients = _gradients(module, images, texts, k)
        assert torch.allclose(loss, eager[k][0], rtol=rtol), (k, loss, eager[k][0])
        _assert_close_gradients(gradients, eager[k][1], rtol)


def test_compiled_vit_traces_in_one_graph_and_matches_eager_with_gradient_caching():
    # Patch dropout under GradCache: the compiled passes must replay the same random masks.
    _compiled_matches_eager(_tiny("tiny-vit", patch_dropout=0.5), "aot_eager", (1, 2), rtol=1e-6)


def test_compiled_resnet_traces_in_one_graph_and_matches_eager():
    _compiled_matches_eager(_tiny("tiny-resnet"), "aot_eager", (1,), rtol=1e-6)


@pytest.mark.slow  # inductor's first CPU compile of forward + backward takes about a minute on 2 cores
def test_inductor_compiled_vit_matches_eager_with_gradient_caching():
    # Inductor generates its own random numbers (philox, seeded from torch's generator, so a GradCache
    # replay that restores the generator gets the same masks) unless told to call torch.rand as eager
    # does: with that, compiled and eager drop the same patches and must agree.
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        _compiled_matches_eager(_tiny("tiny-vit", patch_dropout=0.5), "inductor", (1, 2), rtol=1e-4)


def test_train_module_applies_channels_last_to_resnets_only_and_compiles_on_request(tmp_path):
    resnet_cfg = tiny_train_config(tmp_path, "model=tiny-resnet")
    torch.manual_seed(0)
    reference = CLIP(to_model_config(resnet_cfg.model))
    model = CLIP(to_model_config(resnet_cfg.model))
    model.load_state_dict(reference.state_dict())
    module, image_format = build_train_module(resnet_cfg, model, torch.device("cpu"))
    assert image_format == torch.channels_last
    convolutions = [m.weight for m in model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert not any(w.is_contiguous() for w in convolutions if w.shape[-1] > 1)  # 1x1 kernels are both
    assert model.state_dict().keys() == reference.state_dict().keys()
    # The layout changes the kernels' summation order, not the result.
    images, texts = _batch(model.config)
    _, expected = _gradients(ContrastiveModel(reference), images, texts)
    _, got = _gradients(module, images.contiguous(memory_format=image_format), texts)
    _assert_close_gradients(got, expected, rtol=1e-4)
    assert module._compiled_call_impl is None  # compile unset: not on CPU

    vit_cfg = tiny_train_config(tmp_path, "compile=true")
    vit = CLIP(to_model_config(vit_cfg.model))
    module, image_format = build_train_module(vit_cfg, vit, torch.device("cpu"))
    assert image_format == torch.contiguous_format and vit.visual.conv1.weight.is_contiguous()
    assert module._compiled_call_impl is not None
    # Fused AdamW: one multi-tensor kernel, no host reads of the step counters.
    assert build_optimizer(vit, OptimConfig()).defaults["fused"] is True


# CUDA's flash kernel (FlashAttention-2) needs: fp16/bf16 inputs, no explicit mask (causal is a
# flag), no dropout, a head dimension that is a multiple of 8 and at most 256, and a contiguous last
# dimension. Each registered architecture's widths, cut to one block per tower.
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "RN50"])
def test_every_attention_call_meets_the_flash_kernels_conditions_under_bf16(name, monkeypatch):
    cfg = get_model_config(name)
    cfg.text.layers = 1
    if cfg.vision.kind == "vit":
        cfg.vision.layers = 1
    else:
        cfg.vision.stage_blocks = [1, 1, 1, 1]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((q.dtype, k.dtype, v.dtype, attn_mask, dropout_p, q.shape[-1], q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = CLIP(cfg)
    images, texts = _batch(cfg, size=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image(images)
        model.encode_text(texts)
    assert len(calls) == 2  # one per tower (a ResNet's is its attention pool)
    for q_dtype, k_dtype, v_dtype, mask, dropout, head_dim, *strides in calls:
        assert q_dtype == k_dtype == v_dtype == torch.bfloat16
        assert mask is None and dropout == 0.0
        assert head_dim % 8 == 0 and head_dim <= 256, head_dim
        assert strides == [1, 1, 1]


def test_the_vit_residual_stream_stays_in_the_autocast_dtype():
    # The image tower is most of a ViT step's elementwise traffic (ViT-B-16: 197 tokens x 768 per image
    # against 77 x 512 per caption). A float32 parameter added without a cast (positional embedding,
    # class token) would promote the whole residual stream to float32 under autocast and double the
    # bytes every residual add and LayerNorm moves. The text tower's stream is float32 under autocast,
    # as in OpenCLIP: the token embedding lookup is not an autocast op.
    cfg = _tiny("tiny-vit")
    model = CLIP(cfg)
    dtypes = []
    for block in model.visual.transformer.resblocks:
        block.register_forward_hook(lambda module, args, output: dtypes.append((args[0].dtype, output.dtype)))
    images, _ = _batch(cfg, size=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_image(images)
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * cfg.vision.layers


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


@pytest.mark.parametrize("setting", [[], ["precision=bf16"], ["micro_batch_size=4"], ["loss=siglip"]],
                         ids=["fp32", "bf16", "gradcache", "siglip"])
def test_the_host_reads_a_step_only_while_the_device_runs_the_next(tmp_path, monkeypatch, setting):
    """On a GPU each of these calls would wait for the device. In the steady state the host reads
    only host memory: the flags it exchanges, and a step's numbers once the next step is queued."""
    use_memory_data(monkeypatch)
    reads: Counter = Counter()
    steps = {"started": 0}
    reported_while: list[int] = []  # for each report, in order: how many steps had started

    def recorder(method_name):
        method = getattr(torch.Tensor, method_name)

        def record(tensor, *args, **kwargs):
            if 2 <= steps["started"] <= 4:  # steps 2-4 and their bookkeeping: none logs, checkpoints or evaluates
                frame = sys._getframe(1)
                while frame is not None and CLIP_PACKAGE not in Path(frame.f_code.co_filename).resolve().parents:
                    frame = frame.f_back
                if frame is not None:
                    reads[(Path(frame.f_code.co_filename).name, frame.f_code.co_name, method_name)] += 1
            return method(tensor, *args, **kwargs)

        return record

    real_forward_backward, real_report = TrainStep.forward_backward, StepOutcome.report

    def counted_forward_backward(*args, **kwargs):
        steps["started"] += 1
        return real_forward_backward(*args, **kwargs)

    def noted_report(outcome):
        reported_while.append(steps["started"])
        return real_report(outcome)

    monkeypatch.setattr(TrainStep, "forward_backward", counted_forward_backward)
    monkeypatch.setattr(StepOutcome, "report", noted_report)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recorder(name))
    train(tiny_train_config(tmp_path, "max_steps=6", "log.every_steps=100", "checkpoint.every_steps=0",
                            "checkpoint.export=false", *setting))  # fmt: skip
    assert steps["started"] == 6
    # Step k is read after step k+1 was queued; the last step (logged and saved) at once.
    assert reported_while == [2, 3, 4, 5, 6, 6]
    # In steps 2-4: the gathered host flags of the next step, the previous step's numbers, and the
    # caption lengths of the loader's batch (host memory, before its copy to the device) for packing.
    packing_reads = 3 * (4 if "micro_batch_size=4" in setting else 1)  # per micro-batch (16 / 4)
    assert reads == {("distributed.py", "exchange_host_flags", "tolist"): 3,
                     ("step.py", "report", "tolist"): 3,
                     ("text_packing.py", "pack_text", "tolist"): packing_reads}  # fmt: skip
