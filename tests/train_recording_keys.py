"""scripts/train.py, with every batch's sample keys written down: which samples each rank trained on.

    torchrun ... tests/train_recording_keys.py KEYS_DIR <scripts/train.py arguments>

Rank r appends one line per batch to KEYS_DIR/rank-<r>.txt: the loader's epoch, then the keys. The
trainer is otherwise the real one (the wrapper only reads what its loader hands out), so a test can
check how the samples were split over processes and nodes.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import clip.train

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train.py"


class RecordingLoader:
    """The trainer's TrainLoader, passed through, writing each batch's keys as it goes."""

    def __init__(self, loader, path: Path):
        self._loader = loader
        self._path = path

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        batches = iter(self._loader)
        epoch = self._loader.next_epoch - 1  # iter() moved it to the epoch after the one it yields
        with self._path.open("a") as f:
            for batch in batches:
                f.write(f"{epoch} {' '.join(batch.keys)}\n")
                f.flush()
                yield batch


def main() -> None:
    keys_dir = Path(sys.argv.pop(1))
    keys_dir.mkdir(parents=True, exist_ok=True)
    build = clip.train.build_train_loader

    def build_recording(*args, **kwargs):
        return RecordingLoader(build(*args, **kwargs), keys_dir / f"rank-{os.environ.get('RANK', '0')}.txt")

    clip.train.build_train_loader = build_recording
    sys.argv[0] = str(SCRIPT)
    runpy.run_path(str(SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
