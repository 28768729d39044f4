"""Text -> token ids for the text tower.

One interface, `Tokenizer`, for two kinds of vocabulary, chosen by `model.text.tokenizer`:

* ``"openai"``: OpenAI's CLIP byte-level BPE (49,408 ids, ``<|startoftext|>`` 49406,
  ``<|endoftext|>`` 49407) with OpenAI's text cleaning. Its ids equal those of OpenAI's and
  OpenCLIP's pure-Python tokenizer (tests/test_tokenizer.py compares thousands of strings); it is
  several times faster (docs/benchmarks.md).
* a path to a `tokenizers` ``tokenizer.json`` (e.g. written by scripts/train_tokenizer.py), for
  text towers with their own vocabulary (other languages, other domains).

A batch is a ``torch.long`` tensor [N, L]: start token, text tokens, end-of-text token, zeros. The
text tower pools at the first end-of-text token and attends causally, so the zeros after it never
change the features.

Fork safety: we never call the batch methods of `tokenizers`, so its Rayon thread pool never starts
in the processes that tokenize, and forked DataLoader workers can neither deadlock on it nor print
its "process just got forked" warning (versions before 0.23).
"""

from __future__ import annotations

import array
import functools
import gzip
import html
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import ftfy
import numpy as np
import regex
import tokenizers
import torch

from clip.config import ConfigError, TextConfig
from clip.models.export import get_tokenizer_json
from clip.models.registry import MODEL_CONFIGS, OPENAI_NAMES, get_model_config

OPENAI = "openai"
DEFAULT_CONTEXT_LENGTH = 77
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"

_MERGES_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's vocabulary: 256 byte symbols, the same 256 as word endings ("a</w>"), the first 48,894
# merges of the file, then the two special tokens: 49,408 ids.
_NUM_OPENAI_MERGES = 49408 - 2 * 256 - 2

# Text that ftfy.fix_text and html.unescape provably return unchanged: NFC-normalized text without
# an '&' that could start an HTML entity and without any of the characters below, a superset of
# those that ftfy's fixes act on or that its mojibake detector looks for (ASCII controls but tab and
# newline; Latin-1 to Latin Extended-B; spacing modifiers; Greek and Cyrillic; punctuation,
# currency, letterlike, arrows, maths and technical symbols; box drawing; ideographic space;
# surrogates; private use; ligatures; BOM; half- and full-width forms and specials).
# tests/test_tokenizer.py checks the superset against ftfy's tables and every code point. ftfy
# costs more than the whole BPE, so skipping it for plain ASCII, CJK, Hangul, Thai, Arabic, Hebrew,
# Devanagari or emoji text is what makes cleaning cheap.
_FTFY_CHARS = (
    "\x00-\x08\x0b-\x1f\x7f-\u024f\u02b0-\u02ff\u0370-\u052f\u2000-\u20cf\u2100-\u23ff"
    "\u2500-\u25ff\u3000\ud800-\udfff\ue000-\uf8ff\ufb00-\ufb4f\ufeff\uff00-\uffff"
)
_FTFY_CHAR = re.compile(f"[{_FTFY_CHARS}]")
_HTML_ENTITY_START = re.compile(r"&(?![\t\n ]|\Z)")
_FTFY_CONFIG = ftfy.TextFixerConfig(explain=False)  # fix_text's default, built once

# OpenAI's pre-tokenizer pattern, run by the `regex` module like OpenAI's code, so that the Unicode
# letter and number classes are exactly its own (the regex engine inside `tokenizers` knows an older
# Unicode). OpenAI's pattern also matches the literal special-token strings; we leave them out so a
# caption cannot inject an end-of-text token (OpenCLIP, whose specials are spelled differently,
# does not match them either).
_OPENAI_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# The same pattern for ASCII pieces of cleaned, lowercased text (no whitespace, no controls), where
# the classes are plain ranges and the standard library's engine is twice as fast.
_OPENAI_WORDS_ASCII = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+")
# Pieces of text whose ids each process keeps (about 140 bytes each, 36 MiB in all); the cache is
# emptied when full, which costs little next to the misses of rare words that fill it.
_CACHE_SIZE = 1 << 18


def clean_text(text: str) -> str:
    """OpenAI's caption cleaning without its lowercasing: ftfy, HTML unescaping, whitespace collapsed."""
    return " ".join(_fix_text(text).split())


def _fix_text(text: str) -> str:
    """The part of the cleaning before whitespace is collapsed: ftfy, then HTML unescaping twice."""
    if not _unchanged_by_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text, _FTFY_CONFIG)))
    return text


def _unchanged_by_ftfy(text: str) -> bool:
    """True when ftfy.fix_text and html.unescape provably return `text` as it is (see _FTFY_CHARS)."""
    if _FTFY_CHAR.search(text) or ("&" in text and _HTML_ENTITY_START.search(text)):
        return False
    return text.isascii() or unicodedata.is_normalized("NFC", text)


class Tokenizer:
    """Texts -> token ids [N, L] for the text tower. Build one with `get_tokenizer`.

    Attributes: `name` ("openai" or the tokenizer.json path), `vocab_size`, `sot_token_id` (None if
    the vocabulary has no start token), `eot_token_id`, `context_length` (the default L).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        name: str,
        sot_token_id: int | None,
        eot_token_id: int,
        context_length: int,
    ):
        self._backend = backend
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.sot_token_id = sot_token_id
        self.eot_token_id = eot_token_id
        self.context_length = context_length
        self._prefix = [] if sot_token_id is None else [sot_token_id]
        self._start_int32 = array.array("i", self._prefix).tobytes()
        self._end_int32 = array.array("i", [eot_token_id]).tobytes()

    def encode(self, text: str) -> list[int]:
        """Ids of the cleaned text, without start and end tokens and never truncated."""
        return self._backend.encode(clean_text(text), add_special_tokens=False).ids

    def _encode_int32(self, text: str) -> bytes:
        """`encode(text)` as native int32 bytes, which batches assemble with C-speed joins."""
        return array.array("i", self.encode(text)).tobytes()

    def __call__(
        self, texts: Union[str, Sequence[str]], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """Token ids, `torch.long` [N, L] with L = `context_length` or `self.context_length`.

        Each row is start token, text tokens, end-of-text token, zeros. A text too long for L is
        cut so that its row still ends with end-of-text (`truncate=True`), or raises RuntimeError
        naming the text (`truncate=False`).
        """
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        max_text_tokens = length - len(self._prefix) - 1
        if max_text_tokens < 0:
            raise ValueError(f"context_length={length} leaves no room for the start and end tokens")
        rows = bytearray(4 * length * len(texts))  # [N, L] int32 zeros, filled row by row below
        start, end = self._start_int32, self._end_int32
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} of the batch is a {type(text).__name__}, not a str")
            ids = self._encode_int32(text)
            if len(ids) > 4 * max_text_tokens:
                if not truncate:
                    num_tokens = len(self._prefix) + len(ids) // 4 + 1
                    raise RuntimeError(_too_long_message(text, i, num_tokens, length))
                ids = ids[: 4 * max_text_tokens]
            at = 4 * length * i
            rows[at : at + len(start)] = start
            at += len(start)
            rows[at : at + len(ids)] = ids
            at += len(ids)
            rows[at : at + 4] = end
        rows = np.frombuffer(rows, dtype=np.int32).reshape(len(texts), length)
        return torch.from_numpy(rows.astype(np.int64))

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Text of one row of ids, up to its first end-of-text token (zeros pad after it).

        Start and end tokens are dropped. OpenAI's BPE forgets where spaces were, so its decoded
        text has a space after every word, digit and punctuation run ("it 's 2 0 2 4 !").
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and not isinstance(ids[0], int):
            raise ValueError("decode takes one row of ids; decode a batch row by row")
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        if ids[:1] == self._prefix:
            ids = ids[1:]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size} ids ({self.name})")
        return self._backend.decode(ids, skip_special_tokens=True)

    def __reduce__(self):
        # Pickles (spawned DataLoader workers) carry the name, not the vocabulary.
        return _load, (self.name, self.context_length)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


class _OpenAITokenizer(Tokenizer):
    """OpenAI's BPE behind a per-process cache from pieces of cleaned text to their ids.

    The pieces are the whitespace-separated chunks of the text ("cat,") and their words ("cat",
    ","): OpenAI's pattern never matches whitespace, so chunks tokenize independently, and a word is
    a chunk of one word. A missing word is BPE-encoded by `tokenizers`. A cache hit costs one dict
    lookup in C, where `tokenizers`' own pipeline spends about 2 us per word.
    """

    def __init__(self, context_length: int):
        backend = _openai_backend()
        vocab = backend.get_vocab(with_added_tokens=True)
        super().__init__(
            backend,
            name=OPENAI,
            sot_token_id=vocab[SOT_TEXT],
            eot_token_id=vocab[EOT_TEXT],
            context_length=context_length,
        )
        self._cache = _PieceCache(backend.model)

    def encode(self, text: str) -> list[int]:
        return array.array("i", self._encode_int32(text)).tolist()

    def _encode_int32(self, text: str) -> bytes:
        # Splitting before collapsing whitespace gives the same chunks as clean_text(text).split(" "):
        # lowercasing treats every whitespace character alike (none is cased or case-ignorable).
        return b"".join(map(self._cache.__getitem__, _fix_text(text).lower().split()))

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        # Word-final tokens end in "</w>": that is where OpenAI's decoder puts spaces.
        return super().decode(ids).replace("</w>", " ").rstrip(" ")


class _PieceCache(dict):
    """Piece of cleaned, lowercased text without spaces -> its OpenAI BPE ids as int32 bytes
    (bytes join in one C call and take a third of the memory of a tuple of ints)."""

    def __init__(self, bpe: tokenizers.models.BPE):
        super().__init__()
        self._bpe = bpe

    def __missing__(self, piece: str) -> bytes:
        if piece.isalpha() and piece.isascii():  # a single word: no need for the pattern
            words = [piece]
        else:
            words = (_OPENAI_WORDS_ASCII if piece.isascii() else _OPENAI_WORDS).findall(piece)
        if words == [piece]:
            # UTF-8 bytes -> the printable characters that stand for them in the vocabulary
            symbols = piece.encode("utf-8").decode("latin-1").translate(_BYTE_SYMBOLS)
            ids = array.array("i", [token.id for token in self._bpe.tokenize(symbols)]).tobytes()
        else:
            ids = b"".join(map(self.__getitem__, words))
        if len(self) >= _CACHE_SIZE:
            self.clear()
        self[piece] = ids
        return ids


def _byte_symbols() -> tuple[list[int], list[str]]:
    """GPT-2's byte-level alphabet in OpenAI's id order: (bytes, the character standing for each).

    Printable Latin-1 bytes stand for themselves and come first; the others (controls, space,
    soft hyphen, ...) get the characters 256, 257, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return printable + others, [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


_BYTE_ORDER, _BYTE_CHARS = _byte_symbols()
# str.translate table for a word decoded as Latin-1 (one character per UTF-8 byte).
_BYTE_SYMBOLS = {byte: char for byte, char in zip(_BYTE_ORDER, _BYTE_CHARS)}


@functools.cache
def openai_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """OpenAI's BPE: its tokens in id order (the two special tokens last, 49,408 in all) and its merges
    in rank order, as read from the merges file shipped with the package."""
    with gzip.open(_MERGES_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _NUM_OPENAI_MERGES + 1]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines]
    tokens = _BYTE_CHARS + [c + "</w>" for c in _BYTE_CHARS] + [a + b for a, b in merges]
    return tokens + [SOT_TEXT, EOT_TEXT], merges


@functools.cache
def _openai_backend() -> tokenizers.Tokenizer:
    """OpenAI's vocabulary and merges as a `tokenizers` BPE model with a byte-level decoder."""
    tokens, merges = openai_bpe()
    bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens[:-2])}, merges, end_of_word_suffix="</w>")
    backend = tokenizers.Tokenizer(bpe)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens([SOT_TEXT, EOT_TEXT])  # ids 49406, 49407
    return backend


def _json_tokenizer(path: str, context_length: int) -> Tokenizer:
    """A tokenizer.json (or an export carrying one) whose post-processor wraps texts in [start] ... end-of-text."""
    text = get_tokenizer_json(path)
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable tokenizer.json: {e}") from e
    backend.no_truncation()  # we truncate ourselves, keeping the end-of-text token
    backend.no_padding()
    # The post-processor's tokens around a text tell which ids start and end one.
    probe = "a"
    bare = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    starts = [k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare]
    prefix, suffix = (full[: starts[0]], full[starts[0] + len(bare) :]) if starts else (full, [])
    if len(prefix) > 1 or len(suffix) != 1 or prefix == suffix:
        raise ValueError(
            f"{path}: its post-processor must put one end-of-text token after each text (the text tower "
            f"pools there) and at most one start token before it; it adds {prefix} before and {suffix} "
            "after. scripts/train_tokenizer.py writes suitable files."
        )
    return Tokenizer(
        backend,
        name=path,
        sot_token_id=prefix[0] if prefix else None,
        eot_token_id=suffix[0],
        context_length=context_length,
    )


@functools.lru_cache(maxsize=16)
def _load(name: str, context_length: int) -> Tokenizer:
    if name == OPENAI:
        return _OpenAITokenizer(context_length)
    return _json_tokenizer(name, context_length)


def get_tokenizer(source: Union[str, TextConfig] = OPENAI) -> Tokenizer:
    """The tokenizer of a text tower: from its `TextConfig`, a registered model name, "openai", a
    tokenizer.json path, or a model export carrying one (paths give rows of the default 77 tokens).
    A `TextConfig` must agree with it on `vocab_size` and `eot_token_id`.

    Instances are cached per process and safe to use in forked DataLoader workers.
    """
    if isinstance(source, TextConfig):
        tokenizer = _load(source.tokenizer, source.context_length)
        _check_text_config(tokenizer, source)
        return tokenizer
    if not isinstance(source, str):
        raise TypeError(f"get_tokenizer takes a TextConfig or a str, not {type(source).__name__}")
    if source != OPENAI and not source.endswith(".json") and (source in MODEL_CONFIGS or source in OPENAI_NAMES):
        return get_tokenizer(get_model_config(source).text)
    return _load(source, DEFAULT_CONTEXT_LENGTH)


def _check_text_config(tokenizer: Tokenizer, cfg: TextConfig, prefix: str = "model.text") -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"{prefix}.vocab_size={cfg.vocab_size} is smaller than the {tokenizer.vocab_size} ids of "
            f"{prefix}.tokenizer={cfg.tokenizer!r}"
        )
    if tokenizer.eot_token_id != cfg.eot_token_id:
        raise ConfigError(
            f"{prefix}.eot_token_id={cfg.eot_token_id}, but {prefix}.tokenizer={cfg.tokenizer!r} ends texts "
            f"with id {tokenizer.eot_token_id}"
        )


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """OpenAI's `clip.tokenize`: texts -> OpenAI BPE ids [N, context_length], zero-padded.

    Returns `torch.long` (OpenAI's returns int32 on torch >= 1.8; the values are the same). A text
    longer than `context_length` tokens (start and end included) raises RuntimeError naming it,
    unless `truncate=True`, which cuts it and makes the last token end-of-text.
    """
    return get_tokenizer(OPENAI)(texts, context_length=context_length, truncate=truncate)


def _too_long_message(text: str, index: int, num_tokens: int, context_length: int) -> str:
    shown = text if len(text) <= 200 else text[:200] + "..."
    return (
        f"Input {shown!r} is too long for context length {context_length}: {num_tokens} tokens with start "
        f"and end (text {index} of the batch). Pass truncate=True to cut it."
    )
