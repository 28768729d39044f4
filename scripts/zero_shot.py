"""Evaluate a CLIP model: zero-shot classification, image-text retrieval or a linear probe.

    # ImageNet-1k zero-shot (val/ as class directories named by WordNet id; OpenAI's names and 80 templates)
    python scripts/zero_shot.py --model ViT-B/32 --data /data/imagenet/val
    # a training run (loads its export <run>/model.safetensors), on the synthetic held-out set and CIFAR-10 test
    python scripts/zero_shot.py --model runs/smoke --data data/synthetic/zeroshot /data/cifar10
    # COCO 5k retrieval (Karpathy test split)
    python scripts/zero_shot.py --task retrieval --model ViT-B/32 --data dataset_coco.json --images /data/coco
    # linear probe on CIFAR-100 (train split to fit, test split to score)
    python scripts/zero_shot.py --task linear-probe --model ViT-B/32 --data /data/cifar100
    # 16-shot probes with 5 seeds (mean and spread), on a class folder with its own training folder
    python scripts/zero_shot.py --task linear-probe --fewshot-k 16 --seeds 5 --model ViT-B/32 \
        --data /data/pets/test --train-data /data/pets/train
    # a published benchmark by name (layout, classes, class subset, templates and metric known)
    python scripts/zero_shot.py --model ViT-B/32 --benchmark imagenet-r --data /data/imagenet-r
    # a suite: every benchmark found under a data root, one results directory
    python scripts/zero_shot.py --model ViT-B/32 --suite imagenet-shifts --data /data --output results/vitb32
    # with effective robustness, relative to baseline models evaluated the same way
    python scripts/zero_shot.py --model mine --suite imagenet-shifts --data /data --baseline results/rn50 results/rn101
    # two runs side by side, with paired bootstrap intervals on the differences
    python scripts/zero_shot.py --compare results/vitb32 results/mine

`--model` is anything `clip.load` accepts (a name, a checkpoint, an export) or a training run
directory. A run evaluated with its own precision (`--precision bf16` for the trainer's default)
gives the numbers the trainer logged: the same weights, tokenizer, eval transform and code.
`--data` formats (detected from what is on disk), benchmarks, suites: docs/eval.md. Results are
printed as a table and written to the `--output` directory (fractions in [0, 1], as CLIP_benchmark
writes them) after each set; a set that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from clip.benchmarks import BENCHMARKS, load_benchmark
from clip.data.eval_datasets import (
    check_unique_names,
    is_export,
    load_classification_set,
    load_export,
    load_retrieval_set,
    split_named_path,
)
from clip.eval_results import ResultsDirectory, compare, data_fingerprint
from clip.eval_suite import PlannedSet, open_named, plan_suite, run_sets, summarise
from clip.group_metrics import evaluate_metadata_task
from clip.linear_probe import FEATURES, check_disjoint, evaluate_linear_probe
from clip.models.weights import CheckpointError, file_sha256
from clip.multilabel import evaluate_multilabel
from clip.robustness import read_baselines
from clip.tokenizer import get_tokenizer
from clip.zero_shot import evaluate_retrieval, evaluate_zero_shot

SUITES = ("imagenet-shifts", "clip-paper", "datacomp")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--download-root", help="directory of OpenAI's released .pt files for --model NAME (default: ~/.cache/clip)"
    )
    parser.add_argument("--model", help="model name, checkpoint, export directory or run directory")
    parser.add_argument(
        "--data",
        nargs="+",
        help="eval set(s): directory, shards or caption .json, each as path or name=path; with --suite, the data root",
    )
    parser.add_argument(
        "--benchmark",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help="read the one --data as this published benchmark (docs/eval.md lists them)",
    )
    parser.add_argument("--suite", choices=SUITES, help="every benchmark of a suite found under the --data root")
    parser.add_argument(
        "--baseline",
        nargs="+",
        metavar="PATH",
        help="--suite imagenet-shifts: baseline models' accuracies for effective robustness, as results "
        "directories or CSV files (docs/eval.md)",
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="DIR", help="print two or more results directories side by side, and exit"
    )
    parser.add_argument(
        "--task",
        choices=["zero-shot", "retrieval", "linear-probe"],
        default="zero-shot",
        help="what to evaluate (default: zero-shot)",
    )
    parser.add_argument("--images", help="retrieval: image root of a caption .json (default: the file's directory)")
    parser.add_argument("--train-data", help="linear probe: training set (default: --data with split 'train')")
    parser.add_argument(
        "--probe-features",
        choices=FEATURES,
        default="pre-projection",
        help="linear probe: image features before the projection to the embedding (the CLIP "
        "paper's choice) or the embedding itself (default: pre-projection)",
    )
    parser.add_argument(
        "--fewshot-k",
        type=int,
        metavar="K",
        help="linear probe: k-shot probes, K training images per class (default: the whole split)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="with --fewshot-k: seeds 0..N-1 draw the K images; mean and spread reported (default: 3)",
    )
    parser.add_argument(
        "--split", default="test", help="CIFAR split / shard subdirectory / Karpathy split (default: test)"
    )
    parser.add_argument(
        "--name", help="set name in the metric keys (one --data only; default: name=, the benchmark, or the path)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images (and prompts) per forward pass (default: 64)"
    )
    # More workers than cores only adds start-up time (and torch's warning about it). The cores this
    # process may use where the OS says (Linux), else all of them (macOS).
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, usable_cores),
        help="DataLoader worker processes (default: 4, at most one per core)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:N (default: cuda when available)",
    )
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="autocast dtype (default: fp32; the trainer evaluates with its own precision)",
    )
    parser.add_argument(
        "--output",
        default="eval_results",
        help="results directory: results.json, .csv, .md, .png, predictions/ (default: eval_results)",
    )
    args = parser.parse_args(argv)
    if args.compare:
        return args
    if not args.model or not args.data:
        parser.error("--model and --data are required (or --compare DIR DIR ...)")
    for option in ("name", "benchmark", "suite"):
        if getattr(args, option) and len(args.data) > 1:
            parser.error(f"--{option} needs exactly one --data")
    if args.suite and (args.benchmark or args.name or args.task != "zero-shot"):
        parser.error("--suite runs zero-shot benchmarks by their own names: no --benchmark, --name or --task")
    if args.baseline and args.suite != "imagenet-shifts":
        parser.error("--baseline (effective robustness) goes with --suite imagenet-shifts")
    if args.fewshot_k is not None and (args.task != "linear-probe" or args.fewshot_k < 1 or args.seeds < 1):
        parser.error("--fewshot-k K --seeds N need --task linear-probe, K >= 1 and N >= 1")
    return args


def resolve_model(name_or_path: str) -> str:
    """A training run directory means the export the trainer writes when training ends,
    `<run>/model.safetensors`; anything else goes to `clip.load` unchanged."""
    from clip.train import EXPORT_NAME

    run_dir = Path(name_or_path)
    if (run_dir / EXPORT_NAME).is_file():
        return str(run_dir / EXPORT_NAME)
    if (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{run_dir} is a training run without {EXPORT_NAME}: the trainer writes it when training ends "
            f"(not when stopped early, nor with checkpoint.export=false); evaluate a finished run"
        )
    return name_or_path


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One row per eval set, one column per metric."""
    columns = list(dict.fromkeys(metric for metrics in results.values() for metric in metrics))
    rows = [["set", *columns]]
    for name, metrics in results.items():
        cells = [metrics.get(column) for column in columns]
        rows.append([name, *("" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}" for v in cells)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _open_eval_sets(args: argparse.Namespace, spec: str, preprocess) -> tuple[Any, Any]:
    """The eval set of `spec` (path or name=path) for `args.task`, and the linear probe's training set
    (else None); unreadable data exits naming the argument and the path."""
    name, path = split_named_path(spec)
    name = name or args.name
    try:
        if args.benchmark:
            eval_set = load_benchmark(args.benchmark, path, preprocess, split=args.split)
            eval_set.name = name or eval_set.name
        elif args.task == "retrieval":
            eval_set = load_retrieval_set(path, preprocess, images=args.images, name=name, split=args.split)
        elif args.task == "zero-shot" and is_export(Path(path), args.split):  # its dataset_type.txt says the task
            eval_set = load_export(path, preprocess, name=name, split=args.split)
        else:
            eval_set = load_classification_set(path, preprocess, name=name, split=args.split)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: --data {path}: {error}")
    if args.task != "linear-probe":
        return eval_set, None
    train_path = args.train_data or path
    try:
        train_set = load_classification_set(train_path, preprocess, split="train")
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {'--train-data' if args.train_data else '--data'} {train_path} (split 'train'): {error}")
    try:
        check_disjoint(train_set.dataset, eval_set.dataset)
    except ValueError as error:
        where = (
            f"--train-data {train_path} and --data {path} overlap"
            if args.train_data
            else f"--data {path} has no separate 'train' split (an image folder, or shards without train/ and "
            f"test/ subdirectories, is read whole for both): pass the training images with --train-data"
        )
        sys.exit(f"error: --task linear-probe: {where}; {error}")
    return eval_set, train_set


def _checkpoint_sha256(model_path: str) -> str | None:
    path = Path(model_path)
    weights = path / "model.safetensors" if path.is_dir() else path
    return file_sha256(weights) if weights.is_file() else None  # a released name: clip.load checks its hash


def _plan(args: argparse.Namespace, preprocess) -> list[PlannedSet]:
    if args.suite:
        try:
            return plan_suite(
                args.suite, args.data[0], lambda name, path: open_named(name, path, preprocess, split=args.split)
            )
        except FileNotFoundError as error:
            sys.exit(f"error: {error}")
    # Every set is opened (and the names checked) before the first is evaluated, so a wrong path in the
    # last --data or two sets with one name fail at once, not after hours on the first set.
    opened = [_open_eval_sets(args, spec, preprocess) for spec in args.data]
    try:
        check_unique_names([eval_set for eval_set, _ in opened])
    except ValueError as error:
        sys.exit(f"error: --data: {error}")
    return [
        PlannedSet(eval_set.name, eval_set.path, lambda pair=pair: pair) for pair in opened for eval_set in pair[:1]
    ]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if args.compare:
        try:
            print(compare(args.compare), end="")
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: --compare: {error}")
        return {}
    import clip

    try:
        model_path = resolve_model(args.model)
        model, preprocess = clip.load(model_path, device=args.device, download_root=args.download_root)
    except (FileNotFoundError, CheckpointError) as error:
        sys.exit(f"error: --model {args.model}: {error}")
    # clip.load casts to fp16 off the CPU, as OpenAI's does; evaluate fp32 weights, with autocast for
    # --precision bf16/fp16, which is how CLIP_benchmark and the trainer's eval run.
    model = model.float().eval()
    # The model's own tokenizer, as in training; long captions are cut at its context length, as
    # CLIP_benchmark's tokenizer does.
    tokenize = get_tokenizer(model.config.text)
    options = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": args.device,
        "autocast_dtype": PRECISIONS[args.precision],
        "progress": True,
    }
    try:  # read before any set is evaluated, so that a bad baseline fails at once
        baselines = read_baselines(args.baseline) if args.baseline else []
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    planned = _plan(args, preprocess)
    header = {
        "model": args.model,
        "loaded": model_path,
        "checkpoint_sha256": _checkpoint_sha256(model_path),
        "task": args.task,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "tokenizer": model.config.text.tokenizer,
        "context_length": model.config.text.context_length,
        "data": args.data,
        "suite": args.suite,
        "baseline": args.baseline,
    }
    if args.task == "linear-probe":  # encoded at --precision, fit in float64
        header.update(
            probe_features=args.probe_features, fewshot_k=args.fewshot_k, seeds=args.seeds if args.fewshot_k else None
        )
    results = ResultsDirectory(args.output, header)

    def evaluate_one(opened) -> None:
        eval_set, train_set = opened if isinstance(opened, tuple) else (opened, None)
        predictions: dict = {}
        if train_set is not None:
            metrics = evaluate_linear_probe(
                model,
                train_set.dataset,
                eval_set.dataset,
                name=eval_set.name,
                features=args.probe_features,
                fewshot_k=args.fewshot_k,
                seeds=range(args.seeds),
                **options,
            )
            main_metric = f"fewshot{args.fewshot_k}_top1" if args.fewshot_k else "linear_probe_top1"
        elif getattr(eval_set, "multilabel", False):
            metrics = evaluate_multilabel(
                model,
                eval_set.dataset,
                eval_set.classnames,
                eval_set.templates,
                tokenize,
                name=eval_set.name,
                **options,
            )
            main_metric = eval_set.main_metric
        elif hasattr(eval_set, "classnames"):
            metrics = evaluate_zero_shot(
                model,
                eval_set.dataset,
                eval_set.classnames,
                eval_set.templates,
                tokenize,
                name=eval_set.name,
                predictions=predictions,
                **options,
            )
            main_metric = eval_set.main_metric
        else:
            metrics = evaluate_retrieval(model, eval_set.dataset, tokenize, name=eval_set.name, **options)
            main_metric = eval_set.main_metric
        prefix = f"eval/{eval_set.name}_"
        metrics = {key.removeprefix(prefix): value for key, value in metrics.items()}
        if getattr(eval_set, "metadata_task", None):  # DataComp's group metrics (clip.group_metrics)
            metrics.update(evaluate_metadata_task(eval_set.metadata_task, eval_set.dataset, predictions))
        if "image_retrieval_recall@1" in metrics:  # DataComp's retrieval metric
            metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
        classnames = getattr(eval_set, "classnames", None)
        fingerprint = {
            "num_samples": metrics.get("num_samples", metrics.get("num_images")),
            "num_classes": len(classnames) if classnames else None,
            "files_sha256": data_fingerprint(eval_set.dataset, eval_set.path),
        }
        record = {
            "path": eval_set.path,
            "main_metric": main_metric,
            "fingerprint": fingerprint,
            "templates": getattr(eval_set, "templates", None),
        }
        saved = {key: predictions[key] for key in ("top1", "target")} if predictions else None  # what --compare reads
        results.add_set(eval_set.name, metrics, record, saved)

    failed = run_sets(planned, evaluate_one, skip=results.skip, fail=results.fail)
    if args.suite:
        for name, values in summarise(args.suite, results.payload["sets"], baselines).items():
            results.add_summary(name, values)
    table = {name: entry["metrics"] for name, entry in results.payload["sets"].items()}
    print(format_table({**table, **results.payload["summaries"]}))
    print(f"results written to {args.output}/ (results.json, .csv, .md, .png)")
    if failed:
        sys.exit(f"error: {len(failed)} set(s) failed ({', '.join(failed)}); the others' results are in {args.output}/")
    return table


if __name__ == "__main__":
    main()
