"""Data: the training pipeline and the evaluation datasets.

    from clip.data import build_train_loader, check_train_data

Training: WebDataset shards (local or remote) and CSV files -> batches with exact, resumable positions
(docs/data.md). Eval datasets live in `clip.data.eval_datasets` (shards: `eval_shards`, CIFAR:
`eval_cifar`, shipped lists: `eval_assets`); the synthetic shard writer in `clip.data.synthetic`.
"""

from clip.config import DataConfig
from clip.data.loader import TrainLoader, build_train_loader
from clip.data.plan import check_reader_count
from clip.data.selection import build_selector
from clip.data.sources import DataConfigError, DataError, resolve_sources
from clip.data.stream import Batch


def check_train_data(data_cfg: DataConfig, *, world_size: int) -> None:
    """Startup checks to run before any process-group work.

    Raises DataConfigError naming the `data.<key>` to fix: unset or malformed `data.train_shards`, a
    missing local shard, list or CSV file, a `pipe:` URL without `data.allow_pipe_urls`, a remote URL
    carrying credentials or whose SDK is not installed, epoch mode without sample counts, a bad
    `data.subset` or `data.balance` file, or fewer shards than `world_size x num_workers` readers in
    epoch mode.
    """
    sources = resolve_sources(data_cfg, read_csv=False)
    build_selector(data_cfg, seed=0)  # a missing or malformed data.subset / data.balance file
    num_shards = sum(len(source.shards) for source in sources)
    if not data_cfg.resampled and all(source.csv_rows is None for source in sources):
        check_reader_count(num_shards, world_size, data_cfg.num_workers)


__all__ = [
    "Batch",
    "DataConfigError",
    "DataError",
    "TrainLoader",
    "build_train_loader",
    "check_train_data",
]
