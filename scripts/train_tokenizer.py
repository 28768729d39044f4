"""Train a byte-level BPE vocabulary for a text tower from captions, with `tokenizers`.

    PYTHONPATH=. python scripts/train_tokenizer.py --vocab-size 32000 --output tok/tokenizer.json \
        captions.txt 'shards/train-{000000..000099}.tar'

Inputs are caption files (UTF-8, one caption per line) and WebDataset shards (.tar), whose `.txt`
members are the captions; brace patterns are expanded as training's shard specs are, and every
input must exist before training starts. Shards are streamed with `tarfile`: nothing is extracted to disk, only
regular `.txt` members are read, each at most --max-text-bytes, and no other member is decoded
(nothing is unpickled; unsafe members are skipped). Captions are cleaned exactly as at tokenization time (`clip.tokenizer.clean_text`:
ftfy, HTML unescaping, whitespace collapsed), then lowercased unless --cased.

The result is a lossless byte-level BPE (any text encodes, and decoding gives back the cleaned
text) whose post-processor wraps every text in <|startoftext|> ... <|endoftext|>; these two are
the largest ids, as in OpenAI's vocabulary. The script prints the model-config overrides that
select it, e.g. `model.text.tokenizer=tok/tokenizer.json model.text.vocab_size=32000
model.text.eot_token_id=31999`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from clip.data.sources import expand_pattern, name_some
from clip.tokenizer import EOT_TEXT, SOT_TEXT, clean_text, get_tokenizer

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def shard_captions(path: Path, max_bytes: int, skipped: collections.Counter) -> Iterator[str]:
    """The `.txt` members of a WebDataset shard, streamed; anything else is never read."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.name.endswith(".txt"):
                continue
            if not member.isreg():  # symlinks, hard links, devices
                skipped["not a regular file"] += 1
            elif member.size > max_bytes:
                skipped[f"over {max_bytes} bytes"] += 1
            else:
                yield from _decoded(tar.extractfile(member).read(), skipped)


def file_captions(path: Path, max_bytes: int, skipped: collections.Counter) -> Iterator[str]:
    """The lines of a caption file; a line over `max_bytes` is skipped without being held whole."""
    with open(path, "rb") as f:
        while line := f.readline(max_bytes + 1):
            if len(line) > max_bytes:
                skipped[f"over {max_bytes} bytes"] += 1
                while line and not line.endswith(b"\n"):  # drop the rest of the long line
                    line = f.readline(max_bytes + 1)
                continue
            yield from _decoded(line, skipped)


def _decoded(data: bytes, skipped: collections.Counter) -> Iterator[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not UTF-8"] += 1
        return
    text = clean_text(text)
    if text:
        yield text


def read_captions(paths: list[Path], max_bytes: int, counts: collections.Counter) -> Iterator[str]:
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist")
        is_shard = path.name.endswith(SHARD_SUFFIXES)
        for text in (shard_captions if is_shard else file_captions)(path, max_bytes, counts):
            counts["captions"] += 1
            yield text


def train(texts: Iterator[str], vocab_size: int, min_frequency: int, lowercase: bool) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids at most, the last two being start and end of text."""
    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    # GPT-2's split (a word keeps its leading space) + bytes as symbols: every text is encodable
    # and decoding is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([SOT_TEXT, EOT_TEXT])  # appended: the two largest ids
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TEXT} $A {EOT_TEXT}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in (SOT_TEXT, EOT_TEXT)],
    )
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="caption files and WebDataset shards (.tar, or a brace pattern)")
    parser.add_argument("--output", type=Path, required=True, help="tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, required=True, help="ids in all, start/end tokens included")
    parser.add_argument("--min-frequency", type=int, default=2, help="rarest pair that may be merged")
    parser.add_argument("--cased", action="store_true", help="keep case (OpenAI's vocabulary is lowercase)")
    parser.add_argument("--max-text-bytes", type=int, default=64 * 1024, help="longer captions are skipped")
    args = parser.parse_args(argv)
    if args.vocab_size <= 256 + 2:
        parser.error(f"--vocab-size={args.vocab_size} must exceed the 256 byte symbols and 2 special tokens")
    inputs = [Path(path) for pattern in args.inputs for path in expand_pattern(pattern)]
    missing = [str(path) for path in inputs if not path.is_file()]
    if missing:  # before training, not when the reader reaches them
        parser.error(f"{len(missing)} of {len(inputs)} inputs do not exist: {name_some(missing)}")

    counts: collections.Counter = collections.Counter()
    texts = read_captions(inputs, args.max_text_bytes, counts)
    tokenizer = train(texts, args.vocab_size, args.min_frequency, lowercase=not args.cased)
    num_captions = counts.pop("captions")
    if num_captions == 0:
        sys.exit(f"no captions found in {', '.join(map(str, args.inputs))}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output))

    trained = get_tokenizer(str(args.output))  # loads it back the way training will
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) or "none"
    print(f"trained on {num_captions} captions (skipped: {skipped}); wrote {args.output}")
    print(
        f"model.text.tokenizer={args.output} model.text.vocab_size={trained.vocab_size} "
        f"model.text.eot_token_id={trained.eot_token_id}"
    )


if __name__ == "__main__":
    main()
