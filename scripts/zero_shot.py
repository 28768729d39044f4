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

`--model` is anything `clip.load` accepts (a name, a checkpoint, an export) or a training run
directory. A run evaluated with its own precision (`--precision bf16` for the trainer's default)
gives the numbers the trainer logged: the same weights, tokenizer, eval transform and code.
`--data` formats (detected from what is on disk): docs/eval.md. Results are printed as a table and
written to `--output` as JSON (fractions in [0, 1], as CLIP_benchmark writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from clip.data.eval_datasets import load_classification_set, load_retrieval_set
from clip.linear_probe import FEATURES, check_disjoint, evaluate_linear_probe
from clip.models.weights import CheckpointError
from clip.tokenizer import get_tokenizer
from clip.zero_shot import evaluate

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name, checkpoint, export directory or run directory")
    parser.add_argument("--download-root",
                        help="directory of OpenAI's released .pt files for --model NAME (default: ~/.cache/clip)")
    parser.add_argument("--data", required=True, nargs="+", help="eval set(s): directory, shards or caption .json")
    parser.add_argument("--task", choices=["zero-shot", "retrieval", "linear-probe"], default="zero-shot",
                        help="what to evaluate (default: zero-shot)")
    parser.add_argument("--images", help="retrieval: image root of a caption .json (default: the file's directory)")
    parser.add_argument("--train-data", help="linear probe: training set (default: --data with split 'train')")
    parser.add_argument("--probe-features", choices=FEATURES, default="pre-projection",
                        help="linear probe: image features before the projection to the embedding (the CLIP "
                             "paper's choice) or the embedding itself (default: pre-projection)")
    parser.add_argument("--fewshot-k", type=int, metavar="K",
                        help="linear probe: k-shot probes, K training images per class (default: the whole split)")
    parser.add_argument("--seeds", type=int, default=3, metavar="N",
                        help="with --fewshot-k: seeds 0..N-1 draw the K images; mean and spread reported (default: 3)")
    parser.add_argument("--split", default="test",
                        help="CIFAR split / shard subdirectory / Karpathy split (default: test)")
    parser.add_argument("--name", help="set name in the metric keys (one --data only; default: from the path)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images (and prompts) per forward pass (default: 64)")
    # More workers than cores only adds start-up time (and torch's warning about it). The cores this
    # process may use where the OS says (Linux), else all of them (macOS).
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=min(4, usable_cores),
                        help="DataLoader worker processes (default: 4, at most one per core)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="autocast dtype (default: fp32; the trainer evaluates with its own precision)")
    parser.add_argument("--output", default="eval_results.json",
                        help="JSON file for the results (default: eval_results.json)")
    args = parser.parse_args(argv)
    if args.name and len(args.data) > 1:
        parser.error("--name needs exactly one --data")
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


def _write_json(path: Path, payload: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)


def _open_eval_sets(args: argparse.Namespace, path: str, preprocess) -> tuple[Any, Any]:
    """The eval set at `path` for `args.task`, and the linear probe's training set (else None);
    unreadable data exits naming the argument and the path."""
    try:
        if args.task == "zero-shot":
            return load_classification_set(path, preprocess, name=args.name, split=args.split), None
        if args.task == "retrieval":
            return load_retrieval_set(path, preprocess, images=args.images, name=args.name, split=args.split), None
        eval_set = load_classification_set(path, preprocess, name=args.name, split=args.split)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: --data {path}: {error}")
    train_path = args.train_data or path
    try:
        train_set = load_classification_set(train_path, preprocess, split="train")
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {'--train-data' if args.train_data else '--data'} {train_path} (split 'train'): {error}")
    try:
        check_disjoint(train_set.dataset, eval_set.dataset)
    except ValueError as error:
        where = (f"--train-data {train_path} and --data {path} overlap" if args.train_data else
                 f"--data {path} has no separate 'train' split (an image folder, or shards without train/ and "
                 f"test/ subdirectories, is read whole for both): pass the training images with --train-data")
        sys.exit(f"error: --task linear-probe: {where}; {error}")
    return eval_set, train_set


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
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
    options = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        autocast_dtype=PRECISIONS[args.precision],
        progress=True,
    )
    # Every set is opened before the first is evaluated, so a wrong path in the last --data fails
    # at once, with a message instead of a traceback, not after hours on the first set.
    eval_sets = [_open_eval_sets(args, path, preprocess) for path in args.data]
    results: dict[str, dict[str, float]] = {}
    for eval_set, train_set in eval_sets:
        if train_set is None:
            metrics = evaluate(model, eval_set, tokenize, **options)
        else:
            metrics = evaluate_linear_probe(model, train_set.dataset, eval_set.dataset, name=eval_set.name,
                                            features=args.probe_features, fewshot_k=args.fewshot_k,
                                            seeds=range(args.seeds), **options)
        prefix = f"eval/{eval_set.name}_"
        results[eval_set.name] = {key.removeprefix(prefix): value for key, value in metrics.items()}

    print(format_table(results))
    payload = {"model": args.model, "loaded": model_path, "task": args.task, "precision": args.precision,
               "results": results}
    if args.task == "linear-probe":  # encoded at --precision, fit in float64
        payload.update(probe_features=args.probe_features, fewshot_k=args.fewshot_k,
                       seeds=args.seeds if args.fewshot_k else None)
    _write_json(Path(args.output), payload)
    print(f"results written to {args.output}")
    return results


if __name__ == "__main__":
    main()
