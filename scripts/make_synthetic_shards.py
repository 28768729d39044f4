"""Write the synthetic coloured-shapes dataset: WebDataset train shards + a zero-shot classification set.

    PYTHONPATH=. python scripts/make_synthetic_shards.py --out data/synthetic --num-train 20000

Layout and caption format: docs/data.md. Deterministic from --seed.
"""

from __future__ import annotations

import argparse
import time

from clip.data.synthetic import write_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (train/ and zeroshot/ are created in it)")
    parser.add_argument("--num-train", type=int, default=20_000, help="training image-text pairs")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images, pixels")
    parser.add_argument("--images-per-class", type=int, default=50, help="zero-shot images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mismatched-fraction", type=float, default=0.0,
        help="share of training captions taken from another scene (noise for curation experiments, docs/curation.md)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    dataset = write_synthetic_dataset(
        args.out,
        num_train=args.num_train,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        images_per_class=args.images_per_class,
        seed=args.seed,
        mismatched_fraction=args.mismatched_fraction,
    )
    seconds = time.perf_counter() - start
    total = args.num_train + args.images_per_class * dataset.num_classes
    print(f"train shards: {dataset.train_shards}")
    print(f"zero-shot set: {dataset.zeroshot_dir} ({dataset.num_classes} classes)")
    print(f"{total} images in {seconds:.1f} s ({total / seconds:.0f} samples/s)")


if __name__ == "__main__":
    main()
