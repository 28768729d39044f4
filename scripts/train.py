"""Train a CLIP model.

    python scripts/train.py +experiment=smoke output_dir=runs/smoke          # CPU, minutes
    torchrun --nproc-per-node 8 scripts/train.py +experiment=vit_b32 output_dir=runs/b32 "data.train_shards='/data/{000..999}.tar'"
    python scripts/train.py +experiment=vit_l14 --cfg job                    # print the composed config

A thin Hydra entry point: composition and validation, then clip.train.train(cfg). Exit codes:
0 done, 2 config error (nothing was written), 3 diverged (non-finite loss), 143 preempted (a
checkpoint was written; the same command resumes). Brace patterns take two layers of quotes, the
shell's and Hydra's, as above.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from clip.config import ConfigError
from clip.hydra_config import MULTIRUN_REFUSED, compose_train_config, register_configs, to_train_config
from clip.lifecycle import EXIT_CONFIG_ERROR, EXIT_DIVERGED, EXIT_PREEMPTED

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _exit_config_error(error: ConfigError) -> None:
    print(f"config error: {error}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
@record
def main(cfg: DictConfig) -> None:
    # Imported here so that a config error is reported before the trainer's heavier imports.
    from clip.step import NonFiniteLossError
    from clip.train import train

    try:
        result = train(to_train_config(cfg, HydraConfig.get().runtime.choices.get("model")))
    except ConfigError as error:
        _exit_config_error(error)
    except NonFiniteLossError as error:
        print(f"training diverged: {error}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    if result.preempted:
        sys.exit(EXIT_PREEMPTED)


def check_overrides(argv: list[str]) -> None:
    """Compose once before Hydra runs, so that a typo exits 2 with the key (and the nearest valid key)
    instead of Hydra's generic exit 1, and nothing is written. Sweeps (-m) are refused (see
    MULTIRUN_REFUSED); config printing (--cfg, --help, --info) is left to Hydra."""
    args = get_args_parser().parse_args(argv)
    if args.multirun:
        _exit_config_error(ConfigError(MULTIRUN_REFUSED))
    if args.cfg or args.help or args.hydra_help or args.info or args.config_dir or args.config_path:
        return
    try:
        compose_train_config(CONFIG_DIR, args.overrides, config_name=args.config_name or "train")
    except ConfigError as error:
        _exit_config_error(error)


if __name__ == "__main__":
    register_configs()
    check_overrides(sys.argv[1:])
    main()
