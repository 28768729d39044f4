"""Text packing (clip/models/text_packing.py) skips each caption's padding and changes nothing else.

The packed text tower's features and gradients equal the padded tower's (float64, to rounding) and
OpenCLIP's; whole training runs with and without packing follow the same trajectory; under
torch.compile the graph has no breaks, matches eager, and stops recompiling once lengths vary.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from clip.config import ConfigError, to_model_config
from clip.flops import flops_per_sample, training_flops_per_sample
from clip.loss import ClipLoss
from clip.models import CLIP, get_model_config
from clip.models.text_packing import get_text_lengths, pack_text
from clip.objective import ContrastiveModel, forward_backward, prepare_texts
from clip.train import train
from clip.train_metrics import MfuMeter
from tests.train_fixtures import load_model_state, read_metrics, tiny_train_config, use_memory_data

EOT = 49407


def _texts(lengths: list[int], context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """Token rows whose first end-of-text token ends a caption of each given length (0: no end-of-text
    token at all); random ids elsewhere, padding included, so that reading padding would show."""
    generator = torch.Generator().manual_seed(seed)
    texts = torch.randint(1, 40000, (len(lengths), context_length), generator=generator)
    for row, length in enumerate(lengths):
        if length:
            texts[row, length - 1] = EOT
            texts[row, length:] = torch.randint(0, EOT + 1, (context_length - length,), generator=generator)
    return texts


def _tiny_model(dtype=torch.float64, **text) -> CLIP:
    cfg = get_model_config("tiny-vit")
    for key, value in text.items():
        setattr(cfg.text, key, value)
    torch.manual_seed(0)
    return CLIP(cfg).to(dtype)


# Lengths with ties, one full row (77), one of length 1, one without an end-of-text token.
LENGTHS = [5, 77, 12, 1, 30, 12, 0, 64, 9, 33, 17, 2, 41]


def _shapes(packed) -> list[tuple[int, int]]:
    return [tuple(group.shape) for group in packed.groups]


def test_packing_sorts_splits_and_cuts_each_group_after_its_longest_caption():
    texts = _texts(LENGTHS)
    packed = pack_text(texts, EOT, num_groups=4)
    # sorted lengths: 1 1 (no end-of-text) 2 | 5 9 12 | 12 17 30 | 33 41 64 77, cut at multiples of 8
    assert _shapes(packed) == [(3, 8), (3, 16), (3, 32), (4, 77)]
    assert packed.num_tokens == 3 * 8 + 3 * 16 + 3 * 32 + 4 * 77
    lengths = get_text_lengths(texts, EOT)
    assert lengths[packed.order].tolist() == sorted(length or 1 for length in LENGTHS)
    for group, rows in zip(packed.groups, packed.order.split([3, 3, 3, 4])):
        assert torch.equal(group, texts[rows, : group.shape[1]])  # the rows themselves, cut
    assert _shapes(pack_text(texts, EOT, num_groups=1, multiple=16)) == [(13, 77)]
    assert _shapes(pack_text(_texts([16, 3, 8]), EOT, num_groups=3)) == [(1, 8), (1, 8), (1, 16)]  # multiples kept
    narrow = _texts([3, 5, 6], context_length=6)
    assert _shapes(pack_text(narrow, EOT, num_groups=8)) == [(1, 6)] * 3  # at most L; at most B groups
    assert get_text_lengths(_texts([4, 0]), EOT).tolist() == [4, 1]
    with pytest.raises(ValueError, match="num_groups=0"):
        pack_text(narrow, EOT, num_groups=0)


def test_prepared_texts_are_packed_per_microbatch_as_forward_backward_splits_them():
    texts = _texts(LENGTHS[:12])
    prepared = prepare_texts(texts, EOT, num_groups=2, num_microbatches=3, device=torch.device("cpu"))
    for packed, chunk in zip(prepared, texts.chunk(3), strict=True):
        expected = pack_text(chunk, EOT, 2)
        assert torch.equal(packed.order, expected.order)
        assert all(torch.equal(a, b) for a, b in zip(packed.groups, expected.groups, strict=True))
    assert torch.equal(prepare_texts(texts, EOT, num_groups=0, num_microbatches=3, device=torch.device("cpu")), texts)


@pytest.mark.parametrize("num_groups", [1, 4, 13, 20])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_features_and_gradients_equal_the_padded_towers(num_groups, checkpointing):
    model = _tiny_model()
    model.set_grad_checkpointing(checkpointing)
    texts = _texts(LENGTHS)
    weights = torch.randn(13, model.text_projection.shape[1], dtype=torch.float64)

    def features_and_gradients(text):
        model.zero_grad(set_to_none=True)
        features = model.encode_text(text, normalize=True)
        (features * weights).sum().backward()
        return features.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    padded, padded_grads = features_and_gradients(texts)
    packed, packed_grads = features_and_gradients(pack_text(texts, EOT, num_groups))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-13)
    assert packed_grads.keys() == padded_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-10, atol=1e-13, msg=name)


def test_packed_features_equal_openclips_padded_text_tower():
    from tests.references import build_openclip

    # float64, as the packed-versus-padded test: in float32 the two implementations' sums round
    # differently, by a CPU-dependent amount; in float64 by ~2e-15, 500 times inside 1e-12.
    cfg = get_model_config("tiny-vit")
    ours = _tiny_model()
    theirs = build_openclip(cfg).double()
    theirs.load_state_dict(ours.state_dict())
    texts = _texts([length for length in LENGTHS if length])  # OpenCLIP pools the largest id: needs an end-of-text
    with torch.no_grad():
        expected = theirs.encode_text(texts)
        got = ours.encode_text(pack_text(texts, EOT, 4))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# aot_eager also traces the backward with symbolic lengths; inductor is what compile=true runs.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_compiled_packed_step_has_no_graph_break_matches_eager_and_stops_recompiling(num_microbatches, backend):
    model = ContrastiveModel(_tiny_model(torch.float32))
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def gradients(module, texts):
        module.zero_grad(set_to_none=True)
        packed = prepare_texts(texts, EOT, 3, num_microbatches, torch.device("cpu"))
        loss = forward_backward(module, images, packed, ClipLoss(), num_microbatches)
        return loss, {n: p.grad.clone() for n, p in module.named_parameters()}

    # First every group at the full context length (equal sizes, which torch.compile could tie
    # together or specialise on), then lengths that differ within and between batches.
    batches = [_texts([77] * 12)] + [_texts(LENGTHS[:12], seed=seed) for seed in range(2)]
    batches += [_texts([3 * i + seed for i in range(1, 13)], seed=seed) for seed in range(3)]  # new lengths
    eager = [gradients(model, texts) for texts in batches]
    counter = CompileCounterWithBackend(backend)
    model.compile(backend=counter, fullgraph=True)
    # inductor fuses and reorders float32 sums: its gradients differ from eager's by ~1e-6 relative.
    rtol, atol = (1e-5, 1e-6) if backend == "aot_eager" else (1e-4, 1e-5)
    for texts, (eager_loss, eager_grads) in zip(batches, eager):
        loss, grads = gradients(model, texts)
        torch.testing.assert_close(loss, eager_loss, rtol=rtol / 10, atol=0)
        for name in eager_grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=rtol, atol=atol, msg=name)
    # One graph for every batch, whatever its lengths (GradCache: one without gradient, one with).
    assert counter.frame_count == (2 if num_microbatches > 1 else 1), counter.frame_count


def test_training_with_packing_follows_the_padded_trajectory(tmp_path, monkeypatch):
    # Captions of varied lengths in the real run's batches, so that packing actually cuts.
    def run(name, groups):
        cfg = tiny_train_config(
            tmp_path / name, "max_steps=6", "micro_batch_size=8", "model.text.context_length=32",
            f"text_packing_groups={groups}",
        )  # fmt: skip
        use_memory_data(monkeypatch, context_length=32, varied_captions=True)
        train(cfg)
        computed = [e["train/text_positions_computed"] for e in read_metrics(tmp_path / name) if "train/loss" in e]
        return load_model_state(tmp_path / name / "checkpoints" / "step-6"), computed

    (padded, padded_computed), (packed, packed_computed) = run("padded", 0), run("packed", 4)
    assert padded_computed == [1.0] * 6
    assert all(0.5 < fraction < 0.9 for fraction in packed_computed), packed_computed  # lengths 2..32
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_executed_mfu_leaves_out_the_skipped_text_flops(tmp_path, monkeypatch):
    # MFU is logged on GPUs only; a made-up peak makes the trainer log it here.
    monkeypatch.setattr(MfuMeter, "for_device", lambda model_config, precision, global_batch, device: MfuMeter(
        training_flops_per_sample(model_config, global_batch=global_batch), 1e12))
    use_memory_data(monkeypatch, context_length=32, varied_captions=True)

    def logged(name, groups):  # in two micro-batches, each packed on its own
        train(tiny_train_config(tmp_path / name, "max_steps=3", "model.text.context_length=32", "micro_batch_size=8",
                                f"text_packing_groups={groups}"))  # fmt: skip
        return [e for e in read_metrics(tmp_path / name) if "train/mfu" in e]

    for event in logged("padded", 0):
        assert event["train/mfu_executed"] == event["train/mfu"]
    model_config = tiny_train_config(tmp_path, "model.text.context_length=32").model
    flops = flops_per_sample(to_model_config(model_config))
    for event in logged("packed", 4):
        # The skipped share of the text FLOPs is about the skipped share of its positions (a little
        # more: attention is quadratic in the length; a little less: the projection is per caption).
        skipped = 1 - event["train/mfu_executed"] / event["train/mfu"]
        positions_skipped = 1 - event["train/text_positions_computed"]
        assert 0 < skipped == pytest.approx(flops.text_flops / flops.forward_flops * positions_skipped, rel=0.1)


def test_negative_groups_is_a_config_error(tmp_path):
    from clip.config import validate_train_config

    with pytest.raises(ConfigError, match="text_packing_groups=-1"):
        validate_train_config(tiny_train_config(tmp_path, "text_packing_groups=-1"))


def _saved_bytes(model: CLIP, text) -> int:
    """Bytes that the text tower's forward keeps for backward (distinct storages, weights included)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.encode_text(text)
    return sum(storages.values())


def test_packing_keeps_no_more_for_backward_than_padding_even_when_every_caption_is_full():
    # The worst case for packing: every caption fills its row, so packing cuts nothing.
    model = _tiny_model(torch.float32)
    texts = _texts([77] * 16)
    assert _saved_bytes(model, pack_text(texts, EOT, 4)) <= _saved_bytes(model, texts)


def test_forward_backward_takes_one_packed_text_and_names_mismatched_rows():
    # float64: in float32 the packed and padded sums round differently, and a few of the 1.6M
    # gradient elements differed by 4e-6 on some CPUs (the kernels' summation order varies by CPU).
    model = ContrastiveModel(_tiny_model(torch.float64))
    images = torch.randn(12, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    texts = _texts(LENGTHS[:12])

    def gradients(packed, num_microbatches):
        model.zero_grad(set_to_none=True)
        forward_backward(model, images, packed, ClipLoss(), num_microbatches)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    # A bare PackedText is the one micro-batch (as ContrastiveModel takes it), not a TypeError.
    padded, single = gradients(texts, 1), gradients(pack_text(texts, EOT, 4), 1)
    for name in padded:
        torch.testing.assert_close(single[name], padded[name], rtol=1e-10, atol=1e-13, msg=name)
    # Packed micro-batches that do not match the images' split: said at once, before any forward.
    with pytest.raises(ValueError, match=r"\[4, 8\] text rows .* \[6, 6\]"):
        forward_backward(model, images, [pack_text(texts[:4], EOT, 2), pack_text(texts[4:], EOT, 2)], ClipLoss(), 2)
    with pytest.raises(ValueError, match=r"\[12\] text rows .* \[6, 6\]"):
        forward_backward(model, images, [pack_text(texts, EOT, 2)], ClipLoss(), 2)


def test_packing_an_empty_batch_or_one_row_is_a_clear_error():
    with pytest.raises(ValueError, match="empty batch"):
        pack_text(_texts([]), EOT, 4)
    with pytest.raises(ValueError, match=r"token rows \[B, L\], not a tensor of shape \(77,\)"):
        pack_text(_texts([5])[0], EOT, 4)


def test_text_packed_at_another_end_of_text_id_is_refused_not_pooled_wrongly():
    # Cut at the start token's id, every caption would be cut after one position and the tower would
    # pool the wrong one: silently wrong features. The id travels with the packed text instead.
    model = _tiny_model(torch.float32)
    texts = _texts(LENGTHS)
    with pytest.raises(ValueError, match="packed at end-of-text id 49406, but this model's is 49407"):
        model.encode_text(pack_text(texts, EOT - 1, 4))
    packed = pack_text(texts, EOT, 4)
    assert packed.to("cpu").eot_token_id == EOT  # kept by the copy to the device


def test_packed_text_on_another_device_than_the_model_is_named():
    model = _tiny_model(torch.float32)
    with pytest.raises(ValueError, match=r"packed text is on meta, the model on cpu: move it with packed.to\(device\)"):
        model.encode_text(pack_text(_texts(LENGTHS), EOT, 4).to("meta"))


def test_packed_rows_longer_than_the_context_length_are_a_clear_error():
    texts = _texts([80, 3], context_length=80)  # the model's context_length is 77
    with pytest.raises(ValueError, match="text has 80 tokens, more than the model's context_length=77"):
        _tiny_model(torch.float32).encode_text(pack_text(texts, EOT, 2))
