"""The synthetic dataset: deterministic, readable by the loader, and its captions describe its images."""

from __future__ import annotations

import filecmp
import json
import os
import random

import pytest
from data_shards import data_config, loader_kwargs, truncate
from PIL import Image

from clip.data import build_train_loader
from clip.data.manifest import main as manifest_main
from clip.data.synthetic import COLORS, render_scene, write_synthetic_dataset


def test_layout_determinism_and_loader_round_trip(tmp_path):
    a = write_synthetic_dataset(str(tmp_path / "a"), num_train=250, samples_per_shard=100, images_per_class=2, seed=7)
    write_synthetic_dataset(str(tmp_path / "b"), num_train=250, samples_per_shard=100, images_per_class=2, seed=7)
    c = write_synthetic_dataset(str(tmp_path / "c"), num_train=250, samples_per_shard=100, images_per_class=2, seed=8)
    train = tmp_path / "a" / "train"
    assert sorted(os.listdir(train)) == ["000000.tar", "000001.tar", "000002.tar", "sizes.json"]
    assert json.loads((train / "sizes.json").read_text()) == {"000000.tar": 100, "000001.tar": 100, "000002.tar": 50}
    for name in ("000000.tar", "000002.tar"):
        assert filecmp.cmp(train / name, tmp_path / "b" / "train" / name, shallow=False)
        assert not filecmp.cmp(train / name, tmp_path / "c" / "train" / name, shallow=False)

    zeroshot = tmp_path / "a" / "zeroshot"
    folders = sorted(p.name for p in zeroshot.iterdir() if p.is_dir())
    classnames = (zeroshot / "classnames.txt").read_text().splitlines()
    assert len(folders) == len(classnames) == a.num_classes >= 8
    assert [f.split("_", 1)[1].replace("_", " ") for f in folders] == classnames  # sorted order = class index
    assert all("{}" in t for t in (zeroshot / "templates.txt").read_text().splitlines())
    assert all(len(os.listdir(zeroshot / f)) == 2 for f in folders)

    loader = build_train_loader(data_config(a.train_shards), **loader_kwargs(batch_size=10))
    keys = [k for batch in loader for k in batch.keys]
    assert sorted(keys) == [f"{i:09d}" for i in range(250)]
    assert c.train_shards != a.train_shards


def test_captions_name_the_colour_and_shape_drawn():
    for index in range(200):
        image, caption, meta = render_scene(random.Random(f"0/train/{index}"), 64)
        for obj in meta["objects"]:
            assert obj["color"] in caption and obj["shape"] in caption
            assert COLORS[obj["color"]] in {color for _, color in image.getcolors(64 * 64)}
        assert isinstance(image, Image.Image)


def test_manifest_cli_counts_and_refuses_truncated_shards(tmp_path, capsys):
    dataset = write_synthetic_dataset(str(tmp_path), num_train=30, samples_per_shard=10, images_per_class=1)
    sizes = tmp_path / "train" / "sizes.json"
    sizes.unlink()
    manifest_main([dataset.train_shards])
    assert json.loads(sizes.read_text()) == {"000000.tar": 10, "000001.tar": 10, "000002.tar": 10}
    truncate(str(tmp_path / "train" / "000001.tar"), 5000)
    truncate(str(tmp_path / "train" / "000002.tar"), 7000)
    # Every damaged shard is named (not only the first), and the manifest is left as it was.
    with pytest.raises(SystemExit, match=r"not writing a manifest: .*000001\.tar ends at byte.*; .*000002\.tar ends"):
        manifest_main([dataset.train_shards])
    assert json.loads(sizes.read_text())["000002.tar"] == 10


def test_manifest_cli_names_missing_shards_before_counting(tmp_path, monkeypatch):
    dataset = write_synthetic_dataset(str(tmp_path), num_train=20, samples_per_shard=10, images_per_class=1)
    monkeypatch.setattr("clip.data.manifest.count_samples", lambda path: pytest.fail("counted before the check"))
    pattern = dataset.train_shards.replace("{000000..000001}", "{000000..000003}")
    with pytest.raises(SystemExit) as exit_info:
        manifest_main([pattern])
    assert str(exit_info.value.code) == (
        f"not writing a manifest: 2 of 4 shards do not exist: {tmp_path}/train/000002.tar, {tmp_path}/train/000003.tar")


def test_uids_and_an_opt_in_share_of_mismatched_captions(tmp_path):
    import tarfile

    from clip.data.records import Record
    from clip.data.tar_reader import iter_tar_samples

    def samples(directory, fraction):
        write_synthetic_dataset(str(directory), num_train=200, samples_per_shard=200, images_per_class=1, seed=3,
                                mismatched_fraction=fraction)
        path = directory / "train" / "000000.tar"
        with tarfile.open(path) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        with open(path, "rb") as f:
            records = [r for r in iter_tar_samples(f, str(path), max_member_bytes=1 << 20) if isinstance(r, Record)]
        return metas, records

    clean, clean_records = samples(tmp_path / "clean", 0.0)
    noisy, noisy_records = samples(tmp_path / "noisy", 0.25)
    assert [r.uid for r in clean_records] == [m["uid"] for m in clean] == [m["uid"] for m in noisy]
    assert len(set(m["uid"] for m in clean)) == 200 and not any(m["mismatched"] for m in clean)
    flagged = [i for i, m in enumerate(noisy) if m["mismatched"]]
    assert 30 <= len(flagged) <= 70  # 25% of 200, binomial
    for i, (clean_record, noisy_record) in enumerate(zip(clean_records, noisy_records)):
        if i in flagged:
            assert not any(f"{o['color']} {o['shape']}" in noisy_record.caption for o in noisy[i]["objects"])
        else:
            assert noisy_record.caption == clean_record.caption
