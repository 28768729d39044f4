"""scripts/embed.py and clip.curation.embed: per-shard embedding files, ranks, resume, the CLIP score."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.curation.embed import clip_score
from clip.curation.embeddings import (
    embedding_files,
    output_name,
    output_names,
    read_embedding_dir,
    read_embedding_shard,
)
from clip.data.decode import decode_image
from clip.data.subset import to_hex, uid_from_key
from clip.tokenizer import get_tokenizer
from tests.curation_fixtures import EMBED_SCRIPT, export_tiny_model, json_uid, load_script, write_pool
from tests.eval_fixtures import one_thread  # noqa: F401
from tests.multiprocess import run_on_ranks

FIELDS = ("uid", "key", "image_embedding", "text_embedding", "clip_score", "shard")


@pytest.fixture
def pool(tmp_path):
    paths = write_pool(tmp_path / "pool", num_shards=4, per_shard=5, corrupt=(1, 3))
    model = export_tiny_model(tmp_path / "model.safetensors")
    return str(tmp_path / "pool" / "pool-{000..003}.tar"), str(model), paths


def _embed(argv):
    return load_script(EMBED_SCRIPT).main(argv)


def _args(model, shards, out, *extra):
    return [
        "--model",
        model,
        "--shards",
        shards,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]


def assert_same_files(left, right):
    names = [p.name for p in embedding_files(left)]
    assert names == [p.name for p in embedding_files(right)]
    for name in names:
        a, b = read_embedding_shard(left / name), read_embedding_shard(right / name)
        for field in FIELDS:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name}: {field}")
        assert a.caption == b.caption and a.skipped == b.skipped


def test_files_hold_every_sample_by_uid_and_count_the_corrupt_one(pool, tmp_path, capsys):
    shards, model, paths = pool
    assert _embed(_args(model, shards, tmp_path / "emb", "--workers", "2")) == 0  # two readers interleave shards
    assert [p.name for p in embedding_files(tmp_path / "emb")] == [f"pool-{i:03d}.npz" for i in range(4)]
    table = read_embedding_dir(tmp_path / "emb")
    assert len(table) == 19 and table.skipped == {"decode_error": 1}
    expected = [
        json_uid(s, i) if i % 2 == 0 else uid_from_key(f"{s:03d}{i:04d}")
        for s in range(4)
        for i in range(5)
        if (s, i) != (1, 3)
    ]
    assert to_hex(table.uid) == expected
    assert table.caption[5] == "a photo number 0 of shard 1" and table.shard[5] == paths[1]
    assert table.image_embedding.dtype == np.float16 and table.image_embedding.shape == (19, 32)
    norms = np.linalg.norm(table.image_embedding.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # fp16 rounding of unit vectors
    out = capsys.readouterr().out
    assert "4 shards embedded (19 samples), 0 already done, 0 unreadable" in out and "decode_error=1" in out


def test_clip_score_equals_a_direct_computation(pool, tmp_path):
    shards, model_path, paths = pool
    _embed(_args(model_path, shards, tmp_path / "emb", "--workers", "0"))
    stored = read_embedding_shard(tmp_path / "emb" / "pool-002.npz")
    model, preprocess = clip.load(model_path, device="cpu")
    model = model.double()

    with tarfile.open(paths[2]) as tar:
        images = [decode_image(tar.extractfile(f"002{i:04d}.jpg").read()) for i in range(5)]
        captions = [tar.extractfile(f"002{i:04d}.txt").read().decode() for i in range(5)]
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images]).double()), dim=-1)
        text = F.normalize(model.encode_text(get_tokenizer(model.config.text)(captions)), dim=-1)
    direct = 100 * (image * text).sum(-1).numpy()
    # float32 features against float64 ones: ~1e-6 relative on unit vectors, x100
    np.testing.assert_allclose(stored.clip_score, direct, rtol=0, atol=1e-3)
    np.testing.assert_allclose(stored.image_embedding, image.numpy(), rtol=0, atol=1e-3)  # fp16 half-ulp near 1
    np.testing.assert_allclose(stored.text_embedding, text.numpy(), rtol=0, atol=1e-3)
    assert stored.caption == captions
    assert np.ptp(direct) > 1.0  # the scores differ between samples: the comparison is not of constants


def test_clip_score_is_100_times_the_cosine():
    image, text = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    torch.testing.assert_close(clip_score(image, text), torch.tensor([100.0, 0.0]))


def _embed_on_rank(argv):
    return _embed(argv)


def test_two_gloo_ranks_write_what_one_process_writes(pool, tmp_path):
    shards, model, _ = pool
    results = run_on_ranks(
        _embed_on_rank, world_size=2, args=(_args(model, shards, tmp_path / "ranks", "--workers", "0"),)
    )
    assert results == [0, 0]
    _embed(_args(model, shards, tmp_path / "single", "--workers", "0"))
    assert_same_files(tmp_path / "ranks", tmp_path / "single")


def test_a_killed_job_reruns_only_its_unfinished_shards(pool, tmp_path, capsys):
    shards, model, _ = pool
    out = tmp_path / "emb"
    out.mkdir()
    # The third shard's write fails (its temporary file's name is taken by a directory): the job dies there.
    (out / "pool-002.npz.tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        _embed(_args(model, shards, out, "--workers", "0"))
    assert [p.name for p in embedding_files(out)] == ["pool-000.npz", "pool-001.npz"]
    finished = {name: os.stat(out / name).st_mtime_ns for name in ("pool-000.npz", "pool-001.npz")}
    (out / "pool-002.npz.tmp").rmdir()
    capsys.readouterr()
    assert _embed(_args(model, shards, out, "--workers", "0")) == 0
    assert "2 shards embedded (10 samples), 2 already done" in capsys.readouterr().out
    assert {name: os.stat(out / name).st_mtime_ns for name in finished} == finished  # not rewritten
    _embed(_args(model, shards, tmp_path / "uninterrupted", "--workers", "0"))
    assert_same_files(out, tmp_path / "uninterrupted")
    assert not list(out.glob("*.tmp"))


def test_an_unreadable_shard_gets_no_file_and_fails_the_job(pool, tmp_path, capsys):
    shards, model, paths = pool
    os.remove(paths[3])
    assert _embed(_args(model, shards, tmp_path / "emb", "--workers", "0")) == 1
    assert [p.name for p in embedding_files(tmp_path / "emb")] == [f"pool-{i:03d}.npz" for i in range(3)]
    assert f"{paths[3]}: cannot be read" in capsys.readouterr().err


def test_output_names_refuse_two_shards_with_one_name():
    assert output_name("pipe:aws s3 cp s3://bucket/pool/00042.tar -") == "00042.npz"
    with pytest.raises(ValueError, match="would both write 00001.npz"):
        output_names(["/a/00001.tar", "/b/00001.tar"])
