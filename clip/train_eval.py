"""Evaluation during training: the `eval.zero_shot` sets, evaluated every `eval.every_steps` and at the end.

The sets are opened before the run has side effects, so a wrong path is a config error. Every rank
takes part in an evaluation (clip.zero_shot shards the images across ranks).
"""

from __future__ import annotations

from torch import nn

from clip.config import ConfigError, TrainConfig
from clip.data.eval_datasets import check_unique_names, load_classification_set, split_named_path
from clip.logger import MetricsLogger
from clip.models import CLIP
from clip.parallelize import apply_tower_lock
from clip.precision import autocast_dtype
from clip.train_metrics import eval_line
from clip.transforms import image_transform_eval
from clip.zero_shot import evaluate


def load_eval_sets(paths: list[str], image_size: int) -> list:
    """The `eval.zero_shot` sets (`path` or `name=path`), opened before the run has side effects: a
    wrong path, an unreadable format or two sets with one name is a config error naming the key, not a
    traceback (or one metric silently overwriting another) after the run directory exists."""
    eval_transform = image_transform_eval(image_size)
    try:
        eval_sets = []
        for spec in paths:
            name, path = split_named_path(spec)
            eval_sets.append(load_classification_set(path, eval_transform, name=name))
        check_unique_names(eval_sets)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"eval.zero_shot: {error}") from None
    return eval_sets


class TrainEvaluator:
    """Zero-shot metrics of every `eval.zero_shot` set, logged (all ranks take part; clip.zero_shot)."""

    def __init__(
        self,
        cfg: TrainConfig,
        eval_sets: list,
        module: nn.Module,
        model: CLIP,
        tokenize,
        device,
        metrics_logger: MetricsLogger,
    ):
        self.cfg, self.eval_sets, self.module, self.model, self.tokenize = cfg, eval_sets, module, model, tokenize
        self.device, self.metrics_logger = device, metrics_logger
        self.metrics: dict[str, float] = {}  # the last evaluation's

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(self.eval_sets and every and step % every == 0)

    def __call__(self, step: int) -> None:
        # FSDP2: the root's own parameters (embeddings, projections) are gathered in its forward hook,
        # which eval bypasses by calling the encoders directly; gather them for the duration.
        unshard = getattr(self.module, "unshard", None)
        if unshard is not None:
            unshard()
        try:
            metrics: dict[str, float] = {}
            for eval_set in self.eval_sets:
                metrics.update(evaluate(self.model, eval_set, self.tokenize, batch_size=self.cfg.eval.batch_size,
                                        device=self.device, autocast_dtype=autocast_dtype(self.cfg.precision)))  # fmt: skip
        finally:
            if unshard is not None:
                self.module.reshard()
        apply_tower_lock(self.model, lock_image=self.cfg.lock_image, lock_text=self.cfg.lock_text)  # eval() undid it
        self.metrics = metrics
        self.metrics_logger.log(step, metrics)
        self.metrics_logger.print(eval_line(step, metrics))
