"""scripts/bench_train.py runs, and compares like with like: OpenCLIP's step trains the same network."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from clip.config import to_model_config
from clip.models.text_packing import get_text_lengths
from clip.step import StepOutcome
from tests.data_shards import make_shards

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


COMMON = ["--model", "tiny-vit", "--batch", "8", "--steps", "2", "--warmup", "2", "--threads", "1", "--device", "cpu"]


@pytest.mark.parametrize("captions", ["uniform", "web"])
def test_openclip_step_trains_the_same_network_on_the_same_batch(bench, capsys, captions):
    # Ours packs the captions (the trainer's default), OpenCLIP pads them: the same arithmetic.
    ours, theirs = bench.main([*COMMON, "--precision", "fp32", "--open-clip", "--caption-lengths", captions])
    # Same weights, batch and loss: the first losses agree to float32 rounding, and so do the second
    # ones, after one AdamW update with the same hyperparameters, clipping and decay groups. Bound:
    # each logit is scale (<= 100, here 14.3) x a cosine whose float32 error grows with the summation
    # lengths of the towers (~ sqrt(width x layers) x eps = ~1e-6 for tiny-vit), so the loss (~log 8)
    # moves by ~1e-5 relative at most; a real difference (a mask, a pooled position, a decay group)
    # moves it by more than 1e-3. AdamW's first step is sign-like (lr x m / sqrt(v)), so a gradient
    # entry near zero can flip its update: the second loss gets 10x more room.
    assert ours.warmup_losses[0] == pytest.approx(theirs.warmup_losses[0], rel=2e-5)
    assert ours.warmup_losses[1] == pytest.approx(theirs.warmup_losses[1], rel=2e-4)
    assert ours.warmup_losses[1] != pytest.approx(ours.warmup_losses[0], rel=1e-3)  # the update did change the model
    assert len(ours.seconds) == len(theirs.seconds) == 2 and all(t > 0 for t in ours.seconds + theirs.seconds)
    output = capsys.readouterr().out
    assert "step time ratio ours/OpenCLIP" in output and "text packing: our text tower computes" in output


def test_web_caption_lengths_look_like_alt_texts(bench):
    args = bench.argparse.Namespace(model="ViT-B-32", batch=4096, precision="fp32", compile=False,
                                    grad_checkpointing=False, text_packing_groups=8)  # fmt: skip
    cfg = bench.build_config(args)
    cfg.model.vision.image_size = 1  # only the captions matter here
    _, texts = bench.synthetic_batch(cfg, bench.torch.device("cpu"), "web")
    lengths = get_text_lengths(texts, cfg.model.text.eot_token_id).float()
    # scripts/bench_tokenizer.py's alt-texts: mean 21.4 tokens, median 17, 90th percentile 41.
    assert 20 < lengths.mean() < 23 and lengths.median() == 17 and 38 <= lengths.quantile(0.9) <= 44
    assert ((texts == cfg.model.text.eot_token_id).sum(dim=1) == 1).all()


def test_uniform_caption_lengths_span_6_to_the_context_length(bench):
    args = bench.argparse.Namespace(model="ViT-B-32", batch=4096, precision="fp32", compile=False,
                                    grad_checkpointing=False, text_packing_groups=8)  # fmt: skip
    cfg = bench.build_config(args)
    cfg.model.vision.image_size = 1
    _, texts = bench.synthetic_batch(cfg, bench.torch.device("cpu"))
    lengths = get_text_lengths(texts, cfg.model.text.eot_token_id)
    assert lengths.min() == 6 and lengths.max() == cfg.model.text.context_length


def test_our_step_packs_the_chosen_captions_reads_each_step_during_the_next_and_prints_its_flops(
    bench, capsys, monkeypatch
):
    torch = bench.torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from clip.models.text_packing import pack_text

    step_texts, reads = [], []  # what each train_step got; how many steps had started at each report
    real_forward_backward, real_report = bench.TrainStep.forward_backward, StepOutcome.report

    def forward_backward(step, images, texts):
        step_texts.append(texts)
        return real_forward_backward(step, images, texts)

    def report(outcome):
        reads.append(len(step_texts))
        return real_report(outcome)

    monkeypatch.setattr(bench.TrainStep, "forward_backward", forward_backward)
    monkeypatch.setattr(StepOutcome, "report", report)
    bench.main([*COMMON, "--precision", "fp32", "--caption-lengths", "web", "--text-packing-groups", "3"])
    args = bench.argparse.Namespace(model="tiny-vit", batch=8, precision="fp32", compile=False,
                                    grad_checkpointing=False, text_packing_groups=3)  # fmt: skip
    cfg = bench.build_config(args)
    images, texts = bench.synthetic_batch(cfg, torch.device("cpu"), "web")
    expected = pack_text(texts, cfg.model.text.eot_token_id, 3)
    for (packed,) in step_texts:  # one micro-batch, packed as the trainer packs it
        assert torch.equal(packed.order, expected.order)
        assert all(torch.equal(a, b) for a, b in zip(packed.groups, expected.groups, strict=True))
    assert reads == list(range(2, len(step_texts) + 1))  # as in the trainer: step k is read during step k + 1
    # The executed share of the model FLOPs, against FlopCounterMode on the packed and padded forwards
    # (the math SDPA backend decomposes attention into products that it counts; the CPU flash kernel not).
    model = bench.CLIP(to_model_config(cfg.model))

    def counted(text) -> int:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(images, text)
        return counter.get_total_flops()

    out = capsys.readouterr().out
    assert f"computes {expected.num_tokens} of the {texts.numel()} padded positions" in out
    share = float(re.search(r"hardware MFU is MFU x (\d\.\d+)", out).group(1))
    assert share == pytest.approx(counted(expected) / counted(texts), abs=1e-3) and share < 0.9


def test_real_shards_report_the_data_wait_share(bench, tmp_path, capsys):
    make_shards(str(tmp_path), num_shards=2, per_shard=16)
    (result,) = bench.main([*COMMON, "--precision", "bf16", "--shards", str(tmp_path / "shard-{000..001}.tar"),
                            "--workers", "0"])  # fmt: skip
    assert 0.0 < result.data_wait < 1.0 and math.isfinite(result.first_loss)
    assert "real shards" in capsys.readouterr().out


def test_profile_adds_up_the_step_by_category_and_writes_a_trace(bench, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    (ours,) = bench.main([*COMMON, "--precision", "fp32", "--steps", "1", "--warmup", "1", "--chain", "2",
                          "--profile", "--profile-trace", str(trace)])  # fmt: skip
    profile = ours.profile
    assert not profile.device and profile.busy is None  # CPU: operators' self time
    assert list(profile.categories) == list(bench.PROFILE_CATEGORIES)
    assert sum(profile.share(category) for category in profile.categories) == pytest.approx(1.0)
    assert profile.categories["matrix products"] > 0 and profile.categories["attention"] > 0
    assert profile.categories["optimizer (AdamW)"] > 0 and profile.categories["communication"] == 0
    # Self times do not overlap: one profiled thread (--threads 1) cannot add up to more than the
    # wall time of the same steps; and the operators are most of a step, not a sliver of it.
    assert 0.25 * profile.wall < profile.total <= 1.05 * profile.wall
    seconds = [row[2] for row in profile.top]
    assert len(profile.top) == bench.PROFILE_TOP and seconds == sorted(seconds, reverse=True)
    assert sum(seconds) <= profile.total
    for category in profile.categories:  # the listed rows are part of their category's time
        assert sum(row[2] for row in profile.top if row[1] == category) <= profile.categories[category] * (1 + 1e-9)
    assert {"aten::mm", "aten::addmm"} & {row[0] for row in profile.top}  # the products are among the costliest
    out = capsys.readouterr().out
    assert "operators' CPU self time per step" in out and "matrix products" in out
    assert json.loads(trace.read_text())["traceEvents"]  # a Chrome trace Perfetto opens


def test_profile_figures_are_per_step_whatever_the_chain(bench):
    args = bench.argparse.Namespace(model="tiny-vit", batch=8, precision="fp32", compile=False,
                                    grad_checkpointing=False, text_packing_groups=2)  # fmt: skip
    cfg = bench.build_config(args)
    ours = bench.OurStep(cfg, bench.torch.device("cpu"))
    images, texts = ours.prepare(*bench.synthetic_batch(cfg, ours.device))
    for _ in range(2):  # warm-up: AdamW's state
        ours(images, texts)
    one, three = (bench.profile_step(ours, images, texts, chain) for chain in (1, 3))
    calls = {name: calls for name, _, _, calls in three.top}
    common = [(name, count) for name, _, _, count in one.top if name in calls]
    assert len(common) >= 5 and all(calls[name] == count for name, count in common), (one.top, three.top)


def test_device_busy_time_counts_overlapping_and_nested_kernels_once(bench):
    def kernel(start, end):  # a profiler event's interval, in microseconds
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))

    # [0, 10] overlapped by [5, 15] (another stream) and holding [2, 4]; idle until [20, 25], which holds [21, 22].
    kernels = [kernel(5, 15), kernel(0, 10), kernel(2, 4), kernel(20, 25), kernel(21, 22)]
    assert bench.busy_seconds(kernels) == pytest.approx(20e-6)


def test_profile_counts_kernels_on_cuda_and_synchronous_operators_on_cpu(bench):
    from torch.autograd import DeviceType

    def event(name, device_type, is_user_annotation=False, is_async=False):
        return SimpleNamespace(key=name, device_type=device_type, is_user_annotation=is_user_annotation,
                               is_async=is_async)  # fmt: skip

    events = [event("aten::mm", DeviceType.CPU), event("sm90_xmma_gemm", DeviceType.CUDA),
              event("Optimizer.step#AdamW.step", DeviceType.CUDA, is_user_annotation=True),  # a range's device copy
              event("gloo:all_reduce", DeviceType.CPU, is_async=True)]  # fmt: skip
    assert [e.key for e in bench.counted_events(events, device=True)] == ["sm90_xmma_gemm"]
    assert [e.key for e in bench.counted_events(events, device=False)] == ["aten::mm"]


@pytest.mark.parametrize("name, category", [
    # CUDA kernel names as the H100 profile of a compiled ViT-B-16 step showed them
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", "matrix products"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matrix products"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("fmha_cutlassB_f32_aligned_64x64_k64_sm80", "attention"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention_view_3", "fused elementwise (torch.compile)"),
    ("triton_red_fused_native_layer_norm_7", "fused elementwise (torch.compile)"),
    ("triton_tem_fused_addmm_gelu_1", "matrix products"),
    ("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", "other elementwise, copies, reductions"),
    ("Memcpy HtoD (Pageable -> Device)", "other elementwise, copies, reductions"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer (AdamW)"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    # CPU events
    ("aten::linear", "matrix products"),
    ("aten::convolution_backward", "matrix products"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("## Call CompiledFxGraph fgcuiunhb6tx5wm6fh7a54h7yrkwi5v7 ##", "fused elementwise (torch.compile)"),
    ("aten::_fused_adamw_", "optimizer (AdamW)"),
    ("Optimizer.step#AdamW.step", "optimizer (AdamW)"),
    ("aten::linalg_vector_norm", "other elementwise, copies, reductions"),
    ("gloo:all_gather", "communication"),
    ("gloo:broadcast", "communication"),  # a gloo collective whose name holds no other pattern
    ("autograd::engine::evaluate_function: AddmmBackward0", "anything else"),
    ("ScaledDotProductFlashAttentionForCpuBackward0", "anything else"),  # the autograd node, not the kernel
])  # fmt: skip
def test_profile_categories_by_name(bench, name, category):
    assert bench.categorise(name) == category


def test_profile_refuses_real_shards(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main([*COMMON, "--profile", "--shards", "/nowhere/{0..1}.tar"])
    assert "--profile profiles our step on a synthetic batch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--text-packing-groups", "-1"], "--text-packing-groups >= 0"),
        (["--model", "ViT-B16"], "--model: unknown model 'ViT-B16'; registered models: "),
    ],
)
def test_bad_flags_are_named_before_anything_is_built(bench, capsys, flags, message):
    with pytest.raises(SystemExit):
        bench.main([*COMMON, *flags])
    assert message in capsys.readouterr().err
