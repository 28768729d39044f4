"""Hydra composition of `configs/` into a typed TrainConfig: the trainer's only Hydra code.

The schema (`train_schema`, a TrainConfig) is registered in Hydra's ConfigStore, so struct mode and
type checks apply to every YAML file and command-line override. The `model` group has one option per
registry architecture (`model=ViT-L-14`), read from `clip.models.registry`, the one source of truth;
`model.vision.width=1024` then overrides a field of it, type-checked. Composition errors become
ConfigError with the full key and, for unknown keys, the nearest valid one.

Not imported by `import clip` (Hydra stays out of the package's import chain).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from clip.config import ConfigError, TrainConfig, TrainModelConfig, validate_train_config
from clip.models.registry import get_model_config, list_models

# A key's last segment that names a credential : such keys are refused, never stored or echoed.
SECRET_KEY_PATTERN = re.compile(r"(?i)(^|[_-])(api[_-]?key|access[_-]?key|token|secret|password|passwd|credentials?)$")

# Hydra sweeps would run jobs without the up-front config checks and write every override to
# multirun.yaml, secrets included; one launch per setting is as easy and keeps both guarantees.
MULTIRUN_REFUSED = (
    "Hydra multirun (-m, hydra.mode=MULTIRUN) is not supported: launch one run per setting instead, each with "
    "its own output_dir (a shell loop, or a SLURM job array)"
)


def register_configs() -> None:
    """Put the schema and the registry's architectures into Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in list_models():
        architecture = get_model_config(name)
        fields = {f.name: getattr(architecture, f.name) for f in dataclasses.fields(architecture)}
        store.store(group="model", name=name, node=TrainModelConfig(name=name, **fields))


def to_train_config(cfg: DictConfig, model_choice: str | None = None) -> TrainConfig:
    """Validate a composed config and convert it to a TrainConfig, or raise ConfigError.

    `model_choice` is the `model=` group option Hydra selected; `model.name` must equal it (setting
    `model.name` alone would relabel an architecture, not select one).
    """
    try:
        # Builds the TrainConfig dataclasses, reading every value: a `???` left anywhere raises here.
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise explain_config_error(error) from None
    if model_choice is not None and config.model.name != model_choice:
        raise ConfigError(
            f"model.name={config.model.name!r} does not select an architecture; use model={config.model.name} "
            f"(the `model` group has one option per registered architecture)"
        )
    # `+optim.lrr=0.1` opens the struct and adds the key, and to_object would drop it silently.
    valid_keys = set(_schema_keys(TrainConfig))
    for key in _config_keys(cfg):
        _refuse_secret_key(key)
        if key not in valid_keys:
            raise ConfigError(_unknown_key_message(key, f"{key} is not a config key"))
    validate_train_config(config)
    return config


def compose_train_config(config_dir: str | Path, overrides: Sequence[str] = (), config_name: str = "train") -> TrainConfig:
    """Compose `config_dir/config_name.yaml` with `overrides` as `scripts/train.py` would (tests, notebooks)."""
    for override in overrides:
        _refuse_secret_key(override.split("=", 1)[0].lstrip("+~"))
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except Exception as error:  # Hydra and OmegaConf raise several unrelated types
        raise explain_config_error(error) from None
    if cfg.hydra.mode == RunMode.MULTIRUN:
        raise ConfigError(MULTIRUN_REFUSED)
    model_choice = cfg.hydra.runtime.choices.get("model")
    with open_dict(cfg):
        del cfg["hydra"]
    return to_train_config(cfg, model_choice)


def explain_config_error(error: BaseException) -> ConfigError:
    """A ConfigError from a Hydra/OmegaConf error: the full key, and the nearest valid key if unknown."""
    if isinstance(error, OverrideParseException):
        return ConfigError(_override_syntax_message(error))
    if isinstance(error, MissingConfigException) and error.options and "/" in (error.missing_cfg_file or ""):
        return ConfigError(_missing_option_message(error.missing_cfg_file, list(error.options)))
    # Hydra wraps OmegaConf's error, which carries the full key ("optim.lrr"), in its own message.
    cause: BaseException | None = error
    while cause is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ConfigError(str(error).strip())
    full_key = cause.full_key
    _refuse_secret_key(full_key)
    if isinstance(cause, MissingMandatoryValue):
        return ConfigError(f"{full_key} is required: set {full_key}=...")
    text = f"{full_key}: {str(cause).strip().splitlines()[0]}"
    if "is not a ListConfig" in text:  # `eval.zero_shot=/data/val`: the brackets are easy to forget
        text += f" ({full_key} takes a list: {full_key}=[a,b])"
    return ConfigError(_unknown_key_message(full_key, text))


def _override_syntax_message(error: OverrideParseException) -> str:
    """Hydra's grammar error, with the quoting that fixes the usual cause: a shard pattern's braces
    (or a comma, space or colon) in an unquoted value, once the shell has removed its own quotes."""
    reason = error.message.strip().splitlines()[0]
    key, sep, value = error.override.partition("=")
    text = f"cannot parse the override {error.override!r}: {reason}"
    if sep and value and value[0] not in "'\"[" and re.search(r"[{}(),: ]", value):
        text += f"; quote the value for Hydra inside the shell's quotes: \"{key}='{value}'\""
    return text


def _missing_option_message(missing: str, options: list[str]) -> str:
    """A group option that does not exist (`+experiment=vitb32`, `model=ViT-B32`): the nearest one
    and the list, without Hydra's config search path."""
    group, name = missing.rsplit("/", 1)
    text = f"{group}={name} does not exist"
    nearest = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if nearest:
        text += f" (did you mean {group}={nearest[0]}?)"
    return f"{text}; {group} options: {', '.join(options)}"


def _unknown_key_message(full_key: str, text: str) -> str:
    valid_keys = list(_schema_keys(TrainConfig))
    if re.sub(r"\[\d+\]$", "", full_key) not in valid_keys:
        nearest = difflib.get_close_matches(full_key, valid_keys, n=1, cutoff=0.6)
        if nearest:
            text += f" (did you mean {nearest[0]}?)"
    return text


def _refuse_secret_key(key: str) -> None:
    if SECRET_KEY_PATTERN.search(key.split(".")[-1]):
        raise ConfigError(
            f"{key}: configs must not hold credentials (they would be written to config.yaml, checkpoints and "
            f"wandb); give them through the environment, e.g. WANDB_API_KEY, or the tool's own login"
        )


def _schema_keys(schema: type, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _schema_keys(type(default), key + ".")
        else:
            yield key


def _config_keys(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    for key, value in cfg.items_ex(resolve=False):
        if isinstance(value, DictConfig):
            yield from _config_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"

