"""A results directory per evaluation, rewritten after each finished set, and comparisons of several.

`<dir>/results.json` holds what made the numbers (model, checkpoint hash, precision, batch size,
tokenizer, and per set: its path, templates, main metric, a fingerprint of its data) and the
metrics; `results.csv` has one row per (set, metric); `results.md` a table of the main metrics;
`results.png` a bar chart of them; `predictions/<set>.npz` the per-sample top-1 class and label
of each classification set, from which `compare` draws a paired bootstrap interval.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_JSON = "results.json"
PREDICTIONS_DIR = "predictions"
BOOTSTRAP_SAMPLES = 1000


def _atomic_write(path: Path, data: str | bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)


def data_fingerprint(dataset: Any, root: str) -> str:
    """A hash of what a set reads: its files relative to `root` with their labels (image folders,
    caption files), its shards' names and sizes, or CIFAR's arrays. Equal hashes: the same data."""
    digest = hashlib.sha256()
    if hasattr(dataset, "samples"):  # torchvision ImageFolder
        for path, label in dataset.samples:
            digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    elif hasattr(dataset, "shards"):  # TarEvalDataset
        for shard in dataset.shards:
            digest.update(f"{Path(shard).name}\t{os.path.getsize(shard)}\n".encode())
    elif hasattr(dataset, "items"):  # CaptionedImages
        for path, captions in dataset.items:
            digest.update(f"{os.path.relpath(path, root)}\t{json.dumps(captions)}\n".encode())
    elif hasattr(dataset, "images") and hasattr(dataset, "labels"):  # CifarDataset
        digest.update(np.ascontiguousarray(dataset.images).tobytes())
        digest.update(json.dumps(dataset.labels).encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(dataset).__name__}")
    return digest.hexdigest()[:16]


def _format(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}" if isinstance(value, float) else str(value)


class ResultsDirectory:
    """The results of one evaluation, on disk after every set (a later failure loses nothing)."""

    def __init__(self, directory: str | Path, header: dict[str, Any]):
        self.directory = Path(directory)
        (self.directory / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (self.directory / PREDICTIONS_DIR).glob("*.npz"):  # an earlier evaluation's: not this one's
            stale.unlink()
        self.payload: dict[str, Any] = {**header, "sets": {}, "summaries": {}, "skipped": {}, "failed": {}}
        self._write()

    def add_set(
        self, name: str, metrics: dict[str, Any], record: dict[str, Any], predictions: dict[str, torch.Tensor] | None
    ) -> None:
        """A finished set: its metrics and `record` (path, templates, main_metric, fingerprint...)."""
        self.payload["sets"][name] = {**record, "metrics": metrics}
        if predictions:
            buffer = io.BytesIO()
            np.savez(buffer, **{key: value.numpy() for key, value in predictions.items()})
            _atomic_write(self.directory / PREDICTIONS_DIR / f"{name}.npz", buffer.getvalue())
        self._write()

    def add_summary(self, name: str, values: dict[str, float]) -> None:
        self.payload["summaries"][name] = values
        self._write()

    def skip(self, name: str, reason: str) -> None:
        self.payload["skipped"][name] = reason
        self._write()

    def fail(self, name: str, error: str) -> None:
        self.payload["failed"][name] = error
        self._write()

    def _write(self) -> None:
        _atomic_write(self.directory / RESULTS_JSON, json.dumps(self.payload, indent=2) + "\n")
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["set", "metric", "value", "precision"])
        for name, entry in self.payload["sets"].items():
            for metric, value in entry["metrics"].items():
                writer.writerow([name, metric, value, self.payload["precision"]])
        for name, values in self.payload["summaries"].items():
            for metric, value in values.items():
                writer.writerow([name, metric, value, self.payload["precision"]])
        _atomic_write(self.directory / "results.csv", rows.getvalue())
        _atomic_write(self.directory / "results.md", self.markdown())
        if self.payload["sets"]:
            self._plot()

    def markdown(self) -> str:
        p = self.payload
        lines = [
            f"Model `{p['model']}`, precision {p['precision']}, batch size {p['batch_size']}",
            "",
            "| set | main metric | value | samples |",
            "|---|---|---|---|",
        ]
        for name, entry in p["sets"].items():
            metric = entry["main_metric"]
            samples = entry["metrics"].get("num_samples", entry["metrics"].get("num_images", ""))
            lines.append(f"| {name} | {metric} | {_format(entry['metrics'].get(metric, float('nan')))} | {samples} |")
        for name, values in p["summaries"].items():
            lines += [f"| {name} | {metric} | {_format(value)} | |" for metric, value in values.items()]
        lines += [f"| {name} | skipped: {reason} | | |" for name, reason in p["skipped"].items()]
        lines += [f"| {name} | FAILED: {error} | | |" for name, error in p["failed"].items()]
        return "\n".join(lines) + "\n"

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot as plt

        sets = self.payload["sets"]
        names = list(sets)
        values = [sets[name]["metrics"].get(sets[name]["main_metric"], float("nan")) for name in names]
        figure, axes = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 4))
        axes.bar_label(axes.bar(range(len(names)), values), fmt="%.3f", fontsize=8)
        axes.set_xticks(range(len(names)), names, rotation=60, ha="right")
        axes.set_ylim(0, 1.05)
        axes.set_ylabel("main metric of each set")
        axes.set_title(f"{Path(self.payload['model']).name} ({self.payload['precision']})")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        _atomic_write(self.directory / "results.png", buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Comparing results directories


def _metric_from_predictions(metric: str, top1: np.ndarray, target: np.ndarray) -> float | None:
    if metric == "top1":
        return float((top1 == target).mean())
    if metric == "mean_per_class_recall":  # by counts: 1000 resamples of ImageNet's 50k take seconds
        total = np.bincount(target)
        correct = np.bincount(target[top1 == target], minlength=len(total))
        present = total > 0
        return float(np.mean(correct[present] / total[present]))
    return None


def paired_bootstrap(
    metric: str, a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float] | None:
    """95 % percentile interval of metric(b) - metric(a) over resamplings of the same images for both
    runs (paired), or None where the metric cannot be recomputed from the per-sample predictions."""
    if _metric_from_predictions(metric, a["top1"][:1], a["target"][:1]) is None:
        return None
    rng = np.random.default_rng(seed)
    count = len(a["target"])
    differences = []
    for _ in range(samples):
        index = rng.integers(0, count, count)
        first = _metric_from_predictions(metric, a["top1"][index], a["target"][index])
        second = _metric_from_predictions(metric, b["top1"][index], b["target"][index])
        differences.append(second - first)
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def _load(directory: Path) -> dict[str, Any]:
    path = directory / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a results directory (no {RESULTS_JSON})")
    return json.loads(path.read_text())


def _predictions(directory: Path, name: str) -> dict[str, np.ndarray] | None:
    path = directory / PREDICTIONS_DIR / f"{name}.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def compare(directories: list[str | Path]) -> str:
    """A Markdown table of the main metric per set in each run, each run's difference from the first,
    and, where both runs hold per-sample predictions of the same data (equal fingerprints), the
    paired bootstrap 95 % interval of that difference."""
    if len(directories) < 2:
        raise ValueError("--compare needs two or more results directories")
    runs = [(Path(d), _load(Path(d))) for d in directories]
    header = ["set", "metric", *(f"{d.name} ({r['precision']})" for d, r in runs)]
    header += [f"{d.name} - {runs[0][0].name} [95% CI]" for d, _ in runs[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = list(dict.fromkeys(name for _, run in runs for name in run["sets"]))
    base_dir = runs[0][0]
    for name in names:
        entries = [run["sets"].get(name) for _, run in runs]
        metric = next(entry["main_metric"] for entry in entries if entry)
        values = [entry["metrics"].get(metric) if entry else None for entry in entries]
        cells = [name, metric, *("" if v is None else _format(v) for v in values)]
        for (directory, _), entry, value in zip(runs[1:], entries[1:], values[1:]):
            if value is None or values[0] is None:
                cells.append("")
                continue
            cell = f"{value - values[0]:+.4f}"
            same_data = entry["fingerprint"] == entries[0]["fingerprint"]
            first, second = _predictions(base_dir, name), _predictions(directory, name)
            if not same_data:
                cell += " (different data)"
            elif first is not None and second is not None:
                interval = paired_bootstrap(metric, first, second)
                if interval is not None:
                    cell += f" [{interval[0]:+.4f}, {interval[1]:+.4f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
