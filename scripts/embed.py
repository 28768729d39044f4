"""Embed a pool of shards: image and text embeddings and the CLIP score of every sample, by uid.

    # one process (GPU if there is one), DataComp's CLIP-score model
    python scripts/embed.py --model ViT-L/14 --shards '/data/pool/{00000..01287}.tar' --out /data/pool_emb
    # 8 GPUs: the shards are split over the ranks
    torchrun --nproc_per_node 8 scripts/embed.py --model ViT-L/14 --shards '/data/pool/{00000..01287}.tar' --out /data/pool_emb
    # a training run's export, on the CPU
    python scripts/embed.py --model runs/smoke/model.safetensors --shards 'data/synthetic/train/{000..009}.tar' --out emb --device cpu

One `<shard name>.npz` per shard appears in `--out` when that shard is done (format: docs/curation.md),
so rerunning a killed job embeds only the shards it had not finished. `--model` is anything `clip.load`
accepts; the model's eval transform and tokenizer are used. `--shards` is a brace pattern (`::`
separates several) or a `.txt` file listing shards one a line. Corrupt samples are skipped and counted
by reason as in training; a shard that cannot be opened gets no file and makes the job exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="model name or checkpoint/export path (anything clip.load reads)"
    )
    parser.add_argument("--download-root", help="directory of OpenAI's released .pt files (default: ~/.cache/clip)")
    parser.add_argument("--shards", required=True, help="brace pattern of tar shards, or a .txt list of them")
    parser.add_argument("--out", required=True, help="directory for the embedding files")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default: 256)")
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, usable_cores),
        help="DataLoader worker processes reading and decoding shards (default: 4, at most one per core)",
    )
    parser.add_argument("--device", default="auto", help="auto (this rank's GPU, else CPU), cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="autocast dtype of the forward passes (default: fp32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def shard_list(spec: str) -> list[str]:
    """The shards of `--shards`: a brace pattern, or a .txt file of them (relative to the file)."""
    from clip.data.sources import expand_pattern

    if spec.endswith(".txt"):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        return [
            url if os.path.isabs(url) or "://" in url or url.startswith("pipe:") else os.path.join(base, url)
            for line in lines
            for url in expand_pattern(line)
        ]
    return expand_pattern(spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import clip
    from clip.config import DistConfig
    from clip.curation.embed import embed_shards
    from clip.data.records import SKIP_REASONS
    from clip.distributed import (
        destroy_distributed,
        get_device,
        init_distributed,
        is_distributed,
        read_launch_env,
        sum_across_ranks,
    )
    from clip.models.weights import CheckpointError
    from clip.tokenizer import get_tokenizer

    try:
        urls = shard_list(args.shards)
    except (OSError, ValueError) as error:
        sys.exit(f"error: --shards {args.shards}: {error}")
    launch = read_launch_env()
    device = get_device(args.device, launch.local_rank)
    joined_here = not is_distributed()
    init_distributed(DistConfig(), launch, device)
    try:
        model, preprocess = clip.load(args.model, device=device, download_root=args.download_root)
    except (FileNotFoundError, CheckpointError) as error:
        sys.exit(f"error: --model {args.model}: {error}")
    # clip.load casts to fp16 off the CPU as OpenAI's does; like the eval script, run fp32 weights and
    # let --precision choose autocast.
    model = model.float().eval()
    report = embed_shards(
        model,
        preprocess,
        get_tokenizer(model.config.text),
        urls,
        args.out,
        rank=launch.rank,
        world_size=launch.world_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=device,
        autocast_dtype=PRECISIONS[args.precision],
        progress=not args.no_progress,
    )
    counts = [len(report.written), len(report.already_done), len(report.failed), report.num_samples]
    counts += [report.skipped[reason] for reason in SKIP_REASONS]
    totals = [int(v) for v in sum_across_ranks([float(v) for v in counts], device)]
    for url in report.failed:
        print(f"error: {url}: cannot be read; no embedding file written (rerun to retry it)", file=sys.stderr)
    if launch.rank == 0:
        written, done, failed, samples = totals[:4]
        print(f"{written} shards embedded ({samples} samples), {done} already done, {failed} unreadable")
        skipped = [f"{reason}={count}" for reason, count in zip(SKIP_REASONS, totals[4:]) if count]
        if skipped:
            print("skipped: " + ", ".join(skipped))
    if joined_here:
        destroy_distributed()
    return 1 if totals[2] else 0  # any rank's unreadable shard fails the job


if __name__ == "__main__":
    sys.exit(main())
