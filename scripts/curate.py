"""Filter an embedded pool into DataComp subset files, combine them, and summarise them.

    # DataComp's CLIP-score baseline: the top 30% (or --threshold T, a score of 100 x cosine)
    python scripts/curate.py clip-score --embeddings emb/ --top 0.3 --out clip30.npy
    # text-based: captions naming an ImageNet-21k synset, in English
    python scripts/curate.py text --embeddings emb/ --imagenet21k --english --out text.npy
    # image-based: clusters of the pool nearest to ImageNet train images' embeddings, AND CLIP score
    python scripts/curate.py image --embeddings emb/ --target in1k_emb/ --clusters 100000 --out image.npy
    python scripts/curate.py and image.npy clip30.npy --out image_and_clip30.npy
    # semantic deduplication, then the samples kept per shard
    python scripts/curate.py dedup --embeddings emb/ --clusters 1000 --threshold 0.95 --out dedup.npy
    python scripts/curate.py summary image_and_clip30.npy --embeddings emb/
    # the per-shard kept counts epoch mode needs, for a subset made elsewhere (or by and/or/minus)
    python scripts/curate.py sizes --subset image_and_clip30.npy --shards '/data/pool/{00000..01287}.tar'
    # MetaCLIP balancing: count metadata matches over the pool once, then a balanced subset per seed
    python scripts/curate.py metaclip --count --metadata metadata.json --t 20000 --shards '/data/pool/{00000..01287}.tar' --out balance.npz
    python scripts/curate.py metaclip --balance balance.npz --seed 0 --out metaclip.npy

`--embeddings` is a directory written by scripts/embed.py. Every filter writes a subset file in
DataComp's format (a sorted .npy of uids), which `data.subset=PATH` trains on (docs/curation.md), and
beside it `<name>.sizes.json`, its kept count per shard (what epoch mode needs). A balance file is
also what `data.balance=PATH` balances online with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from clip.curation.metaclip import DEFAULT_THRESHOLD


def _add_filter(commands, name: str, help: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    parser.add_argument("--embeddings", required=True, help="directory of scripts/embed.py's files")
    parser.add_argument("--out", required=True, help="subset file to write (.npy)")
    return parser


def _add_clusters(parser: argparse.ArgumentParser, default_embedding: str) -> None:
    parser.add_argument("--clusters", type=int, required=True, help="number of k-means clusters")
    parser.add_argument("--iterations", type=int, default=20, help="k-means iterations (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    parser.add_argument(
        "--backend",
        choices=["auto", "faiss", "torch"],
        default="auto",
        help="k-means implementation (default: faiss if installed, else torch)",
    )
    parser.add_argument(
        "--embedding",
        choices=["image", "text"],
        default=default_embedding,
        help=f"which embedding to cluster (default: {default_embedding})",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    score = _add_filter(commands, "clip-score", "keep samples by CLIP score: a threshold or the top fraction")
    which = score.add_mutually_exclusive_group(required=True)
    which.add_argument("--threshold", type=float, help="keep scores >= this (100 x cosine)")
    which.add_argument("--top", type=float, help="keep this top fraction of the pool, e.g. 0.3")

    text = _add_filter(commands, "text", "keep captions that mention a listed word (DataComp's text-based filter)")
    text.add_argument("--imagenet21k", action="store_true", help="the ImageNet-21k synsets' lemmas")
    text.add_argument("--words", help="a file of words or phrases, one a line (with --imagenet21k: both)")
    text.add_argument("--english", action="store_true", help="also keep only English captions (fastText)")

    image = _add_filter(
        commands, "image", "keep the pool's clusters nearest to a target set (DataComp's image-based filter)"
    )
    image.add_argument(
        "--target",
        required=True,
        help="the target set's image embeddings: a scripts/embed.py directory or a .npy [M, D] array",
    )
    _add_clusters(image, "image")
    image.add_argument(
        "--english",
        action="store_true",
        help="first keep English captions of more than one word and five characters (DataComp's caption filter)",
    )

    dedup = _add_filter(commands, "dedup", "drop semantic near-duplicates within clusters (SemDeDup)")
    _add_clusters(dedup, "image")
    dedup.add_argument(
        "--threshold", type=float, default=0.95, help="cosine above which two samples are duplicates (default: 0.95)"
    )
    dedup.add_argument(
        "--keep",
        choices=["far-from-centre", "clip-score"],
        default="far-from-centre",
        help="which sample of a group to keep (default: the one farthest from its centre, SemDeDup's)",
    )

    for operation, help in (
        ("and", "uids in every subset"),
        ("or", "uids in any subset"),
        ("minus", "uids of the first subset in none of the others"),
    ):
        combine = commands.add_parser(operation, help=help, description=help)
        combine.add_argument("subsets", nargs="+", help="subset files")
        combine.add_argument("--out", required=True, help="subset file to write (.npy)")

    summary = commands.add_parser("summary", help="how many samples a subset keeps, per source shard")
    summary.add_argument("subset", help="a subset file")
    summary.add_argument("--embeddings", help="the pool's embedding directory: adds the per-shard counts")

    sizes = commands.add_parser("sizes", help="write a subset's kept count per shard (<subset>.sizes.json) from the shards")
    sizes.add_argument("--subset", required=True, help="a subset file")
    sizes.add_argument("--shards", required=True, help="the pool's shards, as in data.train_shards (pattern or .txt list)")

    metaclip = commands.add_parser(
        "metaclip", help="MetaCLIP balancing: count metadata matches over the pool (--count), or write a balanced subset"
    )
    metaclip.add_argument("--count", action="store_true",
                          help="match every caption of --shards against --metadata; --out is the balance file (.npz)")
    metaclip.add_argument("--metadata", help="entries, one a line (.txt), or a JSON list (MetaCLIP's metadata.json)")
    metaclip.add_argument("--shards", help="the pool's shards, as in data.train_shards (pattern or .txt list)")
    metaclip.add_argument("--t", type=float, help=f"MetaCLIP's threshold t (default: the balance file's, else {DEFAULT_THRESHOLD})")
    metaclip.add_argument("--balance", help="a balance file made by --count (else --metadata and --shards are counted first)")
    metaclip.add_argument("--seed", type=int, default=0, help="the draws' seed; data.balance uses the run's seed (default: 0)")
    metaclip.add_argument("--out", required=True, help="the balance file (--count) or subset file to write")
    return parser.parse_args(argv)


def _pool_urls(spec: str) -> list[str]:
    """The shard URLs of a data.train_shards spec, resolved as training resolves them (so the sizes agree)."""
    from clip.config import DataConfig
    from clip.data.sources import resolve_sources

    sources = resolve_sources(DataConfig(train_shards=spec, resampled=True))
    if any(source.csv_rows is not None for source in sources):
        raise ValueError(f"{spec}: CSV sources need no sizes file (their counts come from the rows)")
    return [shard.url for source in sources for shard in source.shards]


def _write_with_sizes(path: str, uids: np.ndarray, shard_of_uid: np.ndarray, pool_shards: np.ndarray) -> None:
    """The subset file and its `.sizes.json`: kept samples per shard, 0 for the pool's other shards."""
    from clip.data.selection import write_subset_sizes
    from clip.data.subset import write_subset

    write_subset(path, uids)
    counts = dict.fromkeys(map(str, pool_shards), 0)
    names, numbers = np.unique(shard_of_uid.astype(str), return_counts=True)
    counts.update({str(name): int(n) for name, n in zip(names, numbers)})
    write_subset_sizes(path, len(np.unique(uids)), counts)


def _metaclip(args: argparse.Namespace) -> None:
    import dataclasses

    from clip.curation.metaclip import Balance, count_matches, load_metadata
    from clip.data.selection import pool_records, write_subset_sizes
    from clip.data.subset import write_subset

    if args.balance and (args.count or args.metadata or args.shards):
        raise ValueError("metaclip: --balance selects from counts already made; --count, --metadata, --shards count anew")
    if args.balance:
        balance = Balance.load(args.balance)
    else:
        if not (args.metadata and args.shards):
            raise ValueError("metaclip: give --metadata and --shards to count, or --balance FILE to select")
        records = ((r.shard, r.uid, r.caption) for r in pool_records(_pool_urls(args.shards)))
        balance = count_matches(load_metadata(args.metadata), records, threshold=args.t or DEFAULT_THRESHOLD)
        matched = int((balance.counts > 0).sum())
        print(f"metaclip: {balance.num_samples} samples, {len(balance.match_entry)} matches of {matched} of "
              f"{len(balance.entries)} entries (t = {balance.threshold:g})")
        if args.count:
            balance.save(args.out)
            print(f"metaclip: balance file written to {args.out}")
            return
        balance.save(Path(args.out).with_suffix(".balance.npz"))  # what data.balance reads, the counts kept
    if args.t is not None:
        balance = dataclasses.replace(balance, threshold=args.t)
    uids, per_shard = balance.kept(args.seed)
    write_subset(args.out, uids)
    write_subset_sizes(args.out, len(uids), per_shard)
    print(f"metaclip: kept {len(uids)} of {balance.num_samples} samples (t = {balance.threshold:g}, seed {args.seed}), "
          f"written to {args.out}")


def _read_target(path: str) -> np.ndarray:
    from clip.curation.embeddings import read_embedding_dir

    if Path(path).is_dir():
        return read_embedding_dir(path).image_embedding.astype(np.float32)
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: target embeddings must be a float [M, D] array, got {array.dtype} {array.shape}")
    return array.astype(np.float32)


def _filter_mask(args: argparse.Namespace, table) -> np.ndarray:
    from clip.curation import clusters, dedup, image_filter, score_filter, text_filter

    if args.command == "clip-score":
        return score_filter.clip_score_mask(table.clip_score, threshold=args.threshold, top_fraction=args.top)
    if args.command == "text":
        if not (args.imagenet21k or args.words):
            raise ValueError("text: give --imagenet21k, --words FILE, or both")
        words = text_filter.imagenet21k_lemmas() if args.imagenet21k else []
        words += text_filter.read_word_list(args.words) if args.words else []
        mask = text_filter.mentions_mask(table.caption, words)
        return mask & text_filter.english_mask(table.caption) if args.english else mask

    embeddings = (table.image_embedding if args.embedding == "image" else table.text_embedding).astype(np.float32)
    options = {"iterations": args.iterations, "seed": args.seed, "backend": args.backend}
    if args.command == "dedup":
        centres = clusters.kmeans(embeddings, args.clusters, **options)
        return dedup.semantic_dedup_mask(
            embeddings, centres, threshold=args.threshold, keep=args.keep, clip_scores=table.clip_score
        )
    # DataComp clusters the caption-filtered pool (image_based_clustering.py) and keeps only its samples.
    candidates = text_filter.caption_quality_mask(table.caption) if args.english else np.ones(len(table), bool)
    centres = clusters.kmeans(embeddings[candidates], args.clusters, **options)
    return candidates & image_filter.image_based_mask(embeddings, centres, _read_target(args.target))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from clip.curation.embeddings import read_embedding_dir
    from clip.curation.subsets import combine, summarize
    from clip.data.sources import DataError
    from clip.data.subset import read_subset, write_subset

    try:
        if args.command in ("and", "or", "minus"):
            kept = combine(args.command, [read_subset(path) for path in args.subsets])
            write_subset(args.out, kept)
            print(f"{args.command}: {len(kept)} uids written to {args.out}; for epoch mode write its per-shard "
                  f"counts: python scripts/curate.py sizes --subset {args.out} --shards '<data.train_shards>'")
            return 0
        if args.command == "sizes":
            from clip.data.selection import count_subset_in_shards, write_subset_sizes

            subset = read_subset(args.subset)
            counts = count_subset_in_shards(subset, _pool_urls(args.shards))
            path = write_subset_sizes(args.subset, len(subset), counts)
            print(f"sizes: {sum(counts.values())} of the subset's {len(subset)} uids found in {len(counts)} shards, written to {path}")
            return 0
        if args.command == "metaclip":
            _metaclip(args)
            return 0
        if args.command == "summary":
            subset = read_subset(args.subset)
            print(f"{args.subset}: {len(subset)} uids")
            if args.embeddings:
                counts, elsewhere = summarize(subset, read_embedding_dir(args.embeddings))
                width = max(len(c.shard) for c in counts)
                for c in counts:
                    print(f"{c.shard.ljust(width)}  {c.kept:>10} of {c.total:>10}  ({c.kept / max(c.total, 1):.1%})")
                kept, total = sum(c.kept for c in counts), sum(c.total for c in counts)
                print(f"{'all shards'.ljust(width)}  {kept:>10} of {total:>10}  ({kept / max(total, 1):.1%})")
                if elsewhere:
                    print(f"{elsewhere} uids of the subset are in none of these shards")
            return 0
        table = read_embedding_dir(args.embeddings)
        mask = _filter_mask(args, table)
    except (OSError, ValueError, ImportError, DataError) as error:
        sys.exit(f"error: {args.command}: {error}")
    _write_with_sizes(args.out, table.uid[mask], table.shard[mask], np.unique(table.shard))
    print(f"{args.command}: kept {int(mask.sum())} of {len(table)} samples ({mask.mean():.1%}), written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
