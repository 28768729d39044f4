"""Contrastive losses: parity with OpenCLIP on one process, and exactness across ranks.

"Exact across ranks": W ranks, each holding N / W pairs, give after DDP's
gradient averaging the loss and gradients of one process holding all N pairs. Without a model,
DDP's averaging is applied by hand: the mean of the ranks' losses and temperature/bias
gradients, and each rank's feature gradient divided by W (what DDP's 1/W does downstream).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import clip.loss
from clip.config import LossConfig, ModelConfig, validate_loss_config
from clip.loss import ClipLoss, SigLipLoss, build_loss
from tests.multiprocess import run_on_ranks

GLOBAL_BATCH, DIM = 16, 8
# name -> (loss, chunk_size); chunk 5 leaves a ragged last chunk of 1 column.
CASES = {
    "clip": ("clip", 0),
    "clip-chunked": ("clip", 5),
    "siglip": ("siglip", 0),
    "siglip-chunked": ("siglip", 5),
}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}  # max relative error


def make_inputs(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A global batch of matching pairs (text = image + noise), temperature and bias."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(GLOBAL_BATCH, DIM, generator=generator, dtype=torch.float64)
    text = image + 0.7 * torch.randn(GLOBAL_BATCH, DIM, generator=generator, dtype=torch.float64)
    return {
        "image": F.normalize(image, dim=-1).to(dtype),
        "text": F.normalize(text, dim=-1).to(dtype),
        "scale": torch.tensor(1 / 0.07, dtype=dtype),
        "bias": torch.tensor(-7.0, dtype=dtype),  # near SigLIP's -10 start, where the positives still count
    }


def loss_and_grads(loss_fn, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss and gradients with respect to features, temperature (and bias for SigLIP)."""
    leaves = {key: value.clone().requires_grad_() for key, value in inputs.items() if key != "bias" or name == "siglip"}
    loss = loss_fn(leaves["image"], leaves["text"], leaves["scale"], leaves.get("bias"))
    loss.backward()
    return {"loss": loss.detach(), **{key: leaf.grad for key, leaf in leaves.items()}}


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected| (an all-zero gradient must stay zero)."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual - expected).abs().max() / scale).item()


def _gather_without_grad(x: torch.Tensor) -> torch.Tensor:
    # The classic mistake: other ranks' features become constants, their gradients are lost.
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


def _rank_losses() -> dict[str, dict[str, torch.Tensor]]:
    """On each rank: every case on this rank's slice of the global batch, plus the wrong gather."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    results = {}
    for dtype in TOLERANCE:
        inputs = make_inputs(dtype)
        local = {**inputs, "image": inputs["image"][rows], "text": inputs["text"][rows]}
        for case, (name, chunk_size) in CASES.items():
            results[f"{case}/{dtype}"] = loss_and_grads(build_loss(LossConfig(name, chunk_size)), name, local)
        clip.loss.all_gather_with_grad = _gather_without_grad
        try:
            results[f"clip-no-grad-gather/{dtype}"] = loss_and_grads(ClipLoss(), "clip", local)
        finally:
            clip.loss.all_gather_with_grad = clip.distributed.all_gather_with_grad
    return results


def _average_like_ddp(rank_results: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    world_size = len(rank_results)
    averaged = {key: torch.stack([r[key] for r in rank_results]).mean(0) for key in ("loss", "scale", "bias")
                if key in rank_results[0]}
    for key in ("image", "text"):
        averaged[key] = torch.cat([r[key] for r in rank_results]) / world_size
    return averaged


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_loss_equals_global_batch(world_size):
    per_rank = run_on_ranks(_rank_losses, world_size)
    for dtype, tolerance in TOLERANCE.items():
        inputs = make_inputs(dtype)
        for case, (name, chunk_size) in CASES.items():
            expected = loss_and_grads(build_loss(LossConfig(name, chunk_size)), name, inputs)
            actual = _average_like_ddp([r[f"{case}/{dtype}"] for r in per_rank])
            assert actual.keys() == expected.keys()
            for key in expected:
                error = max_relative_error(actual[key], expected[key])
                assert error <= tolerance, f"{case} {dtype} W={world_size}: d{key} relative error {error:.2e}"

        # The check has teeth: gathering without gradient loses the other ranks' contributions.
        expected = loss_and_grads(ClipLoss(), "clip", inputs)
        wrong = _average_like_ddp([r[f"clip-no-grad-gather/{dtype}"] for r in per_rank])
        assert max_relative_error(wrong["loss"], expected["loss"]) <= tolerance  # same value...
        assert max_relative_error(wrong["image"], expected["image"]) > 0.1  # ...wrong gradient


@pytest.mark.parametrize("case", CASES)
def test_single_process_matches_open_clip(case):
    import open_clip.loss as open_clip_loss  # test-only reference (heavy import: only here)

    name, chunk_size = CASES[case]
    reference = {"clip": open_clip_loss.ClipLoss, "siglip": open_clip_loss.SigLipLoss}[name]()
    inputs = make_inputs(torch.float64)
    expected = loss_and_grads(reference, name, inputs)
    actual = loss_and_grads(build_loss(LossConfig(name, chunk_size)), name, inputs)
    for key in expected:
        assert max_relative_error(actual[key], expected[key]) <= 1e-12, key


@pytest.mark.parametrize("case", CASES)
def test_loss_is_float32_under_autocast(case):
    name, chunk_size = CASES[case]
    inputs = make_inputs(torch.float32)
    loss_fn = build_loss(LossConfig(name, chunk_size))
    bias = inputs["bias"] if name == "siglip" else None
    low = {key: inputs[key].bfloat16() for key in ("image", "text")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(low["image"], low["text"], inputs["scale"], bias)
    assert loss.dtype == torch.float32
    # Same as casting the bf16 features to float32 first: nothing in the loss ran in bf16.
    assert loss == loss_fn(low["image"].float(), low["text"].float(), inputs["scale"], bias)


def _peak_memory_mib(impl: str, local: int, global_: int) -> float:
    """scripts/bench_loss.py's measurement of one rank's loss, in this fresh process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_loss", Path(__file__).parents[1] / "scripts/bench_loss.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.run_one(impl, global_, local, DIM, 1024, "cpu", repeats=0, threads=1)["peak_mib"]


def test_chunked_mode_bounds_peak_memory():
    """Peak loss memory: a few [n, chunk] logits chunked, three [n, N] logits plain."""
    local, global_ = 256, 32768  # one [local, global] float32 logits matrix: 32 MiB
    peak = {impl: run_on_ranks(_peak_memory_mib, 1, args=(impl, local, global_), init_process_group=False)[0]
            for impl in ("chunked", "plain")}
    assert peak["chunked"] < 16, f"chunked loss grew peak memory by {peak['chunked']:.1f} MiB"
    assert peak["plain"] > 64, f"plain loss grew peak memory by only {peak['plain']:.1f} MiB"


def test_rejects_bad_input():
    inputs = make_inputs(torch.float32)
    image, text, scale, bias = inputs["image"], inputs["text"], inputs["scale"], inputs["bias"]
    with pytest.raises(ValueError, match="init_logit_bias"):
        ClipLoss()(image, text, scale, bias)
    with pytest.raises(ValueError, match="init_logit_bias"):
        SigLipLoss()(image, text, scale)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(image, text[:-1], scale)
    with pytest.raises(ValueError, match="chunk_size"):
        ClipLoss(chunk_size=-1)
    with pytest.raises(ValueError, match="loss.name='softmax'"):
        build_loss(LossConfig(name="softmax"))


@pytest.mark.parametrize("case", CASES)
def test_second_backward_is_refused(case):
    """The backward reuses the saved logits' memory, so a retained graph must not be reused."""
    name, chunk_size = CASES[case]
    leaves = {key: value.requires_grad_() for key, value in make_inputs(torch.float64).items()}
    loss = build_loss(LossConfig(name, chunk_size))(
        leaves["image"], leaves["text"], leaves["scale"], leaves["bias"] if name == "siglip" else None
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_validate_loss_config_names_keys():
    siglip_model = ModelConfig(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    validate_loss_config(LossConfig(), ModelConfig())
    validate_loss_config(LossConfig(name="siglip", chunk_size=1024), siglip_model)
    with pytest.raises(ValueError, match=r"loss.name='siglip' needs .* model.init_logit_bias"):
        validate_loss_config(LossConfig(name="siglip"), ModelConfig())
    with pytest.raises(ValueError, match=r"model.init_logit_bias=-10.0"):
        validate_loss_config(LossConfig(name="clip"), siglip_model)
    with pytest.raises(ValueError, match=r"loss.chunk_size=-2"):
        validate_loss_config(LossConfig(chunk_size=-2), ModelConfig())
    with pytest.raises(ValueError, match=r"loss.name='infonce'"):
        validate_loss_config(LossConfig(name="infonce"), ModelConfig())
