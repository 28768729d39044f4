"""Trainer test fixtures: a tiny run config, an in-memory data source, and comparisons of two runs.

MemoryLoader is tiny, deterministic and world-size invariant: global batch t of an epoch holds a
fixed slice of a seeded permutation of the samples; rank r takes the r-th equal part of it. So the global batch at every step is the same whatever the world size,
which is what lets a 2-process run be compared with a 1-process run. Images of class c are noise
around a class pattern and captions are `[c + 1, eot]`, so the model can learn the pairing.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clip.hydra_config import compose_train_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# A run that takes a few seconds on one CPU thread: the real model code at its smallest.
TINY_IMAGE_SIZE = 32  # tiny-vit's
TINY_CONTEXT_LENGTH = 8
TINY_RUN = [
    "model=tiny-vit",
    f"model.text.context_length={TINY_CONTEXT_LENGTH}",
    "data.train_shards=unused",
    "global_batch_size=16",
    "max_steps=12",
    "precision=fp32",
    "num_threads=1",
    "deterministic=true",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "checkpoint.every_steps=4",
    "log.every_steps=1",
]


def tiny_train_config(output_dir, *overrides: str):
    return compose_train_config(CONFIG_DIR, [*TINY_RUN, f"output_dir={output_dir}", *overrides])


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps after its checkpoint)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "train/loss" in event:
            losses[event["step"]] = event["train/loss"]
    return losses


def assert_bitwise_equal_checkpoints(a: Path, b: Path) -> None:
    state_a, state_b = (torch.load(p / "train_state.pt", weights_only=True) for p in (a, b))
    assert state_a["counters"] == state_b["counters"]
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key
    optim_a, optim_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert optim_a.keys() == optim_b.keys()
    for name in optim_a:
        for key, value in optim_a[name].items():
            assert torch.equal(value, optim_b[name][key]), (name, key)
    for rank_file in sorted(p.name for p in a.glob("rank-*.pt")):
        rank_a, rank_b = (torch.load(p / rank_file, weights_only=True) for p in (a, b))
        assert rank_a["data"] == rank_b["data"], rank_file
        assert torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"]), rank_file


def load_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint) / "train_state.pt", weights_only=True)["model"]


class MemoryLoader:
    """clip.data's TrainLoader interface (iterate for batches, steps_per_epoch, state_dict) in memory."""

    def __init__(
        self,
        *,
        num_samples: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        image_size: int,
        context_length: int,
        eot_token_id: int = 49407,
        num_classes: int = 8,
        seed: int = 0,
        varied_captions: bool = False,
    ):
        generator = torch.Generator().manual_seed(1234)
        patterns = torch.randn(num_classes, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
        self.images = patterns[self.labels] + 0.5 * torch.randn(num_samples, 3, image_size, image_size, generator=generator)
        self.texts = torch.zeros(num_samples, context_length, dtype=torch.long)
        self.texts[:, 0] = self.labels + 1
        self.texts[:, 1] = eot_token_id
        if varied_captions:  # the class token, then 0 to context_length - 2 random words, then end-of-text
            lengths = torch.randint(2, context_length + 1, (num_samples,), generator=generator)
            words = torch.randint(num_classes + 1, 1000, (num_samples, context_length), generator=generator)
            positions = torch.arange(context_length)
            self.texts = torch.where(positions < lengths[:, None] - 1, words, 0)
            self.texts[:, 0] = self.labels + 1
            self.texts[torch.arange(num_samples), lengths - 1] = eot_token_id
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch_size
        self.epoch = 0
        self.next_batch = 0

    def __iter__(self):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        while self.next_batch < self.steps_per_epoch:
            start = self.next_batch * self.global_batch_size + self.rank * self.local_batch_size
            index = order[start : start + self.local_batch_size]
            self.next_batch += 1
            yield SimpleNamespace(images=self.images[index], texts=self.texts[index], skipped={})
        self.epoch += 1
        self.next_batch = 0

    def finish_images(self, images: torch.Tensor) -> torch.Tensor:
        return images  # the images are model inputs already

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]


def use_memory_data(
    patch: pytest.MonkeyPatch, num_samples: int = 256, context_length: int = TINY_CONTEXT_LENGTH,
    varied_captions: bool = False,
) -> None:
    """Make clip.train read MemoryLoader batches instead of shards (undone when `patch` is)."""
    import clip.train

    def build_train_loader(data_cfg, *, batch_size, image_transform, tokenize, rank, world_size, seed):
        return MemoryLoader(
            num_samples=num_samples, global_batch_size=batch_size * world_size, rank=rank, world_size=world_size,
            image_size=TINY_IMAGE_SIZE, context_length=context_length, seed=seed, varied_captions=varied_captions,
        )

    patch.setattr(clip.train, "build_train_loader", build_train_loader)
    patch.setattr(clip.train, "check_train_data", lambda data_cfg, world_size: None)
