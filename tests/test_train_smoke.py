"""The whole pipeline learns: a short run of the smoke recipe on fresh synthetic shards beats chance
by a wide margin in zero-shot classification of held-out images (`python scripts/train.py
+experiment=smoke` is the full-length version: about 0.75 top-1)."""

from __future__ import annotations

import json
from pathlib import Path

import clip.train as train_module
from clip.data.synthetic import write_synthetic_dataset
from clip.hydra_config import compose_train_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def test_a_short_smoke_run_learns_far_above_chance(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=4000, samples_per_shard=500, images_per_class=20)
    run_dir = tmp_path / "run"
    cfg = compose_train_config(CONFIG_DIR, [
        "+experiment=smoke", f"output_dir={run_dir}", "synthetic_data=", f"data.train_shards='{data.train_shards}'",
        f"eval.zero_shot=[{data.zeroshot_dir}]", "num_epochs=0", "max_steps=100", "eval.every_steps=0",
        "checkpoint.every_steps=0",
    ])
    result = train_module.train(cfg)
    top1 = result.metrics["eval/zeroshot_top1"]
    chance = 1 / data.num_classes
    assert top1 >= 0.3 > 3 * chance, f"zero-shot top-1 {top1:.3f} after 100 steps"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == {"step": 100, **result.metrics}
    losses = [event["train/loss"] for event in logged if "train/loss" in event]
    assert losses[-1] < losses[0] - 1.0


def test_the_smoke_data_is_written_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("clip.data.synthetic.write_synthetic_dataset", lambda directory: calls.append(directory))
    train_module._prepare_synthetic_data(str(tmp_path), world_size=1)
    assert calls == [str(tmp_path)]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "sizes.json").write_text("{}")
    train_module._prepare_synthetic_data(str(tmp_path), world_size=1)
    assert len(calls) == 1
