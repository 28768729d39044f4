"""Weights by name: OpenCLIP's pretrained tags and `hf-hub:` repositories -> local files, offline first.

    clip.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")   # an OpenCLIP tag
    clip.create_model_and_transforms("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")  # a hub repository
    clip.load("hf-hub:openai/clip-vit-base-patch32@3d74acf")                        # pinned to a revision

Files live in huggingface_hub's cache (`HF_HUB_CACHE`, by default `$HF_HOME/hub` =
~/.cache/huggingface/hub, shared with transformers and OpenCLIP). A file already in the cache is used
without contacting the hub, so a node without network loads what was fetched once; a file not in the
cache is downloaded into it, unless `HF_HUB_OFFLINE=1`, and then the error names the repository, the
file and the cache path. A cached `main` is not refreshed: pin `@revision` (branch, tag or commit) to
follow a repository. Downloads are huggingface_hub's own (resumable, atomic, verified).

Repositories in two formats are understood: OpenCLIP's (`open_clip_config.json` and
`open_clip_model.safetensors`, else `open_clip_pytorch_model.bin`) and transformers' `CLIPModel`
(`config.json` and `model.safetensors`, sharded safetensors or `pytorch_model.bin`). `.bin` files are
read with `torch.load(weights_only=True)` like every torch file here.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from clip.config import ModelConfig
from clip.models.convert import openclip_config_to_model_config
from clip.models.registry import OPENAI_NAMES
from clip.models.weights import CheckpointFormatError
from clip.transforms import OPENAI_MEAN, OPENAI_STD

PathLike = Union[str, os.PathLike]

HUB_PREFIX = "hf-hub:"
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # safetensors preferred
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_PREPROCESSOR = "preprocessor_config.json"

_TAGS_PATH = Path(__file__).parent / "assets" / "pretrained_tags.json"


@dataclass(frozen=True)
class Preprocess:
    """The image preprocessing a set of weights was trained with."""

    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    resize_mode: str = "shortest"  # eval resize: "shortest" side then center crop, or "squash" to a square


@dataclass
class Weights:
    """Where a model's weights are and what the source says they need."""

    path: Path  # a checkpoint file or a Hugging Face CLIPModel directory
    source: str  # for messages: the tag or repository the file came from
    config: Optional[ModelConfig] = None  # the architecture the source states; None: read from the file
    activation: Optional[str] = None  # the activation the weights were trained with, when only the source says
    preprocess: Preprocess = field(default_factory=Preprocess)


# ---------------------------------------------------------------------------------------------- tags


@functools.cache
def _tags() -> dict[str, dict[str, dict]]:
    return json.loads(_TAGS_PATH.read_text())


def list_pretrained(name: Optional[str] = None) -> list[tuple[str, str]]:
    """(model name, pretrained tag) pairs with released weights, as OpenCLIP's `list_pretrained()`."""
    return [(model, tag) for model, tags in _tags().items() if name in (None, model) for tag in tags]


def get_pretrained_tag(name: str, tag: str) -> Optional[dict]:
    """The table entry of `tag` for model `name` (OpenAI's names resolve to their registered model), or None."""
    return _tags().get(OPENAI_NAMES.get(name, name), {}).get(tag)


# ------------------------------------------------------------------------------------------ resolving


def is_hub_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def resolve_pretrained(pretrained: PathLike, name: Optional[str], cache_dir: Optional[PathLike] = None) -> Weights:
    """`pretrained=` -> Weights: an existing path, an `hf-hub:` name, or a pretrained tag of model `name`."""
    path = Path(pretrained).expanduser()
    if path.exists():
        return Weights(path, str(path))
    text = str(pretrained)
    if is_hub_name(text):
        return resolve_hub_repo(text, cache_dir)
    entry = get_pretrained_tag(name, text) if name is not None else None
    if entry is not None:
        file = _download(entry["hf_hub"], OPENCLIP_WEIGHTS, None, cache_dir)
        preprocess = Preprocess(tuple(entry["mean"]), tuple(entry["std"]), entry["resize_mode"])
        source = f"{name} pretrained={text!r} (hf-hub:{entry['hf_hub']})"
        return Weights(file, source, activation=entry["activation"], preprocess=preprocess)
    if name is None:
        raise FileNotFoundError(
            f"pretrained={text!r} is not a file or an hf-hub: name (a pretrained tag needs a model name)"
        )
    tags = [tag for _, tag in list_pretrained(OPENAI_NAMES.get(name, name))]
    raise FileNotFoundError(
        f"pretrained={text!r} is not a file, an hf-hub: name, or a pretrained tag of {name!r} "
        f"(its tags: {', '.join(tags) if tags else 'none'}; all: clip.list_pretrained())"
    )


def parse_hub_name(name: str) -> tuple[str, Optional[str]]:
    """'hf-hub:ORG/NAME[@REVISION]' -> (repo id, revision or None for the default branch)."""
    repo_id, _, revision = name[len(HUB_PREFIX) :].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{name!r} is not of the form hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo_id, revision or None


def resolve_hub_repo(name: str, cache_dir: Optional[PathLike] = None) -> Weights:
    """Fetch (or find in the cache) a repository's config and weights: OpenCLIP's format, else transformers'."""
    repo_id, revision = parse_hub_name(name)
    config_file = _download(repo_id, (OPENCLIP_CONFIG, HF_CONFIG), revision, cache_dir)
    if config_file.name == OPENCLIP_CONFIG:
        try:
            config = json.loads(config_file.read_text())
            model_cfg = config["model_cfg"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointFormatError(f"{name}: {config_file} is not an OpenCLIP config ({exc!r})") from None
        preprocess_cfg = config.get("preprocess_cfg", {})
        preprocess = Preprocess(
            tuple(preprocess_cfg.get("mean", OPENAI_MEAN)),
            tuple(preprocess_cfg.get("std", OPENAI_STD)),
            preprocess_cfg.get("resize_mode", "shortest"),
        )
        model_config = openclip_config_to_model_config(model_cfg, config_file)  # refused before a download
        weights = _download(repo_id, OPENCLIP_WEIGHTS, revision, cache_dir)
        return Weights(weights, name, model_config, preprocess=preprocess)

    weights = _download(repo_id, HF_WEIGHTS, revision, cache_dir)
    if weights.name == "model.safetensors.index.json":
        for shard in sorted(set(json.loads(weights.read_text())["weight_map"].values())):
            _download(repo_id, (shard,), revision, cache_dir)
    preprocess = Preprocess()
    processor = _download(repo_id, (HF_PREPROCESSOR,), revision, cache_dir, required=False)
    if processor is not None:
        settings = json.loads(processor.read_text())
        preprocess = Preprocess(
            tuple(settings.get("image_mean", OPENAI_MEAN)), tuple(settings.get("image_std", OPENAI_STD))
        )
    # The snapshot directory holds the files fetched above: it reads as a Hugging Face CLIPModel directory.
    return Weights(config_file.parent, name, preprocess=preprocess)


def _download(
    repo_id: str, filenames: tuple[str, ...], revision: Optional[str], cache_dir: Optional[PathLike], required=True
) -> Optional[Path]:
    """The first of `filenames` the repository has, from the cache if there, else downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(filename: str, local_files_only: bool) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))  # fmt: skip

    for filename in filenames:  # offline first: a cached file needs no network
        try:
            return fetch(filename, local_files_only=True)
        except LocalEntryNotFoundError:
            pass
    repo = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    cache = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    wanted = " or ".join(filenames)
    pin = f" --revision {revision}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        if not required:
            return None
        raise FileNotFoundError(
            f"{repo}: {wanted} is not in the cache at {cache}, and HF_HUB_OFFLINE=1 forbids downloading it. Fetch "
            f"it where there is network (`hf download {repo_id} {filenames[0]}{pin}` with the same HF_HUB_CACHE) or "
            "unset HF_HUB_OFFLINE."
        )
    for filename in filenames:
        try:
            return fetch(filename, local_files_only=False)
        except LocalEntryNotFoundError as exc:  # huggingface_hub's answer when the hub cannot be reached
            raise FileNotFoundError(
                f"{repo}: {filename} is not in the cache at {cache} and could not be downloaded ({exc})"
            ) from exc
        except EntryNotFoundError:  # the repository has no such file: try the next name
            continue
        except OSError as exc:  # repository or revision not found, access refused, HTTP errors
            raise FileNotFoundError(f"{repo}: could not download {filename} into {cache}: {exc}") from exc
    if not required:
        return None
    raise FileNotFoundError(f"{repo} has none of {wanted} (cache: {cache})")
