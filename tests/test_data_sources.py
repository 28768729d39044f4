"""Shard specs, startup checks and their error messages."""

from __future__ import annotations

import json
import os

import pytest
from data_shards import make_shards

from clip.config import DataConfig
from clip.data import DataConfigError, check_train_data
from clip.data.sources import resolve_sources


def urls(sources):
    return [shard.url for source in sources for shard in source.shards]


def test_brace_patterns_sources_and_list_files(tmp_path):
    a = make_shards(str(tmp_path / "a"), 3, 2, name="a")
    b = make_shards(str(tmp_path / "b"), 2, 5, name="b")
    listing = tmp_path / "b" / "shards.txt"
    listing.write_text("# comment\n\nb-{000..001}.tar\n")  # relative to the list file
    cfg = DataConfig(train_shards=f"{tmp_path}/a/a-{{000..002}}.tar :: {listing}", resampled=True, train_weights=[1, 3])
    sources = resolve_sources(cfg)
    assert urls(sources) == a + b
    assert [s.weight for s in sources] == [1.0, 3.0]
    assert [shard.num_samples for source in sources for shard in source.shards] == [2, 2, 2, 5, 5]


def test_explicit_manifest_by_url_or_basename(tmp_path):
    paths = make_shards(str(tmp_path), 2, 3, sizes=False)
    manifest = tmp_path / "counts.json"
    manifest.write_text(json.dumps({paths[0]: 7, os.path.basename(paths[1]): 9}))
    cfg = DataConfig(train_shards=f"{tmp_path}/shard-{{000..001}}.tar", train_manifest=str(manifest))
    assert [s.num_samples for s in resolve_sources(cfg)[0].shards] == [7, 9]


@pytest.mark.parametrize("spec", ["???", "", "  "])
def test_unset_train_shards_names_the_key(spec):
    with pytest.raises(DataConfigError, match=r"data\.train_shards is not set"):
        check_train_data(DataConfig(train_shards=spec), world_size=1)


def test_missing_local_shard_is_a_config_error_naming_key_and_path(tmp_path):
    """A missing local shard at startup."""
    make_shards(str(tmp_path), 3, 2)
    cfg = DataConfig(train_shards=f"{tmp_path}/shard-{{000..003}}.tar", num_workers=0)
    with pytest.raises(DataConfigError, match=r"data\.train_shards: 1 shard\(s\) do not exist: .*shard-003\.tar"):
        check_train_data(cfg, world_size=1)
    with pytest.raises(DataConfigError, match=r"data\.train_shards: 4 shard\(s\) do not exist: /nonexistent/000\.tar"):
        check_train_data(DataConfig(train_shards="/nonexistent/{000..003}.tar"), world_size=1)


def test_pipe_urls_need_opt_in_and_never_run_at_check_time(tmp_path):
    """`pipe:` is a shell command; rejected unless data.allow_pipe_urls, and never from a list file."""
    marker = tmp_path / "marker"
    cfg = DataConfig(train_shards=f"pipe:touch {marker}", resampled=True)
    with pytest.raises(DataConfigError, match=r"data\.train_shards.*pipe:.*data\.allow_pipe_urls=true"):
        check_train_data(cfg, world_size=1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"pipe:touch {marker}\n")
    cfg = DataConfig(train_shards=str(listing), resampled=True, allow_pipe_urls=True)
    with pytest.raises(DataConfigError, match=r"shard list files may not contain pipe: commands"):
        check_train_data(cfg, world_size=1)
    allowed = DataConfig(train_shards=f"pipe:touch {marker}", resampled=True, allow_pipe_urls=True)
    check_train_data(allowed, world_size=1)  # accepted, but nothing runs before training reads it
    assert not marker.exists()


def test_unsupported_scheme_names_the_supported_ones():
    with pytest.raises(DataConfigError, match=r"unsupported scheme ftp://; use a local path, s3://, gs://"):
        check_train_data(DataConfig(train_shards="ftp://host/{0..3}.tar", resampled=True), world_size=1)


def test_epoch_mode_needs_sample_counts(tmp_path):
    make_shards(str(tmp_path), 2, 3, sizes=False)
    spec = f"{tmp_path}/shard-{{000..001}}.tar"
    with pytest.raises(DataConfigError, match=r"epoch mode needs per-shard sample counts.*sizes\.json"):
        check_train_data(DataConfig(train_shards=spec, num_workers=0), world_size=1)
    check_train_data(DataConfig(train_shards=spec, resampled=True), world_size=1)


def test_too_few_shards_for_the_readers_fails_before_any_process_group(tmp_path):
    """Impossible sharding: the exact startup message."""
    make_shards(str(tmp_path), 3, 2)
    cfg = DataConfig(train_shards=f"{tmp_path}/shard-{{000..002}}.tar", num_workers=2)
    with pytest.raises(DataConfigError) as error:
        check_train_data(cfg, world_size=2)
    assert str(error.value) == (
        "3 shards cannot feed 2 ranks x 2 workers = 4 readers; use fewer workers (data.num_workers), "
        "more shards (data.train_shards), or data.resampled=true"
    )
    check_train_data(DataConfig(train_shards=cfg.train_shards, num_workers=2, resampled=True), world_size=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(train_weights=[2.0]), r"data\.train_weights only applies with data\.resampled=true"),
        (dict(train_weights=[1.0, 2.0], resampled=True), r"data\.train_weights has 2 entries but .* 1 '::'"),
        (dict(train_weights=[0.0], resampled=True), r"data\.train_weights=\[0\.0\] must all be positive"),
        (dict(max_skip_fraction=1.5), r"data\.max_skip_fraction=1\.5 must be in \[0, 1\]"),
        (dict(num_workers=-1), r"data\.num_workers=-1 must be >= 0"),
    ],
)
def test_field_errors_name_their_key(tmp_path, overrides, message):
    make_shards(str(tmp_path), 1, 2)
    cfg = DataConfig(train_shards=f"{tmp_path}/shard-000.tar", **{"num_workers": 0, **overrides})
    with pytest.raises(DataConfigError, match=message):
        check_train_data(cfg, world_size=1)


def test_csv_columns_are_checked(tmp_path):
    table = tmp_path / "pairs.tsv"
    table.write_text("path\tcaption\nimg.jpg\ta cat\n")
    with pytest.raises(DataConfigError, match=r"data\.csv_image_key='filepath' is not a column of .*pairs\.tsv"):
        check_train_data(DataConfig(train_shards=str(table)), world_size=1)
    check_train_data(DataConfig(train_shards=str(table), csv_image_key="path", csv_caption_key="caption"), world_size=1)


def test_an_unset_pattern_variable_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WDS_SHARD_ROOT", raising=False)
    cfg = DataConfig(train_shards=str(tmp_path / "${SHARD_ROOT}" / "{000..001}.tar"))
    with pytest.raises(DataConfigError, match=r"data\.train_shards: .*WDS_SHARD_ROOT"):
        check_train_data(cfg, world_size=1)
