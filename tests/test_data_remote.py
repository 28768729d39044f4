"""Remote shards over loopback servers (tests/remote_servers.py): the same batches as from local files,
resume included, a dropped connection that loses and repeats nothing, and no credentials anywhere."""

from __future__ import annotations

import logging
import math
from collections import Counter

import pytest
import torch
from data_shards import collect, data_config, loader_kwargs, make_shards, member_offsets, write_sizes
from remote_servers import FileServer, S3Server

from clip.config import DataConfig
from clip.data import DataConfigError, build_train_loader, check_train_data, remote
from clip.data.remote import redact
from clip.data.sources import resolve_sources


def same_images(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def small_blocks(monkeypatch):
    """Many ranged reads per shard (so a connection can break after some samples were read), quick retries."""
    monkeypatch.setattr(remote, "BLOCK_SIZE", 4096)
    monkeypatch.setattr(remote, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture(params=["http", "s3"])
def served(request, tmp_path, small_blocks):
    """(local directory, its URL on a loopback server) holding 8 shards of 25 samples and their sizes.json."""
    directory = tmp_path / "shards"
    make_shards(str(directory), 8, 25)
    if request.param == "http":
        with FileServer(directory) as server:
            yield directory, server.url()
    else:
        with S3Server() as s3:
            yield directory, s3.upload(directory, "bucket", "train/")


def test_remote_epochs_and_mid_epoch_resume_are_those_of_local_files(served):
    """2 ranks x 2 workers: each sample once per epoch, bitwise the local batches, and a resume after 7
    batches (state through a weights_only checkpoint) yields exactly the rest."""
    directory, url = served
    local = data_config(f"{directory}/shard-{{000..007}}.tar", num_workers=2)
    remote_cfg = data_config(f"{url}shard-{{000..007}}.tar", num_workers=2)
    seen = Counter()
    for rank in range(2):
        kwargs = loader_kwargs(batch_size=5, rank=rank, world_size=2)
        ref_keys, ref_images, _ = collect(build_train_loader(local, **kwargs))
        first = build_train_loader(remote_cfg, **kwargs)
        keys_before, images_before, skipped = collect(first, limit=7)
        resumed = build_train_loader(remote_cfg, **kwargs)
        resumed.load_state_dict(first.state_dict())
        keys_after, images_after, skipped_after = collect(resumed)
        assert keys_before + keys_after == ref_keys and len(ref_keys) == 20
        assert same_images(images_before + images_after, ref_images)
        assert skipped == skipped_after == {}
        seen.update(key for batch in ref_keys for key in batch)
    assert seen == Counter(f"shard-{i:03d}-{j:04d}" for i in range(8) for j in range(25))


def test_a_dropped_connection_mid_shard_loses_and_repeats_nothing(tmp_path, small_blocks, caplog):
    paths = make_shards(str(tmp_path), 4, 25)
    inside_image = member_offsets(paths[1])[2 * 10][2] + 100  # in the data of sample 10's image
    inside_header = member_offsets(paths[2])[2 * 20][1] + 3  # in the header of sample 20's image
    reference = collect(
        build_train_loader(data_config(f"{tmp_path}/shard-{{000..003}}.tar"), **loader_kwargs(batch_size=5))
    )
    with FileServer(tmp_path) as server, caplog.at_level(logging.WARNING, logger="clip.data"):
        server.drop("shard-001.tar", at=inside_image, times=2)  # twice in a row: the third attempt gets through
        server.drop("shard-002.tar", at=inside_header)
        cfg = data_config(server.url("shard-{000..003}.tar"))  # data.open_retries=3 attempts per read
        keys, images, skipped = collect(build_train_loader(cfg, **loader_kwargs(batch_size=5)))
    assert keys == reference[0] and len(keys) == 20 and same_images(images, reference[1])
    assert skipped == {}
    for name, cut, drops in (("shard-001.tar", inside_image, 2), ("shard-002.tar", inside_header, 1)):
        requests = server.requests(name)
        assert [c for _, c in requests if c is not None] == [cut] * drops, requests
        # Each attempt after a drop asks for the bytes from where the reader was, not from the start.
        retries = [requests[i + 1][0] for i, (_, c) in enumerate(requests) if c is not None]
        assert all(0 < start <= cut for start in retries), requests
        assert caplog.text.count(f"{name}: read error at byte") == drops


def test_a_shard_that_keeps_failing_or_is_missing_is_skipped_counted_and_named(tmp_path, small_blocks, caplog):
    paths = make_shards(str(tmp_path), 4, 25)
    write_sizes(str(tmp_path), {"shard-004.tar": 25})  # listed, but not on the server: a 404
    cut = member_offsets(paths[1])[2 * 10][2] + 100
    with FileServer(tmp_path) as server, caplog.at_level(logging.WARNING, logger="clip.data"):
        server.drop("shard-001.tar", at=cut, times=math.inf)
        cfg = data_config(server.url("shard-{000..004}.tar"), open_retries=2)
        keys, _, skipped = collect(build_train_loader(cfg, **loader_kwargs(batch_size=1)))
    assert skipped == {"truncated_shard": 1, "unreadable_shard": 1}
    seen = [key for batch in keys for key in batch]
    assert len(seen) == len(set(seen))
    assert {key for key in seen if not key.startswith("shard-001")} == {
        f"shard-{i:03d}-{j:04d}" for i in (0, 2, 3) for j in range(25)
    }
    kept = [key for key in seen if key.startswith("shard-001")]  # the complete samples read before it failed
    assert 0 < len(kept) <= 10 and sorted(kept) == [f"shard-001-{j:04d}" for j in range(len(kept))]
    assert [c for _, c in server.requests("shard-001.tar") if c is not None] == [cut, cut]  # 2 attempts
    assert "shard-001.tar failed at byte" in caplog.text and "in 2 attempt(s)" in caplog.text
    assert "cannot open http://" in caplog.text and "shard-004.tar" in caplog.text


def test_remote_list_files_and_manifests_are_read_relative_to_their_url(tmp_path):
    make_shards(str(tmp_path), 3, 4)
    (tmp_path / "list.txt").write_text("# three shards\nshard-{000..001}.tar\nshard-002.tar\n")
    with FileServer(tmp_path) as server:
        sources = resolve_sources(DataConfig(train_shards=server.url("list.txt")))
        shards = sources[0].shards
        assert [s.url for s in shards] == [server.url(f"shard-{i:03d}.tar") for i in range(3)]
        assert [s.num_samples for s in shards] == [4, 4, 4]  # from the sizes.json beside them
        with pytest.raises(DataConfigError, match=r"epoch mode needs per-shard sample counts"):
            check_train_data(DataConfig(train_shards=server.url("elsewhere/{0..1}.tar"), num_workers=0), world_size=1)


@pytest.mark.parametrize(
    "url", ["https://user:hunter2@example.com/{0..3}.tar", "s3://bucket/{0..3}.tar?X-Amz-Signature=hunter2"]
)
def test_credentials_in_urls_are_refused_without_being_repeated(url):
    with pytest.raises(DataConfigError, match=r"carries credentials .*from its environment") as error:
        check_train_data(DataConfig(train_shards=url, resampled=True), world_size=1)
    assert "hunter2" not in str(error.value)


def test_redact_hides_user_info_and_queries_of_every_url_in_a_message():
    message = "GET https://key:secret@host.example/a/b.tar?sig=abc&x=1 failed; retried s3://bucket/k?versionId=v"
    assert redact(message) == "GET https://***@host.example/a/b.tar?*** failed; retried s3://bucket/k?***"
    assert redact("/local/path/000.tar: no such file") == "/local/path/000.tar: no such file"


def test_a_missing_sdk_is_a_config_error_naming_the_package(monkeypatch):
    real_find_spec = remote.importlib.util.find_spec
    monkeypatch.setattr(
        remote.importlib.util, "find_spec", lambda name: None if name == "gcsfs" else real_find_spec(name)
    )
    with pytest.raises(
        DataConfigError, match=r"gs:// shards need the gcsfs package\(s\): pip install 'clip-train\[remote\]'"
    ):
        check_train_data(DataConfig(train_shards="gs://bucket/{0..3}.tar", resampled=True), world_size=1)
