"""forward_backward: accumulated (GradCache) and distributed gradients equal the global batch's.

The reference is one process that computes the features of the whole global batch with grad,
one loss on all of them, and one backward: the un-accumulated step. With patch dropout the
reference computes the features in the same micro-batches, from the same random state, as each
rank does, so that both draw the same dropout masks (a single forward over the whole batch would
draw different ones); `test_accumulation_equals_one_forward_of_the_batch` compares with a literal
single forward where no randomness is involved.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import clip.loss
import clip.objective
from clip.config import DistConfig, LossConfig
from clip.loss import build_loss
from clip.models import CLIP, get_model_config
from clip.objective import ContrastiveModel, forward_backward
from clip.parallelize import apply_data_parallel
from tests.multiprocess import run_on_ranks
from tests.test_loss import _gather_without_grad, max_relative_error

GLOBAL_BATCH, TEXT_LENGTH = 16, 8
RANK_SEED = 1000  # rank r draws its dropout masks from seed RANK_SEED + r


def build_model(loss_name: str = "clip", model_name: str = "tiny-vit", patch_dropout: float = 0.5,
                dtype: torch.dtype = torch.float64) -> ContrastiveModel:
    cfg = get_model_config(model_name)
    if cfg.vision.kind == "vit":
        cfg.vision.patch_dropout = patch_dropout
    if loss_name == "siglip":  # the SigLIP paper's initial temperature and bias
        cfg.init_logit_scale, cfg.init_logit_bias = math.log(10), -10.0
    torch.manual_seed(0)
    return ContrastiveModel(CLIP(cfg)).to(dtype)


def make_batch(model: ContrastiveModel, size: int = GLOBAL_BATCH, seed: int = 0):
    """Random images and token ids, each caption ending at a random end-of-text position."""
    cfg = model.model.config
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, cfg.vision.image_size, cfg.vision.image_size, generator=generator)
    texts = torch.randint(0, cfg.text.eot_token_id, (size, TEXT_LENGTH), generator=generator)
    texts[torch.arange(size), torch.randint(1, TEXT_LENGTH, (size,), generator=generator)] = cfg.text.eot_token_id
    return images.to(model.model.dtype), texts


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_step(model, images, texts, loss_fn, world_size: int, num_microbatches: int) -> dict:
    """The un-accumulated global-batch step, drawing the dropout masks each rank would draw."""
    image_features, text_features = [], []
    for rank, (rank_images, rank_texts) in enumerate(zip(images.chunk(world_size), texts.chunk(world_size))):
        torch.manual_seed(RANK_SEED + rank)
        for image_chunk, text_chunk in zip(rank_images.chunk(num_microbatches), rank_texts.chunk(num_microbatches)):
            image_chunk_features, text_chunk_features, logit_scale, logit_bias = model(image_chunk, text_chunk)
            image_features.append(image_chunk_features)
            text_features.append(text_chunk_features)
    loss = loss_fn(torch.cat(image_features), torch.cat(text_features), logit_scale, logit_bias)
    loss.backward()
    return {"loss": loss.detach(), "grads": gradients(model)}


def assert_same_step(actual: dict, expected: dict, tolerance: float, label: str) -> None:
    assert actual["grads"].keys() == expected["grads"].keys(), label
    assert "model.logit_scale" in expected["grads"]
    error = max_relative_error(actual["loss"], expected["loss"])
    assert error <= tolerance, f"{label}: loss relative error {error:.2e}"
    for name, grad in expected["grads"].items():
        error = max_relative_error(actual["grads"][name], grad)
        assert error <= tolerance, f"{label}: d{name} relative error {error:.2e}"


# (loss name, chunk_size, num_microbatches): every loss and mode, K = 1, 2, 4.
SINGLE_PROCESS_CASES = [("clip", 0, 1), ("clip", 0, 2), ("clip", 0, 4), ("siglip", 0, 2), ("clip", 3, 4)]


@pytest.mark.parametrize("loss_name, chunk_size, num_microbatches", SINGLE_PROCESS_CASES)
def test_accumulation_equals_global_batch(loss_name, chunk_size, num_microbatches):
    model = build_model(loss_name)
    images, texts = make_batch(model)
    loss_fn = build_loss(LossConfig(loss_name, chunk_size))
    expected = reference_step(model, images, texts, loss_fn, 1, num_microbatches)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(RANK_SEED)
    loss = forward_backward(model, images, texts, loss_fn, num_microbatches)
    assert_same_step({"loss": loss, "grads": gradients(model)}, expected, 1e-12, "accumulated")
    if loss_name == "siglip":
        assert "model.logit_bias" in expected["grads"]


def test_accumulation_equals_one_forward_of_the_batch():
    model = build_model(patch_dropout=0.0)
    images, texts = make_batch(model)
    loss_fn = build_loss(LossConfig())
    loss = loss_fn(*model(images, texts))
    loss.backward()
    expected = {"loss": loss.detach(), "grads": gradients(model)}
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, images, texts, loss_fn, num_microbatches=4)
    assert_same_step({"loss": loss, "grads": gradients(model)}, expected, 1e-12, "accumulated")


@pytest.mark.parametrize("locked", ["image", "text"])
def test_accumulation_with_a_locked_tower_equals_one_forward_of_the_batch(locked):
    """LiT (lock_image / lock_text): the locked tower's features carry no gradient to backpropagate."""
    from clip.parallelize import apply_tower_lock

    model = build_model(patch_dropout=0.0)
    apply_tower_lock(model.model, lock_image=locked == "image", lock_text=locked == "text")
    images, texts = make_batch(model)
    loss_fn = build_loss(LossConfig())
    loss = loss_fn(*model(images, texts))
    loss.backward()
    expected = {"loss": loss.detach(), "grads": gradients(model)}
    locked_prefix = "model.visual" if locked == "image" else "model.transformer"
    assert not any(name.startswith(locked_prefix) for name in expected["grads"])
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, images, texts, loss_fn, num_microbatches=4)
    assert_same_step({"loss": loss, "grads": gradients(model)}, expected, 1e-12, f"{locked} locked")


def test_accumulation_without_rng_replay_is_wrong(monkeypatch):
    """Teeth: if pass 2 drew new patch-dropout masks, the gradients would not be the batch's."""
    model = build_model()
    images, texts = make_batch(model)
    loss_fn = build_loss(LossConfig())
    expected = reference_step(model, images, texts, loss_fn, 1, 2)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(clip.objective, "_set_rng_state", lambda state, device: None)
    torch.manual_seed(RANK_SEED)
    forward_backward(model, images, texts, loss_fn, num_microbatches=2)
    errors = [max_relative_error(gradients(model)[name], grad) for name, grad in expected["grads"].items()]
    assert max(errors) > 1e-3


@pytest.mark.parametrize("restore_statistics", [True, False])
def test_batchnorm_statistics_updated_once_per_microbatch(monkeypatch, restore_statistics):
    """ResNet: BatchNorm normalises per micro-batch; running statistics see each micro-batch once."""
    if not restore_statistics:  # teeth: without the restore, pass 1 updates them a second time
        monkeypatch.setattr(clip.objective, "_restored_batchnorm_statistics", lambda model: contextlib.nullcontext())
    model = build_model(model_name="tiny-resnet")
    images, texts = make_batch(model, size=8)
    loss_fn = build_loss(LossConfig())
    expected_model = build_model(model_name="tiny-resnet")
    expected = reference_step(expected_model, images, texts, loss_fn, 1, 2)
    forward_backward(model, images, texts, loss_fn, num_microbatches=2)
    assert_same_step({"loss": expected["loss"], "grads": gradients(model)}, expected, 1e-12, "resnet")
    expected_buffers = dict(expected_model.named_buffers())
    for name, buffer in model.named_buffers():
        if not restore_statistics and name.endswith("num_batches_tracked"):
            assert buffer.item() == 4
        elif restore_statistics:
            assert torch.allclose(buffer, expected_buffers[name], rtol=1e-12, atol=0), name


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_grad_scaler_scales_every_gradient(num_microbatches):
    """fp16's loss scaling: a power-of-two scale multiplies every gradient exactly."""
    model = build_model("siglip")
    images, texts = make_batch(model)
    loss_fn = build_loss(LossConfig("siglip"))
    torch.manual_seed(RANK_SEED)
    forward_backward(model, images, texts, loss_fn, num_microbatches)
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(RANK_SEED)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    forward_backward(model, images, texts, loss_fn, num_microbatches, grad_scaler=scaler)
    for name, grad in gradients(model).items():
        assert torch.equal(grad, expected[name] * 2.0**10), name


def test_contrastive_model_outputs():
    model = build_model("siglip")
    images, texts = make_batch(model, size=4)
    image_features, text_features, logit_scale, logit_bias = model(images, texts)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert logit_scale.item() == pytest.approx(10.0) and logit_scale.requires_grad
    assert logit_bias is model.model.logit_bias


def test_rejects_indivisible_batch():
    model = build_model()
    images, texts = make_batch(model, size=6)
    with pytest.raises(ValueError, match="num_microbatches=4 .* local batch size 6"):
        forward_backward(model, images, texts, build_loss(LossConfig()), num_microbatches=4)


# Under DDP on 2 ranks: (label, loss name, chunk_size, num_microbatches, dtype). Several steps
# per DDP model, so a parameter missing from a synchronised backward would fail the next step.
DDP_CASES = [
    ("clip-k1", "clip", 0, 1, torch.float64),
    ("clip-k2", "clip", 0, 2, torch.float64),
    ("clip-k4", "clip", 0, 4, torch.float64),
    ("clip-chunked-k2", "clip", 5, 2, torch.float64),
    ("siglip-k1", "siglip", 0, 1, torch.float64),
    ("siglip-k2", "siglip", 0, 2, torch.float64),
    ("clip-k1-fp32", "clip", 0, 1, torch.float32),
    ("clip-k2-fp32", "clip", 0, 2, torch.float32),
]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _ddp_steps() -> dict:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    models = {}
    results = {}

    def step(label, loss_name, chunk_size, num_microbatches, dtype):
        if (loss_name, dtype) not in models:
            models[loss_name, dtype] = DistributedDataParallel(build_model(loss_name, dtype=dtype))
        model = models[loss_name, dtype]
        images, texts = make_batch(model.module)
        local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(RANK_SEED + rank)
        loss = forward_backward(model, images[local], texts[local], build_loss(LossConfig(loss_name, chunk_size)),
                                num_microbatches)
        # After DDP every rank holds the same averaged gradients: rank 0's are enough.
        results[label] = {"loss": loss, "grads": gradients(model.module) if rank == 0 else {}}

    for case in DDP_CASES:
        step(*case)
    clip.loss.all_gather_with_grad = _gather_without_grad
    step("clip-no-grad-gather", "clip", 0, 1, torch.float64)
    return results


def test_ddp_accumulation_equals_global_batch():
    """Exact distributed gradients with accumulation: 2 ranks x K micro-batches under DDP = one process, one batch."""
    world_size = 2
    per_rank = run_on_ranks(_ddp_steps, world_size)

    def actual(label):
        return {"loss": sum(r[label]["loss"] for r in per_rank) / world_size, "grads": per_rank[0][label]["grads"]}

    for label, loss_name, chunk_size, num_microbatches, dtype in DDP_CASES:
        model = build_model(loss_name, dtype=dtype)
        images, texts = make_batch(model)
        loss_fn = build_loss(LossConfig(loss_name, chunk_size))
        expected = reference_step(model, images, texts, loss_fn, world_size, num_microbatches)
        assert_same_step(actual(label), expected, TOLERANCE[dtype], label)

    # Teeth: the same check fails when the all-gather carries no gradient.
    model = build_model()
    images, texts = make_batch(model)
    expected = reference_step(model, images, texts, build_loss(LossConfig()), world_size, 1)
    wrong = actual("clip-no-grad-gather")
    errors = [max_relative_error(wrong["grads"][name], grad) for name, grad in expected["grads"].items()]
    assert max(errors) > 0.1


def _fsdp2_steps(num_microbatches: int) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # The trainer's wrapping: every residual block sharded, then the rest; the 0-dim logit_scale
    # (which fully_shard refuses) replicated, its gradient averaged by a hook.
    model = apply_data_parallel(build_model(), DistConfig(parallel="fsdp"), torch.device("cpu"))
    images, texts = make_batch(build_model())
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    steps = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(RANK_SEED + rank)
        loss = forward_backward(model, images[local], texts[local], build_loss(LossConfig()), num_microbatches)
        grads = {
            name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for name, p in model.named_parameters()
            if p.grad is not None
        }
        steps.append({"loss": loss, "grads": grads if rank == 0 else {}})
    return steps


def test_fsdp2_accumulation_equals_global_batch():
    """The FSDP2 path (gradient sync only on the last micro-batch): 2 ranks, K = 2, two steps."""
    world_size, num_microbatches = 2, 2
    per_rank = run_on_ranks(_fsdp2_steps, world_size, args=(num_microbatches,))
    model = build_model()
    images, texts = make_batch(model)
    expected = reference_step(model, images, texts, build_loss(LossConfig()), world_size, num_microbatches)
    for step in range(2):
        actual = {"loss": sum(r[step]["loss"] for r in per_rank) / world_size, "grads": per_rank[0][step]["grads"]}
        assert_same_step(actual, expected, 1e-12, f"FSDP2 step {step}")
