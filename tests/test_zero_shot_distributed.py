"""Sharded evaluation on 3 gloo ranks equals one process, and no rank is left waiting.

13 images over 3 ranks with batches of 2 give the ranks 3, 2 and 2 batches; 7 classes give them 3,
3 and 1 real classes to encode; 2 shards leave the third rank with no data at all. Every rank must
still return the single-process metrics and make the same number of encoder calls (what an
FSDP-sharded model needs to not hang). A truncated shard on one rank stops all three at once.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from clip.data.eval_datasets import load_classification_set, load_retrieval_set
from clip.linear_probe import extract_image_features
from clip.transforms import image_transform_eval
from clip.zero_shot import evaluate, evaluate_zero_shot
from tests.eval_fixtures import (  # noqa: F401
    classification_members,
    one_thread,
    tiny_model,
    write_caption_set,
    write_image_folder,
    write_tar,
)

multiprocess = pytest.importorskip("tests.multiprocess", reason="the multi-process harness is not merged yet")

WORLD_SIZE = 3
CLASSNAMES = [f"class {i}" for i in range(7)]
TEMPLATES = ["a photo of a {}.", "a {} in the wild."]
OPTIONS = dict(batch_size=2)


def hash_tokenize(texts: list[str]) -> torch.Tensor:
    """A deterministic stand-in tokenizer (word hashes, then end-of-text): what is tested here is the
    sharding, and it keeps the heavy reference tokenizer out of the worker processes."""
    tokens = torch.zeros(len(texts), 77, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [zlib.crc32(word.encode()) % 49000 + 1 for word in text.split()][:76] + [49407]
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def _evaluate_all(root: str) -> dict:
    torch.manual_seed(0)
    model = tiny_model()
    calls = {"image": 0, "text": 0}
    for tower in ("image", "text"):
        encode = getattr(model, f"encode_{tower}")

        def counted(*args, _encode=encode, _tower=tower, **kwargs):
            calls[_tower] += 1
            return _encode(*args, **kwargs)

        setattr(model, f"encode_{tower}", counted)
    transform = image_transform_eval(32)
    folder = load_classification_set(f"{root}/folder", transform)
    shards = load_classification_set(f"{root}/shards/{{0..1}}.tar", transform, name="shards")
    captions = load_retrieval_set(f"{root}/captions/dataset_coco.json", transform, name="coco")
    metrics = {}
    for eval_set in (folder, shards):
        dataset, name = eval_set.dataset, eval_set.name
        metrics.update(evaluate_zero_shot(model, dataset, CLASSNAMES, TEMPLATES, hash_tokenize, name=name, **OPTIONS))
    metrics.update(evaluate(model, captions, hash_tokenize, **OPTIONS))
    features, labels = extract_image_features(model, folder.dataset, **OPTIONS)
    # Shard 1 of 0..2 is truncated: rank 1 cannot read it, the others must not wait for it.
    broken = load_classification_set(f"{root}/broken/{{0..2}}.tar", transform, name="broken")
    try:
        evaluate(model, broken, hash_tokenize, **OPTIONS)
        error = ""
    except RuntimeError as caught:
        error = str(caught)
    return {"metrics": metrics, "calls": calls, "features": features, "labels": labels, "error": error}


def test_sharded_evaluation_equals_single_process(tmp_path):
    rng = np.random.default_rng(0)
    write_image_folder(tmp_path / "folder", num_classes=7, per_class=2)
    (tmp_path / "folder" / "class_006" / "1.png").unlink()  # 13 images
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", classification_members(rng, [0, 1, 2, 3, 4], 0))
    write_tar(tmp_path / "shards" / "1.tar", classification_members(rng, [5, 6, 0], 5))
    (tmp_path / "shards" / "classnames.txt").write_text("\n".join(CLASSNAMES))
    write_caption_set(tmp_path / "captions", num_images=11)
    (tmp_path / "broken").mkdir()
    for index in range(3):
        write_tar(tmp_path / "broken" / f"{index}.tar", classification_members(rng, [0, 1, 2, 3]))
    shard = tmp_path / "broken" / "1.tar"
    shard.write_bytes(shard.read_bytes()[:1300])
    (tmp_path / "broken" / "classnames.txt").write_text("\n".join(CLASSNAMES))

    single = _evaluate_all(str(tmp_path))
    ranks = multiprocess.run_on_ranks(_evaluate_all, WORLD_SIZE, args=(str(tmp_path),), timeout_s=100)

    assert single["metrics"]["eval/folder_num_samples"] == 13 and single["metrics"]["eval/shards_num_samples"] == 8
    assert single["metrics"]["eval/coco_num_images"] == 11
    for rank, result in enumerate(ranks):
        # Discrete metrics are compared exactly. Batches differ between the runs, so features may
        # differ in the last bits; metrics would change only at a near-tie, which this data lacks.
        assert result["metrics"] == single["metrics"], f"rank {rank}"
        assert torch.equal(result["labels"], single["labels"])
        torch.testing.assert_close(result["features"], single["features"], rtol=0, atol=1e-6)
        assert result["calls"] == ranks[0]["calls"], f"rank {rank} made a different number of encoder calls"
    assert "cannot read eval shard" in single["error"] and "1.tar" in single["error"]
    assert "cannot read eval shard" in ranks[1]["error"] and "1.tar" in ranks[1]["error"]
    for rank in (0, 2):
        assert "failed on another rank" in ranks[rank]["error"], ranks[rank]["error"]
