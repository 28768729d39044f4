"""scripts/zero_shot.py end to end: run directory -> export, every task, table and JSON output.
(tests/test_train_smoke.py evaluates a real run's export in a subprocess.)"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import open_clip
import pytest

import clip
from clip.data.eval_datasets import load_classification_set
from clip.transforms import image_transform_eval
from clip.zero_shot import evaluate
from tests.eval_fixtures import (  # noqa: F401
    classification_members,
    image_bytes,
    one_thread,
    tiny_model,
    write_caption_set,
    write_image_folder,
    write_tar,
    zero_shot_script,
)


@pytest.fixture
def script():
    return zero_shot_script()


@pytest.fixture
def loaded(monkeypatch):
    """A clip.load stand-in that records what it was asked to load: a seeded tiny model."""
    model = tiny_model()
    calls = []

    def load(name_or_path, device="cpu", download_root=None):
        calls.append(name_or_path)
        return model, image_transform_eval(32)

    monkeypatch.setattr(clip, "load", load, raising=False)
    return model, calls


def test_zero_shot_on_a_run_directory(tmp_path, script, loaded, capsys):
    model, calls = loaded
    (tmp_path / "runs" / "smoke" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "smoke" / "model.safetensors").touch()  # where the trainer exports
    write_image_folder(tmp_path / "heldout", num_classes=6, per_class=2, templates=["a {} photo."])
    write_image_folder(tmp_path / "other", num_classes=5, per_class=1, seed=1)
    output = tmp_path / "results"
    results = script.main(
        [
            "--model",
            str(tmp_path / "runs" / "smoke"),
            "--data",
            str(tmp_path / "heldout"),
            str(tmp_path / "other"),
            "--workers",
            "0",
            "--output",
            str(output),
        ]
    )

    assert calls == [str(tmp_path / "runs" / "smoke" / "model.safetensors")]
    written = json.loads((output / "results.json").read_text())
    assert {name: entry["metrics"] for name, entry in written["sets"].items()} == results
    assert written["task"] == "zero-shot" and written["precision"] == "fp32" and written["batch_size"] == 64
    assert written["checkpoint_sha256"] == hashlib.sha256(b"").hexdigest()  # the (empty) export's
    heldout = written["sets"]["heldout"]
    assert heldout["templates"] == ["a {} photo."] and heldout["main_metric"] == "top1"
    assert heldout["fingerprint"]["num_samples"] == 12 and heldout["fingerprint"]["num_classes"] == 6
    assert {p.name for p in output.iterdir()} == {
        "results.json",
        "results.csv",
        "results.md",
        "results.png",
        "predictions",
    }
    assert "| heldout | top1 |" in (output / "results.md").read_text() and "fp32" in (output / "results.md").read_text()
    # The script's numbers are the library's (the trainer's eval hook) on the same set, with the
    # reference tokenizer.
    eval_set = load_classification_set(tmp_path / "heldout", image_transform_eval(32))
    expected = evaluate(model, eval_set, open_clip.tokenize)
    assert results["heldout"] == {key.removeprefix("eval/heldout_"): value for key, value in expected.items()}
    assert results["other"]["num_samples"] == 5
    table = capsys.readouterr().out
    assert "set" in table and "heldout" in table and "mean_per_class_recall" in table


def test_a_run_directory_without_its_export_is_a_clear_error(tmp_path, script, loaded, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", str(tmp_path / "run"), "--data", str(tmp_path), "--output", str(tmp_path / "r.json")])
    assert "is a training run without model.safetensors" in str(exit_info.value.code)
    assert loaded[1] == []


def test_retrieval_and_linear_probe_tasks(tmp_path, script, loaded):
    captions = write_caption_set(tmp_path / "coco", num_images=6)
    results = script.main(
        [
            "--task",
            "retrieval",
            "--model",
            "tiny-vit",
            "--data",
            str(captions),
            "--name",
            "coco",
            "--workers",
            "0",
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    assert results["coco"]["num_images"] == 6 and "text_retrieval_recall@10" in results["coco"]

    write_image_folder(tmp_path / "pets" / "train", num_classes=3, per_class=4)
    write_image_folder(tmp_path / "pets" / "test", num_classes=3, per_class=2, seed=1)
    results = script.main(
        [
            "--task",
            "linear-probe",
            "--model",
            "tiny-vit",
            "--data",
            str(tmp_path / "pets" / "test"),
            "--train-data",
            str(tmp_path / "pets" / "train"),
            "--workers",
            "0",
            "--output",
            str(tmp_path / "l"),
        ]
    )
    # a split directory is named by its parent
    assert results["pets"]["linear_probe_num_samples"] == 6 and "linear_probe_l2" in results["pets"]


def test_name_needs_a_single_data_argument(script):
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "m", "--data", "a", "b", "--name", "x"])


def test_a_wrong_data_path_fails_before_any_set_is_evaluated(tmp_path, script, loaded, monkeypatch):
    """A typo in the last --data path is a one-line error naming it, not a traceback after the
    first set has run."""
    evaluated = []
    monkeypatch.setattr(script, "evaluate_zero_shot", lambda *args, **kwargs: evaluated.append(args) or {})
    write_image_folder(tmp_path / "heldout", num_classes=3, per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "--model",
                "tiny-vit",
                "--data",
                str(tmp_path / "heldout"),
                str(tmp_path / "imagenett"),
                "--workers",
                "0",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
    message = str(exit_info.value.code)
    assert message.startswith(f"error: --data {tmp_path / 'imagenett'}: ") and "is not a directory" in message
    assert evaluated == [] and not (tmp_path / "r.json").exists()


def test_two_sets_with_one_name_are_refused_before_any_work(tmp_path, script, loaded, monkeypatch):
    """ImageNet val and Sketch are both WordNet-id folders: named by the path, never by the class table."""
    evaluated = []
    monkeypatch.setattr(script, "evaluate_zero_shot", lambda *args, **kwargs: evaluated.append(args) or {})
    rng = np.random.default_rng(0)
    for root in ("imagenet/val", "imagenet-sketch/sketch"):
        (tmp_path / root / "n01440764").mkdir(parents=True)
        (tmp_path / root / "n01440764" / "1.JPEG").write_bytes(image_bytes(rng, "JPEG"))
    both = script.main(
        [
            "--model",
            "tiny-vit",
            "--data",
            str(tmp_path / "imagenet" / "val"),
            str(tmp_path / "imagenet-sketch" / "sketch"),
            "--workers",
            "0",
            "--output",
            str(tmp_path / "r"),
        ]
    )
    assert set(both) == {"imagenet", "sketch"} and len(evaluated) == 2
    evaluated.clear()
    # the same directory name twice, and the fix: name=path
    for root in ("x/heldout", "y/heldout"):
        write_image_folder(tmp_path / root, num_classes=2, per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "--model",
                "tiny-vit",
                "--data",
                str(tmp_path / "x" / "heldout"),
                str(tmp_path / "y" / "heldout"),
                "--workers",
                "0",
                "--output",
                str(tmp_path / "r2"),
            ]
        )
    assert "two eval sets are named 'heldout'" in str(exit_info.value.code) and "name=path" in str(exit_info.value.code)
    assert evaluated == [] and not (tmp_path / "r2").exists()
    results = script.main(
        [
            "--model",
            "tiny-vit",
            "--data",
            f"one={tmp_path / 'x' / 'heldout'}",
            f"two={tmp_path / 'y' / 'heldout'}",
            "--workers",
            "0",
            "--output",
            str(tmp_path / "r2"),
        ]
    )
    assert set(results) == {"one", "two"}


def test_a_failing_set_leaves_the_others_results_written(tmp_path, script, loaded):
    write_image_folder(tmp_path / "first", num_classes=3, per_class=1)
    write_image_folder(tmp_path / "second", num_classes=3, per_class=1, seed=1)
    # the third set: a shard cut inside a member, found only when its images are read
    (tmp_path / "third").mkdir()
    shard = write_tar(tmp_path / "third" / "0.tar", classification_members(np.random.default_rng(0), [0, 1, 2]))
    shard.write_bytes(shard.read_bytes()[:1500])
    (tmp_path / "third" / "classnames.txt").write_text("a\nb\nc\n")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "--model",
                "tiny-vit",
                "--data",
                str(tmp_path / "first"),
                str(tmp_path / "third"),
                str(tmp_path / "second"),
                "--workers",
                "0",
                "--output",
                str(output),
            ]
        )
    assert "1 set(s) failed (third)" in str(exit_info.value.code)
    written = json.loads((output / "results.json").read_text())
    assert set(written["sets"]) == {"first", "second"} and written["sets"]["second"]["metrics"]["num_samples"] == 3
    assert "cannot read eval shard" in written["failed"]["third"]
    assert "FAILED: RuntimeError" in (output / "results.md").read_text()


def test_a_linear_probe_without_a_train_split_names_it(tmp_path, script, loaded):
    write_image_folder(tmp_path / "test", num_classes=3, per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "--task",
                "linear-probe",
                "--model",
                "tiny-vit",
                "--data",
                str(tmp_path / "test"),
                "--train-data",
                str(tmp_path / "train"),
                "--workers",
                "0",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
    assert str(exit_info.value.code).startswith(f"error: --train-data {tmp_path / 'train'} (split 'train'): ")


def test_a_directory_that_is_no_checkpoint_is_a_clear_error(tmp_path, script):
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "--model",
                str(tmp_path / "not-a-run"),
                "--data",
                str(tmp_path),
                "--device",
                "cpu",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
    assert str(exit_info.value.code).startswith(f"error: --model {tmp_path / 'not-a-run'}: ")
    assert "config.json" in str(exit_info.value.code)


def test_released_weights_are_looked_up_in_download_root(tmp_path, script):
    # Offline (conftest blocks the network), an absent file names the directory it was looked for in.
    with pytest.raises(SystemExit) as exit_info:
        script.main(
            [
                "--model",
                "ViT-B/32",
                "--download-root",
                str(tmp_path / "weights"),
                "--data",
                str(tmp_path),
                "--device",
                "cpu",
                "--output",
                str(tmp_path / "r.json"),
            ]
        )
    message = str(exit_info.value.code)
    assert message.startswith("error: --model ViT-B/32: ")
    assert f"put it at {tmp_path / 'weights' / 'ViT-B-32.pt'}" in message


def test_a_benchmark_by_name_is_recorded_with_its_metric_and_templates(tmp_path, script, loaded, monkeypatch):
    import clip.benchmarks

    monkeypatch.setattr(clip.benchmarks, "get_templates", lambda name: ["a photo of a {}."])  # 1000 prompts, not 80k
    rng = np.random.default_rng(0)
    for number in ("3", "10"):
        (tmp_path / "v2" / number).mkdir(parents=True)
        (tmp_path / "v2" / number / "a.jpeg").write_bytes(image_bytes(rng, "JPEG"))
    results = script.main(
        [
            "--model",
            "tiny-vit",
            "--benchmark",
            "imagenet-v2",
            "--data",
            str(tmp_path / "v2"),
            "--workers",
            "0",
            "--precision",
            "bf16",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    entry = written["sets"]["imagenet-v2"]
    assert results["imagenet-v2"]["num_samples"] == 2 and entry["fingerprint"]["num_classes"] == 1000
    assert entry["templates"] == ["a photo of a {}."] and written["precision"] == "bf16"
    assert "precision bf16" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "m", "--suite", "imagenet-shifts", "--data", "/d", "--task", "retrieval"])
