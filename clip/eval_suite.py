"""Several eval sets as one evaluation: a suite's benchmarks found under a data root, run one after
another so that a set that is absent is skipped with a line and a set that fails never stops the
others; each finished set goes to the results directory at once (`clip.eval_results`).

Suites:
- `imagenet-shifts`: ImageNet-1k and its shifts V2, R, A, Sketch, ObjectNet, with the shifts' mean
  main metric, its gap to ImageNet's top-1 and, given baseline models, the effective robustness.
- `clip-paper`: the datasets of the CLIP paper's zero-shot table that have a local layout or a
  CLIP_benchmark export, with their mean.
- `datacomp`: DataComp's 38 evaluation tasks (its tasklist.yml, shipped as datacomp_tasks.json),
  read from its WebDataset downloads (`wds_<task>_test/`), with their main metrics (those over
  per-sample metadata: `clip.group_metrics`) and DataComp's averages over the tasks evaluated.
"""

from __future__ import annotations

import functools
import json
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from clip.benchmarks import BENCHMARKS, get_benchmark, load_benchmark
from clip.data.eval_datasets import Transform, load_export
from clip.robustness import IMAGENET_SHIFTS, Baseline, effective_robustness

log = logging.getLogger(__name__)

_CLIP_PAPER = (
    "imagenet1k", "cifar10", "cifar100", "food101", "sun397", "cars", "fgvc_aircraft", "dtd", "pets", "caltech101",
    "flowers", "mnist", "stl10", "eurosat", "resisc45", "gtsrb", "kitti_closest_vehicle_distance", "country211",
    "pcam", "renderedsst2", "fer2013", "clevr_count_all", "voc2007_multilabel", "birdsnap", "ucf101", "kinetics700",
    "hateful_memes",
)  # fmt: skip
# DataComp reports fairface and utkface apart from its 38-task average.
_DATACOMP_EXCLUDED = ("fairness/fairface", "fairness/utkface")
# DataComp's main metrics that are ours under another name.
_DATACOMP_METRICS = {"acc1": "top1", "mean_per_class_recall": "mean_per_class_recall", "mean_recall@1": "mean_recall@1"}
# Its metrics over per-sample metadata (clip.group_metrics), by task: its names say the metric, not the group.
_DATACOMP_TASK_METRICS = {
    "wilds/iwildcam": "macro_f1",  # F1-macro_all
    "wilds/fmow": "worst_region_top1",  # acc_worst_region
    "fairness/geode": "worst_region_top1",  # acc_wg, grouped by region
    "fairness/dollar_street": "worst_income_group_top5",  # acc_top5_wg, grouped by income
}
# Why WinoGAViL is skipped (DataComp's eval_utils/wino_eval.py and download_evalsets.py).
_WINOGAVIL = (
    "not computed here: DataComp has no WebDataset export of it (it loads the Hugging Face dataset "
    "nlphuji/winogavil with `datasets`), and its samples (a cue word, 5-12 candidate images, the associated "
    "ones; scored by the Jaccard index of the cue's top images) are neither classification nor retrieval"
)
# DataComp's names for our benchmarks.
_DATACOMP_NAMES = {"imagenet_sketch": "imagenet-sketch", "imagenetv2": "imagenet-v2"}
# DataComp's two retrieval tasks come from Hugging Face datasets, not WebDataset; CLIP_benchmark exports them.
_DATACOMP_RETRIEVAL = {
    "retrieval/flickr_1k_test_image_text_retrieval": "flickr30k",
    "retrieval/mscoco_2014_5k_test_image_text_retrieval": "mscoco_captions",
}


@functools.cache
def datacomp_tasks() -> dict[str, dict[str, Any]]:
    """DataComp's tasks (key -> name, main_metric, num_classes, tags), from its tasklist.yml."""
    text = (resources.files("clip") / "assets" / "datacomp_tasks.json").read_text(encoding="utf-8")
    return {key: task for key, task in json.loads(text).items() if key not in _DATACOMP_EXCLUDED}


@dataclass
class PlannedSet:
    """A set to evaluate: its name, where it is, and how to open it (None: it is skipped, for `reason`)."""

    name: str
    path: str
    open: Callable[[], Any] | None
    reason: str = ""
    main_metric: str | None = None  # where the suite, not the data, says it


def open_named(name: str, path: str | Path, transform: Transform, split: str = "test") -> Any:
    """A benchmark by its name (`clip.benchmarks`), else a CLIP_benchmark export named `name`."""
    if name in BENCHMARKS:
        return load_benchmark(name, path, transform, split=split)
    return load_export(path, transform, name=name, split=split)


def _find(root: Path, directories: Sequence[str]) -> Path | None:
    return next((root / d for d in directories if (root / d).exists()), None)


def plan_suite(suite: str, root: str | Path, open_benchmark: Callable[[str, Path], Any]) -> list[PlannedSet]:
    """The sets of `suite` under `root`, each opened by `open_benchmark(name, path)` when its turn comes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--suite {suite}: data root {root} is not a directory")
    if suite == "datacomp":
        return _plan_datacomp(root, open_benchmark)
    names = {"imagenet-shifts": ("imagenet1k", *IMAGENET_SHIFTS), "clip-paper": _CLIP_PAPER}.get(suite)
    if names is None:
        raise KeyError(f"unknown suite {suite!r}; known: imagenet-shifts, clip-paper, datacomp")
    planned = []
    for name in names:
        directories = get_benchmark(name).directories
        path = _find(root, directories)
        if path is None:
            reason = f"not found under {root} (looked for {', '.join(d + '/' for d in directories)})"
            planned.append(PlannedSet(name, "", None, reason))
        else:
            planned.append(PlannedSet(name, str(path), functools.partial(open_benchmark, name, path)))
    return planned


def _datacomp_set(key: str) -> tuple[str, str]:
    """Our set name and the directory of DataComp task `key`."""
    if key in _DATACOMP_RETRIEVAL:
        return _DATACOMP_RETRIEVAL[key], f"wds_{_DATACOMP_RETRIEVAL[key]}"
    short = key.removeprefix("fairness/")  # as DataComp's download script names the directories
    return _DATACOMP_NAMES.get(short, short.rsplit("/", 1)[-1]), f"wds_{short.replace('/', '-')}_test"


def _plan_datacomp(root: Path, open_benchmark: Callable[[str, Path], Any]) -> list[PlannedSet]:
    planned = []
    for key, task in datacomp_tasks().items():
        name, directory = _datacomp_set(key)
        path = root / directory
        if key == "misc/winogavil":
            planned.append(PlannedSet(name, "", None, f"DataComp's {task['main_metric']} is {_WINOGAVIL}"))
            continue
        metric = _DATACOMP_TASK_METRICS.get(key) or _DATACOMP_METRICS[task["main_metric"]]
        if not path.exists():
            planned.append(PlannedSet(name, "", None, f"not found under {root} (looked for {directory}/)"))
        else:
            planned.append(PlannedSet(name, str(path), functools.partial(open_benchmark, name, path), "", metric))
    return planned


def _datacomp_groups() -> dict[str, list[str]]:
    """DataComp's reported averages: the set names in each (its paper's table: ImageNet dist. shifts,
    VTAB, retrieval, and the average over all 38 tasks)."""
    tasks = datacomp_tasks()
    names = {key: _datacomp_set(key)[0] for key in tasks}
    tagged = {tag: [names[k] for k, t in tasks.items() if any(x.startswith(tag) for x in t.get("tags", []))]
              for tag in ("vtab", "retrieval")}  # fmt: skip
    shifts = ["imagenet-sketch", "imagenet-v2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"]
    return {"imagenet_dist_shifts": shifts, **tagged, "average": list(names.values())}


def run_sets(
    planned: Sequence[PlannedSet],
    evaluate_one: Callable[[Any], None],
    *,
    skip: Callable[[str, str], None],
    fail: Callable[[str, str], None],
    say: Callable[[str], None] = print,
) -> list[str]:
    """Open and evaluate each planned set in turn; `evaluate_one(eval_set)` records its results.
    An absent set is skipped (`skip`), a failure to open or evaluate is recorded (`fail`) and the next
    set runs. Returns the names of the sets that failed."""
    failed = []
    for item in planned:
        if item.open is None:
            say(f"skipped {item.name}: {item.reason}")
            skip(item.name, item.reason)
            continue
        try:
            eval_set = item.open()
            if item.main_metric is not None:
                eval_set.main_metric = item.main_metric
            evaluate_one(eval_set)
        except Exception as error:  # noqa: BLE001 -- one set's failure must not lose the others' results
            message = f"{type(error).__name__}: {error}"
            log.debug("set %s failed:\n%s", item.name, traceback.format_exc())
            say(f"FAILED {item.name} ({item.path}): {message}")
            fail(item.name, message)
            failed.append(item.name)
    return failed


def summarise(
    suite: str, sets: dict[str, dict[str, Any]], baselines: Sequence[Baseline] = (), say: Callable[[str], None] = print
) -> dict[str, dict[str, float]]:
    """The suite's averages over the sets it evaluated (each set's main metric), with their counts;
    for `imagenet-shifts`, the effective robustness relative to `baselines` (`clip.robustness`),
    or a line saying why it is not computed."""
    main = {
        name: entry["metrics"][entry["main_metric"]]
        for name, entry in sets.items()
        if entry["main_metric"] in entry["metrics"]
    }
    if not main:
        return {}
    if suite == "imagenet-shifts":
        shifts = [main[name] for name in IMAGENET_SHIFTS if name in main]
        summary: dict[str, float] = {"num_shifts": len(shifts)}
        if shifts:
            summary["shift_mean"] = sum(shifts) / len(shifts)
            if "imagenet1k" in main:
                summary["shift_mean_minus_imagenet"] = summary["shift_mean"] - main["imagenet1k"]
        if not baselines:
            say("effective robustness not computed: it needs baseline models' accuracies (--baseline, docs/eval.md)")
            return {"imagenet-shifts": summary}
        robustness, skipped = effective_robustness(main, baselines)
        for name, reason in skipped.items():
            say(f"effective robustness on {name} not computed: {reason}")
        return {"imagenet-shifts": summary, **({"effective-robustness": robustness} if robustness else {})}
    if suite == "datacomp":  # each group's mean over its tasks evaluated, and how many of how many
        summaries = {}
        for group, members in _datacomp_groups().items():
            values = [main[name] for name in members if name in main]
            if values:
                summaries[f"datacomp-{group}"] = {"mean": sum(values) / len(values), "num_sets": len(values),
                                                  "num_tasks": len(members)}  # fmt: skip
        return summaries
    values = list(main.values())
    return {suite: {"mean": sum(values) / len(values), "num_sets": len(values)}}
