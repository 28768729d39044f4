"""Generated pools for the curation tests: shards with key.json uids, a tiny exported model, embed runs."""

from __future__ import annotations

import importlib.util
import json
import tarfile
import zlib
from pathlib import Path

from clip.models.hub_export import export_model
from tests.data_shards import add_member, tiny_jpeg
from tests.eval_fixtures import tiny_model

EMBED_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "embed.py"
CURATE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "curate.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def json_uid(shard: int, index: int) -> str:
    return f"{zlib.crc32(f'{shard}-{index}'.encode()):08x}" * 4


def write_pool(
    directory: Path, num_shards: int = 4, per_shard: int = 5, corrupt: tuple[int, int] | None = None
) -> list[str]:
    """Shards `pool-<i>.tar` of `per_shard` samples; even samples carry a key.json uid (DataComp's
    layout), odd ones none (their uid is their key's hash). `corrupt=(shard, sample)` gets bad JPEG bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = directory / f"pool-{shard:03d}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for index in range(per_shard):
                key = f"{shard:03d}{index:04d}"
                image = b"not a jpeg" * 20 if corrupt == (shard, index) else tiny_jpeg(1000 * shard + index)
                add_member(tar, f"{key}.jpg", image)
                add_member(tar, f"{key}.txt", f"a photo number {index} of shard {shard}".encode())
                if index % 2 == 0:
                    add_member(tar, f"{key}.json", json.dumps({"uid": json_uid(shard, index), "key": key}).encode())
        paths.append(str(path))
    return paths


def export_tiny_model(path: Path) -> Path:
    """A seeded tiny-vit written as an export, which `clip.load(path)` reads."""
    return export_model(tiny_model(), path)
