"""Write `sizes.json` (per-shard sample counts) for existing shards, in OpenCLIP's format.

    python -m clip.data.manifest '/data/laion/{00000..41407}.tar'

Counts are read with the library's own tar reader, so a truncated shard is reported here, not at
training time. The file goes beside the shards (one per directory), where epoch mode looks for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from clip.data.records import Record
from clip.data.sources import expand_pattern, name_some
from clip.data.tar_reader import iter_tar_samples


def count_samples(path: str) -> tuple[int, list[str]]:
    """Samples in a local tar shard (records and samples with missing fields alike), and any problems."""
    keys, problems = 0, []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for item in iter_tar_samples(f, path, max_member_bytes=1 << 62, size=size):
            if isinstance(item, Record) or item.reason in ("missing_field", "too_large"):
                keys += 1
            elif item.reason == "truncated_shard":
                problems.append(item.detail)
    return keys, problems


def write_manifests(paths: list[str]) -> dict[str, dict[str, int]]:
    """Count every shard and write/update `sizes.json` in each shard directory; returns {dir: counts}."""
    # Checked before the (long) count, and every damaged shard named at the end, so one run lists
    # all there is to fix.
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"not writing a manifest: {len(missing)} of {len(paths)} shards do not exist: {name_some(missing)}")
    by_directory: dict[str, dict[str, int]] = defaultdict(dict)
    damaged: list[str] = []
    for path in paths:
        count, problems = count_samples(path)
        damaged += problems
        by_directory[os.path.dirname(os.path.abspath(path))][os.path.basename(path)] = count
    if damaged:
        raise SystemExit(f"not writing a manifest: {'; '.join(damaged)}")
    for directory, counts in by_directory.items():
        manifest = os.path.join(directory, "sizes.json")
        existing = json.load(open(manifest, encoding="utf-8")) if os.path.exists(manifest) else {}
        existing.update(counts)
        tmp = manifest + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(existing, f, indent=1, sort_keys=True)
        os.replace(tmp, manifest)
    return dict(by_directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="local shard paths or brace patterns")
    args = parser.parse_args(argv)
    paths = [path for pattern in args.shards for path in expand_pattern(pattern)]
    for directory, counts in write_manifests(paths).items():
        print(f"{directory}/sizes.json: {len(counts)} shards, {sum(counts.values())} samples", file=sys.stderr)


if __name__ == "__main__":
    main()
