"""Captions per second of our OpenAI BPE tokenizer against OpenCLIP's pure-Python one, on one core.

    PYTHONPATH=. python scripts/bench_tokenizer.py [--num-captions 100000] [--core 0]

The captions are synthetic web-style alt-texts, generated from a seed so every run and machine sees
the same text: words drawn with Zipf frequencies from the full words of the BPE vocabulary (its
merge order follows word frequency in OpenAI's corpus), mixed case, numbers with units, typos,
separators such as " | " and " & ", and in about one caption in eight accents, CJK, Cyrillic,
Greek, Arabic, Hebrew, Devanagari, Thai, emoji, curly quotes, NBSP, HTML entities or mojibake; one
in a hundred ends with a URL. Lengths are log-normal (median 10 words); about 1% exceed 77 tokens.

Each measurement runs in a freshly forked process pinned to one core, so both tokenizers start with
empty caches (a single pass, cold start included; --warm times a second pass instead) and use one
thread. Two call patterns are timed: one caption per call (what a
DataLoader worker does per sample) and batches of --batch-size captions, the latter also for the
ASCII-only captions and for the others apart (OpenAI's cleaning runs ftfy on most of those). The
script also checks that both tokenizers return identical ids for every caption. Needs
open_clip_torch (a test extra).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import math
import multiprocessing as mp
import os
import random
import string
import time
from pathlib import Path

MERGES = Path(__file__).resolve().parents[1] / "clip" / "assets" / "bpe_simple_vocab_16e6.txt.gz"

NON_ASCII_SNIPPETS = [
    "café", "naïve", "Größe", "niño", "São Paulo", "Zürich", "crème brûlée", "Ελλάδα", "Москва", "東京",
    "北京烤鸭", "서울", "ไทย", "مرحبا", "שלום", "नमस्ते", "😀", "❤️", "👍🏽", "🇺🇸", "👨‍👩‍👧", "“quoted”",
    "it’s", "—", "…", "®", "™", "°C", "½", "\u00a0", "Ã©t©", "&amp;", "&quot;", "&#39;",
]  # fmt: skip
SEPARATORS = [", ", " - ", " | ", ": ", "! ", ". ", " / ", " & ", " (", ") "]


def vocabulary_words() -> list[str]:
    """Alphabetic ASCII word tokens of the BPE vocabulary, most frequent first."""
    with gzip.open(MERGES, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]
    words = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].endswith("</w>"):
            word = parts[0] + parts[1][: -len("</w>")]
            if word.isascii() and word.isalpha() and len(word) > 1:
                words.append(word)
    return words


def web_captions(num_captions: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = vocabulary_words()
    zipf = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(words))))
    captions = []
    for _ in range(num_captions):
        num_words = max(1, min(150, int(rng.lognormvariate(math.log(10), 0.7))))
        parts = []
        for word in rng.choices(words, cum_weights=zipf, k=num_words):
            r = rng.random()
            if r < 0.25:
                word = word.capitalize()
            elif r < 0.28:
                word = word.upper()
            elif r < 0.34:
                number = rng.choice([rng.randint(0, 100), rng.randint(1900, 2030), rng.randint(100, 99999)])
                word = f"{number}{rng.choice(['', '', 'cm', 'mm', '%', 'x', 'GB', 'p'])}"
            elif r < 0.38:  # a typo or a product code: a word the BPE has not seen
                i = rng.randrange(len(word))
                word = word[:i] + rng.choice(string.ascii_letters + string.digits) + word[i + 1 :]
            parts += [word, rng.choice(SEPARATORS) if rng.random() < 0.12 else " "]
        r = rng.random()
        if r < 0.12:
            parts.insert(rng.randrange(len(parts)), f" {rng.choice(NON_ASCII_SNIPPETS)} ")
        elif r < 0.13:
            parts.append(f" https://www.{rng.choice(words)}.com/{rng.choice(words)}/{rng.randint(1, 99999)}.html")
        captions.append("".join(parts).strip())
    return captions


def make_tokenizer(kind: str):
    if kind == "openclip":
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer()  # truncates long captions, like ours with truncate=True
    from clip.tokenizer import get_tokenizer

    return get_tokenizer("openai")


def measure(kind: str, mode: str, captions: list[str], batch_size: int, core: int | None, warm: bool, conn) -> None:
    """In a freshly forked child (empty caches): time one pass, or the second of two with `warm`;
    send back the times and an ids digest."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    tokenizer = make_tokenizer(kind)
    for _ in range(2 if warm else 1):
        wall, cpu = time.perf_counter(), time.process_time()
        if mode == "per caption":  # outputs dropped, as a DataLoader worker hands them on
            for caption in captions:
                tokenizer(caption)
        else:
            batches = [tokenizer(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    digest = hashlib.sha256(torch.cat(batches).numpy().tobytes()).hexdigest() if mode != "per caption" else None
    conn.send((wall, cpu, digest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-captions", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to; -1: no pinning")
    parser.add_argument("--warm", action="store_true", help="time a second pass, every word already cached")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core for both, whatever they do inside
    os.environ["RAYON_NUM_THREADS"] = "1"

    captions = web_captions(args.num_captions, args.seed)
    non_ascii = sum(not c.isascii() for c in captions) / len(captions)
    passes = "second pass (caches warm)" if args.warm else "one pass from empty caches"
    print(f"{len(captions)} captions, {non_ascii:.1%} non-ASCII, seed {args.seed}; {passes}")
    ctx = mp.get_context("fork")
    core = None if args.core < 0 else args.core
    batches = f"batches of {args.batch_size}"
    ascii_only = [c for c in captions if c.isascii()]
    with_non_ascii = [c for c in captions if not c.isascii()]
    cases = [  # (row label, call pattern, captions)
        ("all, one per call", "per caption", captions),
        (f"all, {batches}", batches, captions),
        (f"ASCII-only ({len(ascii_only) / len(captions):.0%}), {batches}", batches, ascii_only),
        (f"with non-ASCII ({len(with_non_ascii) / len(captions):.0%}), {batches}", batches, with_non_ascii),
    ]
    results = {}
    for kind, (label, mode, subset) in itertools.product(("openclip", "ours"), cases):
        parent, child = ctx.Pipe()
        process = ctx.Process(target=measure, args=(kind, mode, subset, args.batch_size, core, args.warm, child))
        process.start()
        results[kind, label] = (len(subset),) + parent.recv()
        process.join()

    same = all(results["openclip", label][3] == results["ours", label][3] for label, mode, _ in cases)
    print(f"identical ids for all {len(captions)} captions: {'yes' if same else 'NO'}")
    print("\n| captions, call pattern | OpenCLIP captions/s | ours captions/s | speed-up |")
    print("|---|---|---|---|")
    for label, _, _ in cases:
        theirs, ours = (results[kind, label][0] / results[kind, label][2] for kind in ("openclip", "ours"))
        print(f"| {label} | {theirs:,.0f} | {ours:,.0f} | {ours / theirs:.1f}x |")
    print("\n(captions per second of process CPU time on one core; wall-clock seconds:", end=" ")
    print(", ".join(f"{kind} {label}: {r[1]:.1f}" for (kind, label), r in results.items()) + ")")

if __name__ == "__main__":
    main()
