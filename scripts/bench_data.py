"""Data loading throughput: this library's loader against OpenCLIP's WebDataset pipeline, same shards.

    PYTHONPATH=. python scripts/bench_data.py --workers 2

Writes 256 px JPEG shards (textured images of ~25 KB, like img2dataset output at 256 px) once, then
measures samples/s of (a) decode + crop + tokenize in one process with no pipeline (the per-core
ceiling), (b) our loader in-process and with 1..N workers, (c) OpenCLIP's `get_wds_dataset` (needs
open_clip_torch; a test-only reference) with the same transform, tokenizer, batch size and workers,
and in-process also with OpenCLIP's own training transform (PIL's resize: what its users run). Both
pipelines shuffle and crop at random; the first batch (worker start-up) is not timed.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import time
import types
from argparse import Namespace

import numpy as np
import torch
from PIL import Image

from clip.config import DataConfig, TextConfig
from clip.data import build_train_loader
from clip.tokenizer import get_tokenizer
from clip.transforms import image_transform_train


def write_bench_shards(directory: str, num_shards: int, per_shard: int, seed: int = 0) -> str:
    from webdataset import TarWriter

    pattern = os.path.join(directory, f"{{00000..{num_shards - 1:05d}}}.tar")
    if os.path.exists(os.path.join(directory, "sizes.json")):
        sizes = json.load(open(os.path.join(directory, "sizes.json")))
        if len(sizes) == num_shards and set(sizes.values()) == {per_shard}:
            return pattern
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = {}
    for shard in range(num_shards):
        name = f"{shard:05d}.tar"
        with TarWriter(os.path.join(directory, name), encoder=False, mtime=0) as writer:
            for i in range(per_shard):
                # smooth colour fields plus noise: compresses like a photo (~25 KB at quality 85)
                base = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
                pixels = np.asarray(base).astype(np.int16) + rng.integers(-25, 25, (256, 256, 3))
                buffer = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
                caption = f"a photo of item {i} from shard {shard}, a colourful textured scene"
                writer.write({"__key__": f"{shard:05d}{i:05d}", "jpg": buffer.getvalue(), "txt": caption.encode()})
        sizes[name] = per_shard
    json.dump(sizes, open(os.path.join(directory, "sizes.json"), "w"))
    return pattern


def get_tokenize():
    """The library's tokenizer for the default text tower; both pipelines use it, so only loading differs."""
    return get_tokenizer(TextConfig()), "clip.tokenizer"


def timed(batches, num_batches: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process) over `num_batches` batches
    after the first (start-up excluded). The CPU rate is the per-core rate of an in-process pipeline,
    and stays meaningful on a machine shared with other jobs."""
    iterator = iter(batches)
    next(iterator)
    start, cpu_start, samples = time.perf_counter(), time.process_time(), 0
    for _ in range(num_batches):
        batch = next(iterator)
        samples += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)  # (images, texts) or images
    return samples / (time.perf_counter() - start), samples / (time.process_time() - cpu_start)


def bench_plain(pattern: str, tokenize, num_samples: int) -> tuple[float, float]:
    """No pipeline: read JPEG bytes from the first shard, then decode + transform + tokenize each."""
    import tarfile

    transform = image_transform_train(224)
    with tarfile.open(pattern.replace("{00000..", "").split("}")[0].rsplit("/", 1)[0] + "/00000.tar") as tar:
        members = [(tar.extractfile(m).read(), m.name) for m in tar.getmembers()]
    jpegs = [data for data, name in members if name.endswith(".jpg")][:num_samples]
    captions = [data.decode() for data, name in members if name.endswith(".txt")][:num_samples]
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs])
    tokenize(captions)
    return len(jpegs) / (time.perf_counter() - start), len(jpegs) / (time.process_time() - cpu_start)


def bench_ours(pattern: str, tokenize, workers: int, batch_size: int, num_batches: int) -> tuple[float, float]:
    cfg = DataConfig(train_shards=pattern, num_workers=workers, resampled=True)
    loader = build_train_loader(
        cfg, batch_size=batch_size, image_transform=image_transform_train(224), tokenize=tokenize, rank=0, world_size=1, seed=0
    )
    # Float32 normalised batches, as OpenCLIP's: the loader ships uint8 pixels and the trainer
    # finishes them on the GPU; here this process pays for that on the CPU.
    return timed((loader.finish_images(batch.images) for batch in loader), num_batches)


def bench_openclip(
    pattern: str, tokenize, workers: int, batch_size: int, num_batches: int, num_samples: int, transform=None
) -> tuple[float, float]:
    """OpenCLIP's pipeline with our transform (so that only the loading differs) or with `transform`."""
    # open_clip_train.data imports pandas for its CSV dataset only; it is not installed here and not needed.
    sys.modules.setdefault("pandas", types.ModuleType("pandas"))
    import open_clip_train.data as openclip_data
    from webdataset.tariterators import tar_file_expander

    # OpenCLIP's training code pins webdataset<=0.2.86; 1.0.2 adds an end-of-shard marker `{}` that its
    # group_by_keys_nothrow cannot parse. Turning the marker off is the whole adaptation.
    openclip_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    get_wds_dataset = openclip_data.get_wds_dataset

    args = Namespace(
        train_data=pattern,
        val_data=None,
        dataset_resampled=True,
        train_num_samples=num_samples,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch_size,
        world_size=1,
        workers=workers,
    )
    transform = transform or image_transform_train(224)
    data = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenize)
    return timed(data.dataloader, num_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards-dir", default="/tmp/clip_bench_shards_256")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="largest worker count to measure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--skip-openclip", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets
    pattern = write_bench_shards(args.shards_dir, args.num_shards, args.per_shard)
    tokenize, tokenizer_name = get_tokenize()
    total = args.num_shards * args.per_shard
    rows = [
        ("decode + crop + tokenize, no pipeline", 0, bench_plain(pattern, tokenize, args.batch_size * 4)),
        ("ours", 0, bench_ours(pattern, tokenize, 0, args.batch_size, args.batches)),
    ]
    if not args.skip_openclip:
        # Imported before bench_openclip stubs pandas out (wandb, which open_clip may import, probes it).
        from open_clip.transform import image_transform  # OpenCLIP's own PIL transform: what its users run

        in_process = functools.partial(bench_openclip, pattern, tokenize, 0, args.batch_size, args.batches, total)
        rows.append(("OpenCLIP get_wds_dataset", 0, in_process()))
        rows.append(("OpenCLIP get_wds_dataset, its own (PIL) transform", 0, in_process(image_transform(224, is_train=True))))
    for workers in range(1, args.workers + 1):
        rows.append(("ours", workers, bench_ours(pattern, tokenize, workers, args.batch_size, args.batches)))
        if not args.skip_openclip:
            rate = bench_openclip(pattern, tokenize, workers, args.batch_size, args.batches, total)
            rows.append(("OpenCLIP get_wds_dataset", workers, rate))
    print(f"shards: {pattern} ({args.num_shards} x {args.per_shard}, 256 px JPEG), batch {args.batch_size}, "
          f"tokenizer {tokenizer_name}, {os.cpu_count()} CPUs")
    print("| pipeline | workers | samples/s | samples/s per worker | samples per CPU-second (in-process only) |")
    print("|---|---|---|---|---|")
    for name, workers, (rate, cpu_rate) in rows:
        cpu = f"{cpu_rate:.0f}" if workers == 0 else ""
        print(f"| {name} | {workers} | {rate:.0f} | {rate / max(1, workers):.0f} | {cpu} |")


if __name__ == "__main__":
    main()
