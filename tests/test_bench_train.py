"""scripts/bench_train.py runs, and compares like with like: OpenCLIP's step trains the same network."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from clip.models.text_packing import get_text_lengths
from tests.data_shards import make_shards

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


COMMON = ["--model", "tiny-vit", "--batch", "8", "--steps", "2", "--warmup", "2", "--threads", "1", "--device", "cpu"]


@pytest.mark.parametrize("captions", ["uniform", "web"])
def test_openclip_step_trains_the_same_network_on_the_same_batch(bench, capsys, captions):
    # Ours packs the captions (the trainer's default), OpenCLIP pads them: the same arithmetic.
    ours, theirs = bench.main([*COMMON, "--precision", "fp32", "--open-clip", "--caption-lengths", captions])
    # Same weights, batch and loss: the first losses agree to float32 rounding, and so do the second
    # ones, after one AdamW update with the same hyperparameters, clipping and decay groups.
    assert ours.warmup_losses[0] == pytest.approx(theirs.warmup_losses[0], rel=1e-6)
    assert ours.warmup_losses[1] == pytest.approx(theirs.warmup_losses[1], rel=1e-5)
    assert ours.warmup_losses[1] != pytest.approx(ours.warmup_losses[0], rel=1e-3)  # the update did change the model
    assert len(ours.seconds) == len(theirs.seconds) == 2 and all(t > 0 for t in ours.seconds + theirs.seconds)
    output = capsys.readouterr().out
    assert "step time ratio ours/OpenCLIP" in output and "text packing: our text tower computes" in output


def test_web_caption_lengths_look_like_alt_texts(bench):
    args = bench.argparse.Namespace(model="ViT-B-32", batch=4096, precision="fp32", compile=False,
                                    grad_checkpointing=False, text_packing_groups=8)  # fmt: skip
    cfg = bench.build_config(args)
    cfg.model.vision.image_size = 1  # only the captions matter here
    _, texts = bench.synthetic_batch(cfg, bench.torch.device("cpu"), "web")
    lengths = get_text_lengths(texts, cfg.model.text.eot_token_id).float()
    # scripts/bench_tokenizer.py's alt-texts: mean 21.4 tokens, median 17, 90th percentile 41.
    assert 20 < lengths.mean() < 23 and lengths.median() == 17 and 38 <= lengths.quantile(0.9) <= 44
    assert ((texts == cfg.model.text.eot_token_id).sum(dim=1) == 1).all()


def test_real_shards_report_the_data_wait_share(bench, tmp_path, capsys):
    make_shards(str(tmp_path), num_shards=2, per_shard=16)
    (result,) = bench.main([*COMMON, "--precision", "bf16", "--shards", str(tmp_path / "shard-{000..001}.tar"),
                            "--workers", "0"])  # fmt: skip
    assert 0.0 < result.data_wait < 1.0 and math.isfinite(result.first_loss)
    assert "real shards" in capsys.readouterr().out
