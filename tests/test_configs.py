"""Configs: every recipe composes into the typed TrainConfig; mistakes fail before any work, naming the key.

Compositions use Hydra's compose API in-process; the exit-code checks run the real entry point
(docs/guarantees.md: config errors first, no secrets stored).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip.config import ConfigError, TrainConfig
from clip.hydra_config import compose_train_config
from clip.models.registry import get_model_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_the_recipes_the_issue_names_exist():
    assert {"smoke", "rn50", "vit_b32", "vit_b16", "vit_l14"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_the_typed_config(experiment, tmp_path):
    cfg = compose_train_config(CONFIG_DIR, [f"+experiment={experiment}", f"output_dir={tmp_path}",
                                            "data.train_shards='/shards/{0..9}.tar'"])
    assert isinstance(cfg, TrainConfig)
    # The architecture is the registry's entry of that name, field for field.
    registered = get_model_config(cfg.model.name)
    assert cfg.model.vision == registered.vision or experiment == "smoke"
    header = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()[:12]
    assert any("scripts/train.py +experiment=" + experiment in line for line in header), "header names the command"
    assert any("Expected" in line for line in (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines())


def test_vit_l14_is_the_papers_recipe(tmp_path):
    cfg = compose_train_config(CONFIG_DIR, ["+experiment=vit_l14", f"output_dir={tmp_path}", "data.train_shards=x"])
    assert cfg.model.name == "ViT-L-14" and cfg.model.vision.width == 1024 and cfg.model.vision.patch_size == 14
    assert cfg.global_batch_size == 32768
    o = cfg.optim
    assert (o.betas, o.eps, o.weight_decay, o.lr, o.schedule) == ([0.9, 0.98], 1e-6, 0.2, 4e-4, "cosine")
    assert o.warmup_steps == 2000 and cfg.max_steps * cfg.global_batch_size >= 32 * 400_000_000


def test_model_fields_can_be_overridden_with_type_checks(tmp_path):
    cfg = compose_train_config(CONFIG_DIR, ["model=ViT-B-16", "model.vision.image_size=384", f"output_dir={tmp_path}",
                                            "data.train_shards=x", "max_steps=1"])
    assert cfg.model.name == "ViT-B-16" and cfg.model.vision.image_size == 384 and cfg.model.vision.patch_size == 16
    with pytest.raises(ConfigError, match=r"model.vision.image_size: Value 'big'"):
        compose_train_config(CONFIG_DIR, ["model.vision.image_size=big", f"output_dir={tmp_path}", "max_steps=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", r"optim.lrr.*did you mean optim.lr\?"),
        ("+optim.lrr=0.1", r"optim.lrr is not a config key \(did you mean optim.lr\?\)"),
        ("optim.lr=abc", r"optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
        ("eval.zero_shot=/data/val", r"eval.zero_shot: .* \(eval.zero_shot takes a list: eval.zero_shot=\[a,b\]\)$"),
        ("checkpoint.keep_last=1", r"checkpoint.keep_last=1 must be >= 2"),
        ("precision=fp8", r"precision='fp8' is not one of"),
        ("model.name=ViT-L-14", r"use model=ViT-L-14"),
        ("log.run_name=../../etc", r"log.run_name='../../etc' may hold only"),
        ("log.run_name=ok/../../etc", r"log.run_name='ok/../../etc' may hold only"),
        ("+wandb.api_key=abc", r"wandb.api_key: configs must not hold credentials"),
        ("+log.hf_token=abc", r"log.hf_token: configs must not hold credentials"),
        ("+data.aws_secret_access_key=abc", r"data.aws_secret_access_key: configs must not hold credentials"),
        ("+db.password=abc", r"db.password: configs must not hold credentials"),
        # What bash passes on for data.train_shards='/data/{000..003}.tar': Hydra's grammar refuses
        # the braces, and the message shows the quoting that works.
        ("data.train_shards=/data/{000..003}.tar",
         r"cannot parse the override 'data.train_shards=/data/\{000..003\}.tar': mismatched input '\{'.*; "
         r"quote the value for Hydra inside the shell's quotes: \"data.train_shards='/data/\{000..003\}.tar'\"$"),
        ("optim.betas=[0.9,0.98", r"cannot parse the override 'optim.betas=\[0.9,0.98': [^;]*$"),
        ("+experiment=vitb32", r"^experiment=vitb32 does not exist \(did you mean experiment=vit_b32\?\); "
                               rf"experiment options: {', '.join(EXPERIMENTS)}$"),
        ("loss=xyz", r"^loss=xyz does not exist; loss options: clip, siglip$"),
        # The key alone switches the loss but not the model's initial bias and temperature.
        ("loss.name=siglip", r"loss.name='siglip' needs a learned bias: .* or select the loss group with loss=siglip"),
    ],
)
def test_config_mistakes_name_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        compose_train_config(CONFIG_DIR, [f"output_dir={tmp_path}", "data.train_shards=x", "max_steps=1", override])


def test_a_missing_required_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_shards is required"):
        compose_train_config(CONFIG_DIR, [f"output_dir={tmp_path}", "max_steps=1"])


def _run_entry_point(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=0.1", "did you mean optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("checkpoint.keep_last=1", "checkpoint.keep_last"),
        ("+wandb.api_key=abc", "wandb.api_key"),
        ("data.train_shards='/nonexistent/{000..003}.tar'", "data.train_shards"),  # checked by train()
    ],
)
def test_the_entry_point_exits_2_before_any_side_effect(tmp_path, override, key):
    start = time.monotonic()
    result = _run_entry_point("+experiment=vit_b32", "output_dir=run", "data.train_shards=x", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and time.monotonic() - start < 60
    assert "abc" not in result.stderr or "api_key" not in override  # a secret is never echoed
    assert list(tmp_path.iterdir()) == []  # no run directory, no .hydra/


def test_multirun_is_refused_before_hydra_writes_anything(tmp_path):
    # A sweep would skip the up-front checks and write every override, a secret too, to multirun.yaml.
    result = _run_entry_point("-m", "+experiment=vit_b32", "output_dir=run", "data.train_shards=x",
                              "optim.lr=1e-3,2e-3", "+wandb.api_key=abc", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "multirun (-m, hydra.mode=MULTIRUN) is not supported: launch one run per setting" in result.stderr
    assert "abc" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=r"multirun .* is not supported"):
        compose_train_config(CONFIG_DIR, [f"output_dir={tmp_path}", "data.train_shards=x", "hydra.mode=MULTIRUN"])


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = _run_entry_point("+experiment=vit_l14", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: ViT-L-14" in result.stdout and "global_batch_size: 32768" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_help_starts_with_the_commands_a_new_user_needs(tmp_path):
    result = _run_entry_point("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Train a CLIP model") and "+experiment=smoke output_dir=runs/smoke" in result.stdout
    assert f"experiment: {', '.join(EXPERIMENTS)}" in result.stdout  # Hydra's group listing follows
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "scale, model, batch, lr, samples, warmup, beta2",
    [  # DataComp's fixed recipes (mlfoundations/datacomp, scale_configs.py)
        ("small", "ViT-B-32", 4096, 5e-4, 12_800_000, 500, 0.98),
        ("medium", "ViT-B-32", 4096, 5e-4, 128_000_000, 500, 0.98),
        ("large", "ViT-B-16", 8192, 5e-4, 1_280_000_000, 500, 0.98),
        ("xlarge", "ViT-L-14", 90112, 1e-3, 12_800_000_000, 10000, 0.95),
    ],
)
def test_datacomp_recipes_are_datacomps(scale, model, batch, lr, samples, warmup, beta2, tmp_path):
    cfg = compose_train_config(CONFIG_DIR, [f"+experiment=datacomp_{scale}", f"output_dir={tmp_path}",
                                            "data.train_shards=x", "data.subset=keep.npy"])
    assert (cfg.model.name, cfg.global_batch_size, cfg.optim.lr, cfg.optim.warmup_steps) == (model, batch, lr, warmup)
    assert cfg.optim.betas == [0.9, beta2] and cfg.optim.weight_decay == 0.2 and cfg.data.resampled
    assert 0 <= cfg.max_steps * batch - samples < batch and cfg.data.subset == "keep.npy"
