"""Training on a selection of the pool: data.subset (DataComp uid files) and data.balance (MetaCLIP), exact
epochs over ranks x workers and exact mid-epoch resume (clip.data.selection)."""

from __future__ import annotations

import json
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
from data_shards import add_member, data_config, loader_kwargs, make_shards, tiny_jpeg, write_sizes

from clip.curation.metaclip import Balance, count_matches, entry_probabilities, entry_uniforms, spaced
from clip.data import DataConfigError, DataError, build_train_loader
from clip.data.selection import write_subset_sizes
from clip.data.subset import read_subset, to_hex, uid_from_key, write_subset

pytest.importorskip("ahocorasick")


def keys_of(loader, limit=None):
    """Sample keys per batch of one epoch (or the first `limit` batches)."""
    batches = []
    for batch in loader:
        batches.append(list(batch.keys))
        if limit is not None and len(batches) == limit:
            break
    return batches


def flat(batches):
    return [key for batch in batches for key in batch]


def epoch_on_ranks(cfg, world_size, batch_size, seed=0):
    loaders = [
        build_train_loader(cfg, **loader_kwargs(batch_size=batch_size, rank=r, world_size=world_size, seed=seed))
        for r in range(world_size)
    ]
    return [keys_of(loader) for loader in loaders], loaders


@pytest.fixture
def subset_pool(tmp_path):
    """8 shards x 25 samples plus a ninth with no kept sample; the subset keeps every fifth sample."""
    make_shards(str(tmp_path), 9, 25)
    keys = [f"shard-{i:03d}-{j:04d}" for i in range(9) for j in range(25)]
    kept = [k for k in keys if int(k[-4:]) % 5 == 0 and not k.startswith("shard-008")]
    subset = tmp_path / "keep.npy"
    write_subset(subset, [uid_from_key(k) for k in kept])
    write_subset_sizes(subset, len(kept), {f"shard-{i:03d}.tar": 5 for i in range(8)} | {"shard-008.tar": 0})
    return f"{tmp_path}/shard-{{000..008}}.tar", str(subset), kept


def test_subset_epochs_on_two_ranks_two_workers_see_the_subset_once(subset_pool):
    shards, subset, kept = subset_pool
    cfg = data_config(shards, num_workers=2, subset=subset)
    per_rank, loaders = epoch_on_ranks(cfg, world_size=2, batch_size=5)
    # 8 shards with 5 kept samples over 4 readers: 2 batches a reader, 4 a rank; the empty shard is left out.
    assert [loader.steps_per_epoch for loader in loaders] == [4, 4]
    assert all(len(r.shards) == 2 for loader in loaders for r in loader.plan.readers)
    assert Counter(flat(per_rank[0]) + flat(per_rank[1])) == Counter(kept)
    second = [keys_of(loader) for loader in loaders]
    assert Counter(flat(second[0]) + flat(second[1])) == Counter(kept) and second != per_rank


@pytest.mark.parametrize("num_workers", [0, 2])
def test_subset_resume_mid_epoch_yields_exactly_the_remaining_samples(subset_pool, num_workers):
    shards, subset, _ = subset_pool
    cfg = data_config(shards, num_workers=num_workers, subset=subset)
    kwargs = loader_kwargs(batch_size=5, rank=1, world_size=2)
    reference = keys_of(build_train_loader(cfg, **kwargs))
    first = build_train_loader(cfg, **kwargs)
    before = keys_of(first, limit=3)
    resumed = build_train_loader(cfg, **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert before + keys_of(resumed) == reference and len(reference) == 4


def test_subset_in_resampled_mode_streams_only_kept_samples(subset_pool, tmp_path):
    shards, subset, kept = subset_pool
    (tmp_path / "keep.sizes.json").unlink()  # resampled mode does not need the counts
    cfg = data_config(shards, num_workers=1, subset=subset, resampled=True)
    seen = flat(keys_of(build_train_loader(cfg, **loader_kwargs(batch_size=5)), limit=20))
    assert set(seen) <= set(kept) and len(set(seen)) > len(kept) // 2


def test_subset_counts_are_required_in_epoch_mode_and_checked(subset_pool, tmp_path):
    shards, subset, kept = subset_pool
    sizes = tmp_path / "keep.sizes.json"
    sizes.unlink()
    with pytest.raises(DataConfigError, match=r"keep\.sizes\.json does not exist; write it with: python scripts/curate\.py sizes"):
        build_train_loader(data_config(shards, subset=subset), **loader_kwargs())
    write_subset_sizes(subset, len(kept) + 1, {f"shard-{i:03d}.tar": 5 for i in range(9)})
    with pytest.raises(DataConfigError, match=r"written for a subset of 41 uids, .*keep\.npy has 40"):
        build_train_loader(data_config(shards, subset=subset), **loader_kwargs())
    write_subset_sizes(subset, len(kept), {f"shard-{i:03d}.tar": 5 for i in range(7)} | {"shard-007.tar": 6, "shard-008.tar": 0})
    with pytest.raises(DataError, match=r"shard-007\.tar: 5 samples selected, but the selection's counts say 6"):
        keys_of(build_train_loader(data_config(shards, subset=subset), **loader_kwargs(batch_size=1)))


def test_unselected_samples_are_not_skips(tmp_path):
    """A 10% subset of a shard with missing captions: nothing counts toward data.max_skip_fraction."""
    keys = [f"k{i:03d}" for i in range(100)]
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i, key in enumerate(keys):
            add_member(tar, f"{key}.jpg", tiny_jpeg(i))
            if i % 10 != 5:  # 10 samples without a caption: in no subset
                add_member(tar, f"{key}.txt", f"caption {key}".encode())
    write_sizes(str(tmp_path), {"a.tar": 100})
    write_subset(tmp_path / "keep.npy", [uid_from_key(k) for k in keys[::10]])
    write_subset_sizes(tmp_path / "keep.npy", 10, {"a.tar": 10})
    cfg = data_config(f"{tmp_path}/a.tar", subset=str(tmp_path / "keep.npy"), max_skip_fraction=0.0)
    batches = list(build_train_loader(cfg, **loader_kwargs(batch_size=2)))
    assert sorted(flat(b.keys for b in batches)) == keys[::10] and all(b.skipped == {} for b in batches)


# --- MetaCLIP balancing

ENTRIES = ["cat", "dog", "red cat", "bird", "fish"]
CAPTIONS = ["a cat.", "a red cat", "a dog and a cat", "dog", "a bird", "Cat", "redcat", "a dog, running"]


def test_metaclip_matching_counts_and_probabilities_hand_checked():
    balance = count_matches(ENTRIES, [("s", uid_from_key(str(i)), c) for i, c in enumerate(CAPTIONS)], threshold=2)
    # " cat " in: "a cat." (the full stop is set apart), "a red cat", "a dog and a cat"; not "Cat" (case), "redcat".
    assert spaced("a cat.\tx") == " a cat .  x "
    assert balance.counts.tolist() == [3, 3, 1, 1, 0]
    assert entry_probabilities(balance.counts, 2).tolist() == [2 / 3, 2 / 3, 1.0, 1.0, 1.0]
    # A sample is kept when any of its matched entries is sampled: "a red cat" (via its tail entry) and
    # "a bird" always; "Cat" and "redcat" (no match) never.
    for seed in range(20):
        kept = set(to_hex(balance.kept(seed)[0]))
        assert {uid_from_key("1"), uid_from_key("4")} <= kept
        assert not kept & {uid_from_key("5"), uid_from_key("6")}


def test_keep_draws_are_uniform_so_head_entries_keep_t_over_count():
    n = 200_000
    rng = np.random.default_rng(0)
    uid0, uid1 = rng.integers(0, 2**63, n, dtype=np.uint64), rng.integers(0, 2**63, n, dtype=np.uint64)
    draws = entry_uniforms(7, uid0, uid1, np.full(n, 3))
    p = 0.1
    assert abs(np.mean(draws < p) - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert np.histogram(draws, bins=10, range=(0, 1))[0].min() > n / 10 * 0.97
    assert not np.array_equal(draws, entry_uniforms(8, uid0, uid1, np.full(n, 3)))  # the seed changes the draws


def _caption(index: int) -> str:
    words = ["cat", "dog", "bird", "fish", "cow"]
    return f"a {words[zlib.crc32(str(index).encode()) % 5]} and a {words[index % 3]}"


@pytest.fixture
def balance_pool(tmp_path):
    """8 shards x 20 samples whose captions match head entries (probability < 1) and tail ones."""
    samples = []
    for s in range(8):
        with tarfile.open(tmp_path / f"b-{s}.tar", "w") as tar:
            for j in range(20):
                key, caption = f"b-{s}-{j:02d}", _caption(s * 20 + j)
                add_member(tar, f"{key}.jpg", tiny_jpeg(s * 20 + j))
                add_member(tar, f"{key}.txt", caption.encode())
                samples.append((str(tmp_path / f"b-{s}.tar"), uid_from_key(key), caption))
    write_sizes(str(tmp_path), {f"b-{s}.tar": 20 for s in range(8)})
    balance = count_matches(["cat", "dog", "bird", "fish"], samples, threshold=40)
    path = balance.save(tmp_path / "balance.npz")
    return f"{tmp_path}/b-{{0..7}}.tar", str(path), {uid: f"b-{i // 20}-{i % 20:02d}" for i, (_, uid, _) in enumerate(samples)}


def test_balance_online_epochs_see_exactly_the_kept_set_and_resume_exactly(balance_pool):
    shards, path, key_of = balance_pool
    balance = Balance.load(path)
    assert (balance.probabilities < 1).any() and (balance.probabilities == 1).any()
    cfg = data_config(shards, num_workers=2, balance=path)
    # A seed whose kept counts split evenly over the 2 ranks (epoch mode drops a richer rank's excess).
    for seed in range(50):
        loaders = [build_train_loader(cfg, **loader_kwargs(batch_size=1, rank=r, world_size=2, seed=seed)) for r in range(2)]
        kept = {key_of[uid] for uid in to_hex(balance.kept(seed)[0])}
        if loaders[0].steps_per_epoch * 2 == len(kept):
            break
    assert 40 < len(kept) < 150  # balancing dropped some, and kept more than the tail
    per_rank = [keys_of(loader) for loader in loaders]
    assert Counter(flat(per_rank[0]) + flat(per_rank[1])) == Counter(kept)
    resumed = build_train_loader(cfg, **loader_kwargs(batch_size=1, rank=1, world_size=2, seed=seed))
    first = build_train_loader(cfg, **loader_kwargs(batch_size=1, rank=1, world_size=2, seed=seed))
    before = keys_of(first, limit=9)
    resumed.load_state_dict(first.state_dict())
    assert before + keys_of(resumed) == per_rank[1]
    other = {key_of[uid] for uid in to_hex(balance.kept(seed + 1)[0])}
    assert other != kept


def test_subset_and_balance_together_are_refused(subset_pool, balance_pool):
    shards, subset, _ = subset_pool
    with pytest.raises(DataConfigError, match="data.subset and data.balance are both set"):
        build_train_loader(data_config(shards, subset=subset, balance=balance_pool[1]), **loader_kwargs())


def test_counting_a_subset_in_its_shards_gives_the_loaders_counts(subset_pool, tmp_path):
    from clip.data.selection import count_subset_in_shards

    _, subset, _ = subset_pool
    urls = [str(tmp_path / f"shard-{i:03d}.tar") for i in range(9)]
    assert count_subset_in_shards(read_subset(subset), urls) == {url: 5 for url in urls[:8]} | {urls[8]: 0}


# --- scripts/curate.py: the sizes and metaclip subcommands


def _curate(argv):
    from tests.curation_fixtures import CURATE_SCRIPT, load_script

    return load_script(CURATE_SCRIPT).main(argv)


def test_curate_sizes_writes_the_counts_epoch_mode_reads(subset_pool, tmp_path):
    shards, subset, kept = subset_pool
    (tmp_path / "keep.sizes.json").unlink()
    _curate(["sizes", "--subset", subset, "--shards", shards])
    sizes = json.loads((tmp_path / "keep.sizes.json").read_text())
    assert sizes["subset_uids"] == 40 and sorted(sizes["shards"].values()) == [0] + [5] * 8
    keys = flat(keys_of(build_train_loader(data_config(shards, subset=subset), **loader_kwargs(batch_size=1))))
    assert sorted(keys) == sorted(kept)


def test_offline_metaclip_subset_equals_the_online_kept_set(balance_pool, tmp_path):
    shards, _, key_of = balance_pool
    (tmp_path / "entries.txt").write_text("cat\ndog\nbird\nfish\n")
    out = tmp_path / "metaclip.npy"
    _curate(["metaclip", "--metadata", str(tmp_path / "entries.txt"), "--shards", shards, "--t", "40",
             "--seed", "5", "--out", str(out)])
    offline = sorted(key_of[uid] for uid in to_hex(read_subset(out)))
    assert 40 < len(offline) < 150
    kwargs = loader_kwargs(batch_size=1, seed=5)  # one rank, batch 1: the epoch is every selected sample
    online = flat(keys_of(build_train_loader(
        data_config(shards, num_workers=2, balance=str(tmp_path / "metaclip.balance.npz")), **kwargs)))
    from_subset = flat(keys_of(build_train_loader(data_config(shards, num_workers=2, subset=str(out)), **kwargs)))
    assert sorted(online) == sorted(from_subset) == offline
    # Counting once and selecting from the balance file gives the same subset; another seed another one.
    _curate(["metaclip", "--count", "--metadata", str(tmp_path / "entries.txt"), "--shards", shards, "--t", "40",
             "--out", str(tmp_path / "balance.npz")])
    _curate(["metaclip", "--balance", str(tmp_path / "balance.npz"), "--seed", "5", "--out", str(tmp_path / "again.npy")])
    assert np.array_equal(read_subset(tmp_path / "again.npy"), read_subset(out))
    _curate(["metaclip", "--balance", str(tmp_path / "balance.npz"), "--seed", "6", "--out", str(tmp_path / "other.npy")])
    assert not np.array_equal(read_subset(tmp_path / "other.npy"), read_subset(out))
