"""Effective robustness (Taori et al. 2020, arXiv:2007.00644): a model's accuracy under a distribution
shift minus the accuracy that ImageNet models without special robustness reach at its ImageNet accuracy.

That baseline is a line in logit space, `logit(shift) = slope * logit(imagenet) + intercept`, fit by
least squares to (ImageNet top-1, shift top-1) pairs of a testbed of models; a model's effective
robustness on a shift is `shift - sigmoid(slope * logit(imagenet) + intercept)`. Radford et al. 2021
and Fang et al. 2022 report it for the mean over several shifts, whose line is fit to each baseline
model's mean over the same shifts.

No coefficients are shipped: Taori et al.'s testbed publishes its models' accuracies, not fitted
lines, and a line depends on which models and which accuracy definitions (class subsets, ObjectNet's
protocol) it is fit to. So the baseline is the user's (`read_baselines`): a CSV with a column per
set, or results directories of baseline models evaluated with `--suite imagenet-shifts`, which makes
every accuracy the same measurement as the model's. Without one, nothing is computed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGENET = "imagenet1k"
IMAGENET_SHIFTS = ("imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch", "objectnet")
MIN_BASELINES = 2  # a line needs two models with different ImageNet accuracies

Baseline = dict[str, float]  # set -> top-1 of one baseline model (the sets it was evaluated on)


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def fit_logit_linear(imagenet: Sequence[float], shift: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through (logit(imagenet), logit(shift))."""
    x, y = logit(imagenet), logit(shift)
    if len(x) < MIN_BASELINES or np.ptp(x) == 0:
        raise ValueError(f"a fit needs {MIN_BASELINES} or more baseline models with different ImageNet accuracies")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _check_accuracy(value: float, where: str) -> float:
    if not 0.0 < value < 1.0:
        hint = " (accuracies are fractions, as in results.json: divide percentages by 100)" if value > 1 else ""
        raise ValueError(f"{where}: accuracy {value} is not strictly between 0 and 1, so it has no logit{hint}")
    return value


def _read_csv(path: Path) -> list[Baseline]:
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = [c for c in reader.fieldnames or [] if c != "model"]
        unknown = [c for c in columns if c not in (IMAGENET, *IMAGENET_SHIFTS)]
        if IMAGENET not in columns or unknown:
            what = f"unknown column(s) {unknown}" if unknown else f"no {IMAGENET} column"
            raise ValueError(
                f"--baseline {path}: {what}; the columns are model (optional), {IMAGENET}, {', '.join(IMAGENET_SHIFTS)}"
            )
        baselines = []
        for line, row in enumerate(reader, start=2):
            where = f"--baseline {path} line {line} ({row.get('model') or 'unnamed'})"
            try:
                values = {c: float(row[c]) for c in columns if row[c] not in (None, "")}
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            baselines.append({c: _check_accuracy(v, f"{where}, {c}") for c, v in values.items()})
    return baselines


def _read_results(directory: Path) -> Baseline:
    results = json.loads((directory / "results.json").read_text())
    values = {
        name: entry["metrics"]["top1"]
        for name, entry in results["sets"].items()
        if name in (IMAGENET, *IMAGENET_SHIFTS) and "top1" in entry["metrics"]
    }
    return {name: _check_accuracy(v, f"--baseline {directory}, {name}") for name, v in values.items()}


def read_baselines(paths: Sequence[str | Path]) -> list[Baseline]:
    """Baseline models' top-1 per set: rows of CSV files, or results directories (one model each)."""
    baselines: list[Baseline] = []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            baselines.append(_read_results(path))
        elif path.is_file():
            baselines.extend(_read_csv(path))
        else:
            raise FileNotFoundError(f"--baseline {path}: neither a results directory nor a CSV file")
    if not any(IMAGENET in b for b in baselines):
        raise ValueError(f"--baseline {', '.join(map(str, paths))}: no model with an {IMAGENET} accuracy")
    return baselines


def effective_robustness(
    accuracies: dict[str, float], baselines: Sequence[Baseline]
) -> tuple[dict[str, float], dict[str, str]]:
    """The model's effective robustness on each shift it has (`accuracies`: set -> top-1, with
    `imagenet1k`) and, with two or more, on their mean (`shift_mean`, the line fit to the baseline
    models that have all of those shifts), with each line's slope, intercept and number of models;
    and, per shift, why it was not computed."""
    if not baselines:
        raise ValueError("effective robustness needs baseline models' accuracies (--baseline): none given")
    # The line is evaluated at the model's ImageNet logit (its shift accuracies need none).
    if not 0.0 < accuracies.get(IMAGENET, 0.0) < 1.0:  # absent, or 0 or 1 (a small set)
        return {}, {"all": f"the model's {IMAGENET} top-1 is {accuracies.get(IMAGENET, 'absent')}: no logit"}
    imagenet = accuracies[IMAGENET]
    shifts = [name for name in IMAGENET_SHIFTS if name in accuracies]
    with_imagenet = [b for b in baselines if IMAGENET in b]
    # (name, the model's accuracy, the baseline's (imagenet, shift) pairs, which baseline models count)
    targets = [
        (name, accuracies[name], [(b[IMAGENET], b[name]) for b in with_imagenet if name in b], name) for name in shifts
    ]
    if len(shifts) > 1:
        complete = [b for b in with_imagenet if all(name in b for name in shifts)]
        mean_pairs = [(b[IMAGENET], float(np.mean([b[name] for name in shifts]))) for b in complete]
        model_mean = float(np.mean([accuracies[name] for name in shifts]))
        targets.append(("shift_mean", model_mean, mean_pairs, f"all of {', '.join(shifts)}"))
    values: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, shift, pairs, which in targets:
        try:
            slope, intercept = fit_logit_linear([x for x, _ in pairs], [y for _, y in pairs])
        except ValueError as error:
            skipped[name] = f"{error}; the baseline has {len(pairs)} with {IMAGENET} and {which}"
            continue
        values[f"effective_robustness_{name}"] = shift - float(sigmoid(slope * logit(imagenet) + intercept))
        values[f"fit_{name}_slope"], values[f"fit_{name}_intercept"] = slope, intercept
        values[f"fit_{name}_num_models"] = len(pairs)
    return values, skipped
