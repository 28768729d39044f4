"""The README's first command, shortened: `python scripts/train.py +experiment=smoke` on fresh synthetic
shards learns far above chance in zero-shot classification of held-out images, ends by printing
that result, and `scripts/zero_shot.py` on the run directory (its export) gives exactly the numbers
the trainer logged. The full-length run reaches about 0.9 top-1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import clip.train as train_module
from clip.data.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return result


def test_a_short_smoke_run_learns_and_its_export_evaluates_to_the_logged_accuracy(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=4000, samples_per_shard=500, images_per_class=20)
    run_dir = tmp_path / "run"
    trained = run_script(
        "train.py", "+experiment=smoke", f"output_dir={run_dir}", "synthetic_data=",
        f"data.train_shards='{data.train_shards}'", f"eval.zero_shot=[{data.zeroshot_dir}]", "num_epochs=0",
        "max_steps=100", "eval.every_steps=0", "checkpoint.every_steps=0",
    )
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = logged[-1]
    assert final["step"] == 100 and "eval/zeroshot_top1" in final
    top1, chance = final["eval/zeroshot_top1"], 1 / data.num_classes
    assert top1 >= 0.3 > 3 * chance, f"zero-shot top-1 {top1:.3f} after 100 steps"
    losses = [event["train/loss"] for event in logged if "train/loss" in event]
    assert losses[-1] < losses[0] - 1.0
    assert trained.stdout.splitlines()[-1] == f"final zero-shot top-1 on zeroshot: {top1:.3f} (chance 0.083, 12 classes)"

    # The smoke recipe trains in fp32, the script's default precision.
    output = tmp_path / "eval"
    run_script("zero_shot.py", "--model", str(run_dir), "--data", data.zeroshot_dir, "--output", str(output))
    evaluated = json.loads((output / "results.json").read_text())
    assert evaluated["loaded"] == str(run_dir / "model.safetensors")
    logged_metrics = {key.removeprefix("eval/zeroshot_"): value for key, value in final.items() if key.startswith("eval/")}
    assert evaluated["sets"]["zeroshot"]["metrics"] == logged_metrics


def test_the_smoke_data_is_written_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("clip.data.synthetic.write_synthetic_dataset", lambda directory: calls.append(directory))
    train_module._prepare_synthetic_data(str(tmp_path), world_size=1)
    assert calls == [str(tmp_path)]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "sizes.json").write_text("{}")
    train_module._prepare_synthetic_data(str(tmp_path), world_size=1)
    assert len(calls) == 1
