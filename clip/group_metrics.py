"""DataComp's metrics that need each sample's metadata: iWildCam's macro F1, FMoW's and GeoDE's
worst-region top-1 and Dollar Street's worst-income-group top-5.

DataComp's WebDataset exports of these tasks (`wds_wilds-iwildcam_test/`, `wds_wilds-fmow_test/`,
`wds_geode_test/`, `wds_dollar_street_test/`) carry beside each sample's `cls` label an `npy` row
of integer metadata, whose columns are the WILDS-style fields DataComp's evaluators declare
(`METADATA_TASKS`). DataComp scores the zero-shot predictions with WILDS's metrics:

- `macro_f1` (its `F1-macro_all`): the mean over the classes present in the labels of each class's
  F1, i.e. scikit-learn's `f1_score(average="macro", labels=np.unique(y_true))`: a class that is
  predicted but never the label does not count as a class with F1 0.
- `worst_<group>_top<k>` (its `acc_worst_region`, `acc_wg`, `acc_top5_wg`): the samples are grouped
  by the integer value of one metadata column, each group's top-k accuracy is computed, and the
  lowest among the groups with samples is reported. DataComp's FMoW evaluator means to leave out
  WILDS's "Other" region, but it matches the name in a group label that holds only the region's
  number, so every region counts; so it is here, which gives DataComp's number.

Each group's accuracy and size are reported too (`top1_region3`, `num_region3`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clip.data.eval_shards import TarEvalDataset, read_sample_metadata


@dataclass(frozen=True)
class MetadataTask:
    fields: tuple[str, ...]  # the columns of a sample's npy row, in order (DataComp's metadata fields)
    main_metric: str
    group_by: str | None = None  # the column whose value is a sample's group (None: macro F1)
    k: int = 1  # top-k accuracy per group


METADATA_TASKS = {
    "iwildcam": MetadataTask(
        ("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"), "macro_f1"
    ),
    "fmow": MetadataTask(("region", "year", "y"), "worst_region_top1", "region"),
    "geode": MetadataTask(("region", "country"), "worst_region_top1", "region"),
    "dollar_street": MetadataTask(("income_ds", "income_meta", "region"), "worst_income_group_top5", "income_ds", k=5),
}


def macro_f1(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean F1 over the classes present in `target` (WILDS's and so DataComp's macro F1)."""
    scores = []
    for label in np.unique(target):
        true_positives = np.sum((predicted == label) & (target == label))
        false_positives = np.sum((predicted == label) & (target != label))
        false_negatives = np.sum((predicted != label) & (target == label))
        scores.append(2 * true_positives / (2 * true_positives + false_positives + false_negatives))
    return float(np.mean(scores))


def group_accuracies(hits: np.ndarray, groups: np.ndarray) -> dict[int, tuple[float, int]]:
    """{group: (fraction of its samples that are hits, its sample count)} for each group present."""
    return {int(g): (float(hits[groups == g].mean()), int(np.sum(groups == g))) for g in np.unique(groups)}


def _group_column(task_name: str, task: MetadataTask, rows: np.ndarray) -> np.ndarray:
    if rows.shape[1] != len(task.fields):
        raise ValueError(
            f"{task_name}: metadata rows have {rows.shape[1]} columns, but DataComp's {task_name} export has "
            f"{len(task.fields)} ({', '.join(task.fields)})"
        )
    column = rows[:, task.fields.index(task.group_by)]
    if np.any(column < 0) or np.any(column != np.round(column)):
        raise ValueError(f"{task_name}: the {task.group_by!r} metadata column holds values that are not group numbers")
    return column.astype(np.int64)


def metadata_metrics(
    task_name: str, topk: np.ndarray, target: np.ndarray, labels: np.ndarray, rows: np.ndarray
) -> dict[str, Any]:
    """The task's metrics from the predicted classes `topk` [N, k] (best first) and labels `target` [N]
    of the evaluation, and the `labels` [N] and metadata `rows` [N, F] read from the export. Both
    must be the same samples in the same order: the labels are compared, sample by sample."""
    task = METADATA_TASKS[task_name]
    if len(labels) != len(target) or np.any(labels != target):
        first = next((i for i, (a, b) in enumerate(zip(labels, target)) if a != b), min(len(labels), len(target)))
        raise ValueError(
            f"{task_name}: the metadata of {len(labels)} samples does not line up with the {len(target)} evaluated "
            f"(first difference at sample {first}; an image that could not be read was skipped?)"
        )
    if "y" in task.fields and np.any(rows[:, task.fields.index("y")] != labels):
        raise ValueError(f"{task_name}: the metadata's 'y' column is not the samples' labels: not its metadata layout")
    if task.group_by is None:
        return {task.main_metric: macro_f1(topk[:, 0], target)}
    field = "income_group" if task.group_by == "income_ds" else task.group_by
    hits = (topk[:, : task.k] == target[:, None]).any(axis=1)
    per_group = group_accuracies(hits, _group_column(task_name, task, rows))
    metrics: dict[str, Any] = {task.main_metric: min(accuracy for accuracy, _ in per_group.values())}
    for group, (accuracy, count) in per_group.items():
        metrics[f"top{task.k}_{field}{group}"] = accuracy
        metrics[f"num_{field}{group}"] = count
    return metrics


def evaluate_metadata_task(task_name: str, dataset: TarEvalDataset, predictions: dict[str, torch.Tensor]) -> dict:
    """`metadata_metrics` of a zero-shot evaluation of `dataset` (`predictions` from `evaluate_zero_shot`)."""
    labels, rows = read_sample_metadata(dataset)
    return metadata_metrics(task_name, predictions["topk"].numpy(), predictions["target"].numpy(), labels, rows)
