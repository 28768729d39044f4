"""OpenAI's `clip.simple_tokenizer` module: `SimpleTokenizer` on top of the library's OpenAI tokenizer.

The ids are `clip.tokenizer`'s (equal to OpenAI's, tests/test_tokenizer.py); this module only gives them
OpenAI's class, method names and decoding convention.
"""

from __future__ import annotations

from typing import Iterable

from clip.tokenizer import _MERGES_PATH, OPENAI, get_tokenizer


def default_bpe() -> str:
    """Path of OpenAI's BPE merges file, shipped with this package."""
    return str(_MERGES_PATH)


class SimpleTokenizer:
    """OpenAI's tokenizer class: `encode(text)` -> ids, `decode(ids)` -> text; `encoder`/`decoder` map
    BPE symbols to ids and back.

    Only OpenAI's vocabulary exists under this name; other vocabularies are `clip.get_tokenizer(path)`.
    """

    def __init__(self, bpe_path: str = default_bpe()):
        if str(bpe_path) != default_bpe():
            raise ValueError(
                f"SimpleTokenizer reads only OpenAI's merges ({default_bpe()}), not {bpe_path}: for another "
                "vocabulary use clip.get_tokenizer('path/to/tokenizer.json')"
            )
        self._tokenizer = get_tokenizer(OPENAI)
        self._backend = self._tokenizer._backend
        self.encoder: dict[str, int] = self._backend.get_vocab(with_added_tokens=True)
        self.decoder: dict[int, str] = {index: symbol for symbol, index in self.encoder.items()}

    def encode(self, text: str) -> list[int]:
        """Ids of OpenAI's cleaned, lowercased `text`, without start and end tokens."""
        return self._tokenizer.encode(text)

    def decode(self, tokens: Iterable[int]) -> str:
        """OpenAI's decoding: every id, special tokens included, with a space after each word-final token
        (undecodable byte sequences become U+FFFD). `clip.get_tokenizer().decode` is the tidier variant
        that stops at end-of-text and strips the specials."""
        ids = [int(token) for token in tokens]
        return self._backend.decode(ids, skip_special_tokens=False).replace("</w>", " ")
