"""The two things a shard reader produces: raw sample records and skip events."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
METADATA_EXTENSION = "json"  # img2dataset's per-sample metadata; only its `uid` is read (clip.data.subset)
# Expected in img2dataset shards; where a reader does not ask for it, dropped without counting.
KNOWN_UNUSED_EXTENSIONS = ("json",)  # eval shards: metadata not read

# Why something was skipped; the trainer logs them as `data/skipped/<reason>`.
SAMPLE_REASONS = ("decode_error", "too_large", "missing_field")  # a sample is lost
SHARD_REASONS = ("truncated_shard", "unreadable_shard")  # a shard ended early or never opened
MEMBER_REASONS = ("ignored_member", "unsafe_member")  # a tar member was not read (no sample lost by itself)
SKIP_REASONS = SAMPLE_REASONS + SHARD_REASONS + MEMBER_REASONS
# data.max_skip_fraction counts lost samples; broken shards have their own limits (max_unreadable_shards,
# and a reader that decodes nothing for a long stretch raises).


class Record(NamedTuple):
    """A sample as read from a shard, not decoded yet. Exactly one of `image`/`image_path` is set."""

    shard: str
    key: str
    image: Optional[bytes]
    image_path: Optional[str]  # CSV rows: read at decode time, so skipping records costs no I/O
    caption: str
    uid: str  # 32 hex digits naming the sample across the pool (clip.data.subset.sample_uid)


class SkipEvent(NamedTuple):
    """Something skipped while reading or decoding, with where it happened (for logs and error messages)."""

    reason: str
    shard: str
    key: str
    detail: str


Item = Union[Record, SkipEvent]
