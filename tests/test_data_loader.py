"""The training loader: skip accounting, exact epochs across ranks and workers, resume."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import Counter

import pytest
import torch
from data_shards import (
    add_member,
    collect,
    data_config,
    loader_kwargs,
    make_shards,
    member_offsets,
    tiny_jpeg,
    truncate,
    write_shard,
    write_sizes,
)

from clip.data import DataError, build_train_loader
from clip.transforms import OPENAI_MEAN, OPENAI_STD, image_transform_eval, image_transform_train


def flat(batches):
    return [key for batch in batches for key in batch]


@pytest.fixture
def faulty_shards(tmp_path):
    """Corrupt data: A has 5 corrupt images; B is cut at a header boundary (the silent case), C mid-member;
    plus D, whose samples 7 and 8 have no caption."""
    keys = {name: [f"{name}-{i:03d}" for i in range(100)] for name in "ABCD"}
    for name in "ABC":
        corrupt = frozenset(keys["A"][i] for i in (3, 20, 41, 77, 99)) if name == "A" else frozenset()
        write_shard(str(tmp_path / f"{name}.tar"), keys[name], corrupt=corrupt)
    with tarfile.open(tmp_path / "D.tar", "w") as tar:
        for i, key in enumerate(keys["D"]):
            add_member(tar, f"{key}.jpg", tiny_jpeg(i))
            if i not in (7, 8):
                add_member(tar, f"{key}.txt", b"a caption")
    write_sizes(str(tmp_path), {f"{name}.tar": 100 for name in "ABCD"})
    members_b = member_offsets(str(tmp_path / "B.tar"))
    truncate(str(tmp_path / "B.tar"), members_b[2 * 60][1])  # before the header of sample 60's image
    members_c = member_offsets(str(tmp_path / "C.tar"))
    truncate(str(tmp_path / "C.tar"), members_c[2 * 30][2] + 10)  # inside sample 30's image
    return str(tmp_path), 95 + 60 + 30 + 98


def test_bad_data_is_skipped_counted_and_named(faulty_shards, caplog):
    directory, expected = faulty_shards
    cfg = data_config(f"{directory}/{{A,B,C,D}}.tar", num_workers=2)
    with caplog.at_level(logging.WARNING, logger="clip.data"):
        keys, _, skipped = collect(build_train_loader(cfg, **loader_kwargs(batch_size=1)))
    assert len(flat(keys)) == len(set(flat(keys))) == expected
    assert skipped == {"decode_error": 5, "truncated_shard": 2, "missing_field": 2}
    warnings = caplog.text
    assert "B.tar" in warnings and "C.tar" in warnings and "decode_error" in warnings and "D-007" in warnings


def test_skip_rate_above_the_limit_stops_naming_the_worst_shard(faulty_shards):
    directory, _ = faulty_shards
    cfg = data_config(f"{directory}/{{A,B,C,D}}.tar", max_skip_fraction=0.01)
    with pytest.raises(DataError, match=r"7 of 290 samples .* data\.max_skip_fraction=0\.01; worst shards: .*A\.tar \(5\)"):
        collect(build_train_loader(cfg, **loader_kwargs(batch_size=1)))


def test_all_bad_stream_raises_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr("clip.data.loader.SKIP_WINDOW_SAMPLES", 50)
    keys = [f"k{i}" for i in range(20)]
    write_shard(str(tmp_path / "bad.tar"), keys, corrupt=frozenset(keys))
    cfg = data_config(f"{tmp_path}/bad.tar", resampled=True, num_workers=1)
    with pytest.raises(DataError, match=r"more than data\.max_skip_fraction"):
        collect(build_train_loader(cfg, **loader_kwargs()), limit=10)


def run_epoch_on_ranks(cfg, world_size, batch_size, epochs=1):
    """Each rank's batches, epoch by epoch; ranks are simply instantiated (no process group needed)."""
    loaders = [
        build_train_loader(cfg, **loader_kwargs(batch_size=batch_size, rank=rank, world_size=world_size))
        for rank in range(world_size)
    ]
    return [[collect(loader)[0] for _ in range(epochs)] for loader in loaders], loaders


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    make_shards(str(tmp_path), 8, 25)
    all_keys = [f"shard-{i:03d}-{j:04d}" for i in range(8) for j in range(25)]
    cfg = data_config(f"{tmp_path}/shard-{{000..007}}.tar", num_workers=2)
    per_rank, loaders = run_epoch_on_ranks(cfg, world_size=2, batch_size=5, epochs=2)
    assert [loader.steps_per_epoch for loader in loaders] == [20, 20]
    for epoch in range(2):
        assert [len(rank[epoch]) for rank in per_rank] == [20, 20]  # lockstep: the same number of steps
        seen = Counter(flat(per_rank[0][epoch]) + flat(per_rank[1][epoch]))
        assert seen == Counter(all_keys)
    assert per_rank[0][0] != per_rank[0][1]  # a new order every epoch


def test_uneven_ranks_stop_together_at_the_planned_step(tmp_path):
    """No hang on uneven data, loader side: the rank with more data stops at the common step count instead of running on."""
    make_shards(str(tmp_path), 2, [30, 10])
    cfg = data_config(f"{tmp_path}/shard-{{000..001}}.tar")
    per_rank, loaders = run_epoch_on_ranks(cfg, world_size=2, batch_size=5, epochs=2)
    assert loaders[0].steps_per_epoch == 2
    assert [[len(epoch) for epoch in rank] for rank in per_rank] == [[2, 2], [2, 2]]


def test_resume_mid_epoch_keeps_the_planned_epoch_length(tmp_path):
    """Exact data position with uneven data: a rank with more data than the planned steps still ends the resumed epoch at the planned step."""
    make_shards(str(tmp_path), 2, [30, 10])
    cfg = data_config(f"{tmp_path}/shard-{{000..001}}.tar")
    kwargs = loader_kwargs(batch_size=5, rank=0, world_size=2)  # rank 0 has 6 batches, the plan 2
    ref_keys = collect(build_train_loader(cfg, **kwargs))[0]
    first = build_train_loader(cfg, **kwargs)
    collect(first, limit=1)
    resumed = build_train_loader(cfg, **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert collect(resumed)[0] == ref_keys[1:] and len(ref_keys) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(tmp_path, num_workers):
    """Exact data position: stop after 7 batches, save the state through a weights_only checkpoint, resume in a new loader."""
    make_shards(str(tmp_path), 8, 25)
    cfg = data_config(f"{tmp_path}/shard-{{000..007}}.tar", num_workers=num_workers)
    for rank in range(2):
        kwargs = loader_kwargs(batch_size=5, rank=rank, world_size=2)
        ref_keys, ref_images, _ = collect(build_train_loader(cfg, **kwargs))
        first = build_train_loader(cfg, **kwargs)
        keys_before, _, _ = collect(first, limit=7)
        path = tmp_path / f"state{rank}.pt"
        torch.save({"data": first.state_dict()}, path)
        resumed = build_train_loader(cfg, **kwargs)
        resumed.load_state_dict(torch.load(path, weights_only=True)["data"])
        keys_after, images_after, _ = collect(resumed)
        assert keys_before + keys_after == ref_keys
        assert all(torch.equal(a, b) for a, b in zip(images_after, ref_images[7:]))  # crops replay too
        assert collect(resumed)[0] != []  # and the next epoch follows


def test_resampled_stream_continues_from_its_saved_position(tmp_path):
    make_shards(str(tmp_path), 4, 10)
    cfg = data_config(f"{tmp_path}/shard-{{000..003}}.tar", resampled=True, num_workers=2)
    kwargs = loader_kwargs(batch_size=4, seed=3)
    ref_keys, ref_images, _ = collect(build_train_loader(cfg, **kwargs), limit=30)
    first = build_train_loader(cfg, **kwargs)
    collect(first, limit=11)
    resumed = build_train_loader(cfg, **kwargs)
    resumed.load_state_dict(first.state_dict())
    keys, images, _ = collect(resumed, limit=19)
    assert keys == ref_keys[11:]
    assert all(torch.equal(a, b) for a, b in zip(images, ref_images[11:]))
    other_rank = build_train_loader(cfg, **loader_kwargs(batch_size=4, seed=3, rank=1, world_size=2))
    assert collect(other_rank, limit=5)[0] != ref_keys[:5]  # per-rank streams differ


def test_mixing_weights_are_respected(tmp_path):
    make_shards(str(tmp_path / "a"), 4, 4, name="a")
    make_shards(str(tmp_path / "b"), 4, 4, name="b")
    spec = f"{tmp_path}/a/a-{{000..003}}.tar::{tmp_path}/b/b-{{000..003}}.tar"
    cfg = data_config(spec, resampled=True, train_weights=[1.0, 3.0], shuffle_buffer=64)
    keys = flat(collect(build_train_loader(cfg, **loader_kwargs(batch_size=40)), limit=100)[0])
    share_b = sum(key.startswith("b-") for key in keys) / len(keys)
    # 4,000 samples = 1,000 shard draws: the standard error of the share is 0.014
    assert abs(share_b - 0.75) < 0.05, share_b


def test_unreadable_shard_is_skipped_and_counted(tmp_path, caplog):
    """A shard vanishing after startup costs its samples, not the run."""
    paths = make_shards(str(tmp_path), 4, 6)
    cfg = data_config(f"{tmp_path}/shard-{{000..003}}.tar", max_unreadable_shards=1)  # exactly at the limit
    loader = build_train_loader(cfg, **loader_kwargs(batch_size=1))
    os.remove(paths[2])
    with caplog.at_level(logging.WARNING, logger="clip.data"):
        keys, _, skipped = collect(loader)
    assert skipped == {"unreadable_shard": 1}
    assert len(flat(keys)) == 18 and "shard-002.tar" in caplog.text


def test_too_many_unreadable_shards_or_an_empty_reader_raise(tmp_path):
    paths = make_shards(str(tmp_path), 2, 6)
    cfg = data_config(f"{tmp_path}/shard-{{000..001}}.tar", num_workers=2)
    loader = build_train_loader(cfg, **loader_kwargs(batch_size=2))
    strict = build_train_loader(data_config(cfg.train_shards, max_unreadable_shards=0, resampled=True), **loader_kwargs())
    os.remove(paths[1])
    with pytest.raises(DataError, match=r"decoded no sample from its 1 shard\(s\)"):
        collect(loader)
    with pytest.raises(DataError, match=r"(?s)1 shard\(s\) could not be read .*shard-001\.tar"):
        collect(strict, limit=50)


def test_pipe_shards_when_allowed(tmp_path):
    paths = make_shards(str(tmp_path), 2, 4)
    spec = f"pipe:cat {tmp_path}/shard-{{000..001}}.tar"
    cfg = data_config(spec, allow_pipe_urls=True, resampled=True, open_retries=1)
    keys = flat(collect(build_train_loader(cfg, **loader_kwargs()), limit=4)[0])
    assert set(keys) <= {f"shard-{i:03d}-{j:04d}" for i in range(2) for j in range(4)} and len(keys) == 16
    failing = data_config("pipe:exit 3", allow_pipe_urls=True, resampled=True, open_retries=1, max_unreadable_shards=0)
    with pytest.raises(DataError, match=r"produced no data in 1 attempt\(s\) \(exit status 3\)"):
        collect(build_train_loader(failing, **loader_kwargs()), limit=1)
    assert len(paths) == 2


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_pairs_split_over_ranks_once_per_epoch(tmp_path, suffix, sep):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        if i != 5:  # row 5 points at a missing file
            (tmp_path / "img" / f"{i}.jpg").write_bytes(tiny_jpeg(i))
        rows.append(f"img/{i}.jpg{sep}caption {i}")
    table = tmp_path / f"pairs{suffix}"
    table.write_text(f"filepath{sep}title\n" + "\n".join(rows) + "\n")
    cfg = data_config(str(table), max_skip_fraction=0.5)
    per_rank = []
    skipped = Counter()
    for rank in range(2):
        keys, _, skips = collect(build_train_loader(cfg, **loader_kwargs(batch_size=1, rank=rank, world_size=2)))
        per_rank.append(flat(keys))
        skipped.update(skips)
    assert sorted(per_rank[0] + per_rank[1], key=int) == [str(i) for i in range(12) if i != 5]
    assert skipped == {"decode_error": 1}


def test_epochs_advance_and_set_epoch_drops_a_stale_position(tmp_path):
    make_shards(str(tmp_path), 2, 8)
    cfg = data_config(f"{tmp_path}/shard-{{000..001}}.tar")
    kwargs = loader_kwargs(batch_size=2)
    reference = build_train_loader(cfg, **kwargs)
    epoch0, epoch1 = collect(reference)[0], collect(reference)[0]
    loader = build_train_loader(cfg, **kwargs)
    collect(loader, limit=3)  # abandoned mid-epoch (another rank ran out, say)
    assert collect(loader)[0] == epoch1  # the next iter() is the next epoch
    resumed = build_train_loader(cfg, **kwargs)
    partial = build_train_loader(cfg, **kwargs)
    collect(partial, limit=3)
    resumed.load_state_dict(partial.state_dict())
    resumed.set_epoch(1)  # the trainer had finished epoch 0
    assert collect(resumed)[0] == epoch1
    assert epoch0 != epoch1


def test_identical_images_get_their_own_random_crops(tmp_path):
    """Each sample draws its own crop (seeded by its position, so that a resume replays it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_mandelbrot((64, 64), (-2.0, -1.5, 1.0, 1.5), 100).convert("RGB").save(buffer, format="PNG")
    with tarfile.open(tmp_path / "same.tar", "w") as tar:
        for i in range(8):
            add_member(tar, f"{i}.png", buffer.getvalue())
            add_member(tar, f"{i}.txt", b"a caption")
    write_sizes(str(tmp_path), {"same.tar": 8})
    _, images, _ = collect(build_train_loader(data_config(f"{tmp_path}/same.tar"), **loader_kwargs(batch_size=8)))
    # Crops of 90-100% of the image at 8 pixels may coincide now and then, but not all of them.
    assert len({image.numpy().tobytes() for image in images[0]}) > 4


def test_loading_in_process_leaves_the_trainer_rng_alone(tmp_path):
    make_shards(str(tmp_path), 1, 8)
    loader = build_train_loader(data_config(f"{tmp_path}/shard-000.tar"), **loader_kwargs())
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    collect(loader, limit=1)
    assert torch.equal(torch.rand(4), expected)


def test_state_for_another_setup_is_refused(tmp_path):
    make_shards(str(tmp_path), 4, 8)
    cfg = data_config(f"{tmp_path}/shard-{{000..003}}.tar")
    state = build_train_loader(cfg, **loader_kwargs()).state_dict()
    other = build_train_loader(cfg, **loader_kwargs(batch_size=8))
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 8"):
        other.load_state_dict(state)


@pytest.mark.parametrize("make", [lambda: image_transform_train(24), lambda: image_transform_eval(24)])
def test_images_travel_as_uint8_and_finish_bitwise_equal_to_the_transform(make):
    from PIL import Image

    from clip.data.stream import ImageBatcher

    transform = make()
    images = [Image.open(io.BytesIO(tiny_jpeg(i, size=40))).convert(mode) for i, mode in enumerate(["RGB", "L", "RGB"])]
    batcher = ImageBatcher(transform)
    torch.manual_seed(5)
    shipped = batcher.stack([batcher(image) for image in images])
    assert shipped.dtype == torch.uint8 and shipped.shape == (3, 3, 24, 24)  # a quarter of float32's bytes
    torch.manual_seed(5)
    reference = torch.stack([transform(image) for image in images])
    assert torch.equal(batcher.finish(shipped), reference)
    channels_last = batcher.finish(shipped.contiguous(memory_format=torch.channels_last))  # ResNets' layout
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and torch.equal(channels_last, reference)


@pytest.mark.parametrize("make", [lambda: image_transform_train(24), lambda: image_transform_eval(24)])
def test_finishing_never_divides_by_a_python_number(make):
    """On CUDA, `x / number` is computed as `x * (1 / number)` (a CPU-scalar fast path), which is a
    bit off the transform's division in about half the values; dividing by a tensor on the batch's
    device is exact there too (tests/test_cuda.py checks the bits on a GPU)."""
    from torch.overrides import TorchFunctionMode

    from clip.data.stream import ImageBatcher

    divisions = []

    class RecordDivisions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("div", "div_", "true_divide", "true_divide_", "__truediv__"):
                divisions.append(type(args[1]))
            return func(*args, **(kwargs or {}))

    batcher = ImageBatcher(make())
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with RecordDivisions():
        batcher.finish(pixels)
    assert divisions and all(issubclass(kind, torch.Tensor) for kind in divisions), divisions


def _user_transforms():
    from torchvision import transforms as T
    from torchvision.transforms import v2

    to_float = v2.ToDtype(torch.float32, scale=True)
    return {
        "v1 one value for every channel": T.Compose([T.CenterCrop(24), T.ToTensor(), T.Normalize([0.5], [0.5])]),
        "v1 numbers": T.Compose([T.CenterCrop(24), T.ToTensor(), T.Normalize(0.5, 0.25)]),
        "v1 tensor statistics": T.Compose(
            [T.CenterCrop(24), T.ToTensor(), T.Normalize(torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD))]
        ),
        "v2 one value for every channel": v2.Compose(
            [v2.PILToTensor(), v2.CenterCrop(24), to_float, v2.Normalize([0.5], [0.5])]
        ),
        "v2 ToDtype of float pixels": v2.Compose(  # the last ToDtype has nothing to scale
            [v2.PILToTensor(), to_float, v2.CenterCrop(24), to_float, v2.Normalize(OPENAI_MEAN, OPENAI_STD)]
        ),
    }


@pytest.mark.parametrize("name", list(_user_transforms()))
def test_a_users_float_conversion_and_normalize_finish_as_the_transform_does(name):
    """Normalize broadcasts one value over every channel and takes numbers or tensors; v2's ToDtype
    scales only integer pixels: the batch must finish exactly as each image would."""
    from PIL import Image

    from clip.data.stream import ImageBatcher

    transform = _user_transforms()[name]
    images = [Image.open(io.BytesIO(tiny_jpeg(i, size=40))).convert("RGB") for i in range(3)]
    batcher = ImageBatcher(transform)
    assert batcher.normalize is not None  # the batched path, not the per-image fallback
    shipped = batcher.stack([batcher(image) for image in images])
    kept = shipped.clone()
    assert torch.equal(batcher.finish(shipped), torch.stack([transform(image) for image in images]))
    assert torch.equal(shipped, kept)  # the caller's batch is left as it was


def test_a_compose_subclass_runs_whole_per_image():
    """A Compose subclass may do more than run its steps (here: clamp after Normalize); splitting its
    steps would run that on uint8 pixels, so it is applied per image as it is."""
    from PIL import Image
    from torchvision import transforms as T

    from clip.data.stream import ImageBatcher

    class Clamped(T.Compose):
        def __call__(self, image):
            return super().__call__(image).clamp(-1, 1)

    transform = Clamped([T.CenterCrop(24), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    images = [Image.open(io.BytesIO(tiny_jpeg(i, size=40))).convert("RGB") for i in range(2)]
    batcher = ImageBatcher(transform)
    finished = batcher.finish(batcher.stack([batcher(image) for image in images]))
    assert torch.equal(finished, torch.stack([transform(image) for image in images]))


def test_the_loader_ships_uint8_and_finishes_on_the_model_side(tmp_path):
    make_shards(str(tmp_path), 1, 8)
    loader = build_train_loader(data_config(f"{tmp_path}/shard-000.tar"), **loader_kwargs())
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8
    images = loader.finish_images(batch.images)
    assert images.dtype == torch.float32 and images.shape == batch.images.shape
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    expected = (batch.images.float() / 255 - mean) / std
    torch.testing.assert_close(images, expected)


def test_pickled_members_never_run_through_the_whole_pipeline(tmp_path):
    """End to end: a shard with malicious .pyd/.pth members yields its samples and counts the rest."""
    import pickle

    from payloads import SystemCallPayload

    marker = tmp_path / "marker"
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        for key in ("a", "b"):
            add_member(tar, f"{key}.jpg", tiny_jpeg(1))
            add_member(tar, f"{key}.pyd", pickle.dumps(SystemCallPayload(marker)))
            add_member(tar, f"{key}.pth", pickle.dumps(SystemCallPayload(marker)))
            add_member(tar, f"{key}.txt", b"caption")
    write_sizes(str(tmp_path), {"evil.tar": 2})
    keys, _, skipped = collect(build_train_loader(data_config(f"{tmp_path}/evil.tar"), **loader_kwargs(batch_size=2)))
    assert sorted(flat(keys)) == ["a", "b"] and skipped == {"ignored_member": 4}
    assert not marker.exists()
