"""Tokenizers: OpenAI's BPE with ids identical to OpenCLIP's pure-Python tokenizer and OpenAI's
`tokenize` contract; vocabularies trained by scripts/train_tokenizer.py; decoding, configuration
checks, and use inside forked DataLoader workers."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import ftfy
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.config import TextConfig
from clip.models import CLIP, get_model_config
from clip.models.export import config_differences
from clip.tokenizer import clean_text, get_tokenizer, tokenize

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")  # test-only reference

REPO = Path(__file__).resolve().parents[1]

# Building blocks of the parity corpus: every script and kind of mess that web captions carry.
BLOCKS = [
    # plain English, case, contractions
    "a photo of a cat", "A PHOTO OF A DOG", "The Quick Brown Fox", "it's", "IT'S", "they're", "we'll",
    "I'd", "you've", "I'm", "don't", "'sup", "rock'n'roll", "''s", "O'Brien's", "'ſ", "dogs'",
    # accents, ligatures, Latin extensions, case specials
    "café", "naïve", "Größe", "STRASSE", "niño", "São Paulo", "Zürich", "crème brûlée", "Ærøskøbing",
    "ﬁnance ﬂow", "Ĳssel", "İstanbul", "ıi", "ΟΔΥΣΣΕΥΣ", "Σίσυφος", "ΣΑΣ", "Ǆ", "ǅungla",
    # combining marks (decomposed forms, stacked marks, a lone mark)
    "cafe\u0301", "n\u0303", "a\u0308\u0301", "Z\u0351\u0352\u0353algo", "\u0345", "α\u0345",
    # scripts
    "東京タワー", "北京烤鸭", "日本語のテキスト", "서울 특별시", "ひらがな カタカナ", "中文，标点。",
    "مرحبا بالعالم", "العربية ١٢٣", "שלום עולם", "עִבְרִית", "नमस्ते दुनिया", "क्षत्रिय",
    "ภาษาไทย", "สวัสดีครับ", "Москва", "Ελλάδα", "ქართული", "Հայերեն", "ᏣᎳᎩ", "ⴰⵣⵓⵍ",
    # characters newer than the Unicode tables of some regex engines
    "\u0c5c\u0cdc", "\U00031350\U00031351", "\U00011f04\U00011f05", "\U00010d4a\U00010d4b",
    # emoji: ZWJ sequences, skin tones, flags, keycaps, variation selectors, tag sequences
    "😀", "❤️", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇫🇷🇯🇵", "1️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "🧑🏿‍🚀", "☕︎",
    # HTML entities and tags
    "&amp;", "&amp;amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;quoted&#39;", "&#x27;", "&quot;hi&quot;",
    "&EACUTE;", "&ntilde", "AT&T", "Tom & Jerry", "&", "&nbsp;", "<b>bold</b> &amp; co", "<br/>",
    "<a href='x'>link</a>", "&hellip;", "P&EACUTE;REZ",
    # mojibake
    "Ã©tÃ©", "â€œquotedâ€\x9d", "cafÃ©", "Ã  la", "Ð¼Ð¾Ñ\x81ÐºÐ²Ð°", "âœ” done", "Ã¼ber",
    # URLs, e-mails, paths, code
    "https://www.example.com/path?q=1&r=2#frag", "http://例え.テスト/パス", "user.name+tag@example.co.uk",
    "C:\\Users\\me\\file.txt", "/usr/local/bin", "x = f(a[0], b{1});", "#hashtag @mention",
    # numbers
    "3.14159", "1,000,000", "2024-01-31", "$19.99", "50%", "1080p", "٣٤٥", "²³", "½", "Ⅻ", "①②",
    "0x1F", "1e-9",
    # punctuation runs and symbols
    "!!!", "???!!!", "...", "—", "–", "…", "«»", "“curly”", "‘single’", "***", "-->", "(x)", "™®©",
    "°C", "§1", "¶", "•", "~~~", "|||", "^_^", "¯\\_(ツ)_/¯", "(╯°□°）╯︵ ┻━┻",
    # whitespace and invisible characters
    "\t", "\n", "\r\n", "\u00a0", "\u200b", "\u200d", "\u2028", "\u3000", "\ufeff", "\u00ad", "\x0b",
    "\x0c", "\x1c", "\x85", "a\u200bb", "non\u00a0breaking",
    # controls and broken text
    "\x00", "\x1b[31mred\x1b[0m", "\x7f", "\x9d", "\ufffd", "\ud83d", "\ud83d\ude00",
    # fullwidth and compatibility forms
    "ＬＯＵＤ　ＮＯＩＳＥＳ", "ｶﾀｶﾅ", "㎏", "ﾃｽﾄ",
    # literal special-token text (ordinary text for OpenCLIP and for us)
    "<|endoftext|>", "<|startoftext|>",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", "\u00a0", "\u200b", ", ", " - ", " | ", "&"]


def parity_corpus(num_mixed: int = 2500, seed: int = 0) -> list[str]:
    """Every block alone and upper-cased, then seeded random mixes, some far beyond 77 tokens."""
    rng = random.Random(seed)
    corpus = ["", " ", "   ", "\t\n", "\u00a0\u200b"]
    corpus += BLOCKS + [b.upper() for b in BLOCKS]
    for i in range(num_mixed):
        num_blocks = rng.randint(1, 6) if i % 10 else rng.randint(30, 80)
        parts = []
        for block in rng.choices(BLOCKS, k=num_blocks):
            block = rng.choice([block, block, block.upper(), block.title()])
            parts += [block, rng.choice(SEPARATORS)]
        corpus.append("".join(parts))
    return corpus


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return parity_corpus()


@pytest.fixture(scope="module")
def reference():
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("openai")


def test_ids_equal_openclip_untruncated(corpus, reference, tok):
    # The full id sequences, not only the 77-token window.
    mismatches = [(text, tok.encode(text), reference.encode(text)) for text in corpus]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0]}"


def test_ids_equal_openclip_when_the_cache_overflows(corpus, reference, monkeypatch):
    monkeypatch.setattr(clip.tokenizer, "_CACHE_SIZE", 50)
    tok = clip.tokenizer._OpenAITokenizer(context_length=77)  # a fresh, tiny cache
    for text in corpus[:400]:
        assert tok.encode(text) == reference.encode(text), text
    assert len(tok._cache) <= 50


def test_corpus_exercises_every_path(corpus):
    # The fast paths (ftfy skipped; ASCII word pattern) and the slow ones must all be covered above.
    skips_ftfy = [t for t in corpus if clip.tokenizer._unchanged_by_ftfy(t)]
    assert 200 < len(skips_ftfy) < len(corpus) - 200
    assert sum(not t.isascii() for t in skips_ftfy) > 100
    ascii_only = sum(1 for t in corpus if clean_text(t).isascii())
    assert 200 < ascii_only < len(corpus) - 200
    num_tokens = [len(get_tokenizer("openai").encode(t)) for t in corpus]
    assert sum(n > 200 for n in num_tokens) > 100, "long texts are missing"
    assert 0 in num_tokens


def _code_points(stride: int) -> Iterator[str]:
    """Every BMP code point but surrogates, then every `stride`-th one of the other planes."""
    for c in [*range(0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, stride)]:
        yield chr(c)


def test_ftfy_shortcut_covers_ftfy_tables():
    # clean_text skips ftfy for NFC text without the characters of _FTFY_CHARS. These are the
    # characters ftfy's fixes and mojibake detector act on (its internal tables, read here only).
    from ftfy import badness, chardata

    acted_on = {*chardata.CONTROL_CHARS, *chardata.LIGATURES, *chardata.WIDTH_MAP, 0x85, 0x2028, 0x2029}
    acted_on |= {ord(c) for c in badness.BADNESS_RE.pattern if ord(c) > 0x7F}
    classes = [f"[{chars}]" for chars in badness.MOJIBAKE_CATEGORIES.values()]
    classes += [chardata.SINGLE_QUOTE_RE.pattern, chardata.DOUBLE_QUOTE_RE.pattern]
    every_code_point = "".join(_code_points(stride=1))
    acted_on |= {ord(m.group()) for m in re.finditer("|".join(classes), every_code_point)}
    missed = sorted(hex(c) for c in acted_on if clip.tokenizer._unchanged_by_ftfy(chr(c)))
    assert not missed


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow), 37])
def test_ftfy_leaves_text_it_skips_unchanged(stride):
    for c in _code_points(stride):
        text = f"a{c}b"
        if clip.tokenizer._unchanged_by_ftfy(text):
            assert ftfy.fix_text(text) == text, hex(ord(c))


def test_batches_equal_openclip_truncated(corpus, reference, tok):
    # OpenCLIP truncates silently, as we do with truncate=True; both pad with zeros.
    for start in range(0, len(corpus), 500):
        batch = corpus[start : start + 500]
        assert torch.equal(tok(batch, truncate=True), reference(batch))


def test_known_ids():
    # Values from OpenAI's tokenizer, independent of any reference installed here.
    ids = tokenize(["a photo of a cat", "Hello, World!"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[1, :6].tolist() == [49406, 3306, 267, 1002, 256, 49407]
    assert ids[:, 7:].count_nonzero() == 0


def test_tokenize_contract(tok):
    single = tokenize("a diagram")
    assert single.shape == (1, 77) and torch.equal(single, tokenize(["a diagram"]))
    assert tokenize([]).shape == (0, 77)
    assert tokenize("a diagram", context_length=16).shape == (1, 16)
    assert tok.vocab_size == 49408 and tok.sot_token_id == 49406 and tok.eot_token_id == 49407
    assert tok.context_length == 77


def test_too_long_error_names_the_text():
    fits = " ".join(["a"] * 75)  # 75 words + start + end = 77 tokens
    assert tokenize(fits)[0, -1].item() == 49407
    too_long = " ".join(["a"] * 76)
    with pytest.raises(RuntimeError, match=re.escape(f"Input {too_long!r} is too long for context length 77")):
        tokenize(["short", too_long])
    with pytest.raises(RuntimeError, match="78 tokens with start and end .text 1 of the batch"):
        tokenize(["short", too_long])
    with pytest.raises(RuntimeError, match=r"Input 'a a a .*\.\.\.' is too long"):  # shortened
        tokenize(" ".join(["a"] * 300))


def test_truncate_keeps_prefix_and_ends_with_eot(tok, reference):
    text = "a photo of " + " ".join(f"item{i}" for i in range(200))
    full = [49406, *reference.encode(text), 49407]
    row = tokenize(text, truncate=True)[0]
    assert row[:76].tolist() == full[:76] and row[76].item() == 49407
    short = tokenize(text, context_length=10, truncate=True)[0]
    assert short.tolist() == full[:9] + [49407]
    assert torch.equal(tok(text)[0], row)  # a Tokenizer truncates by default


def test_decode_round_trips_cleaned_words(tok):
    text = "  A  Photo\tof\nthe ÉLAN  café 東京 "
    assert tok.decode(tok(text)[0]) == clean_text(text).lower()
    assert tok.decode([49406, 320, 2368, 49407, 0, 0]) == "a cat"  # stops at end-of-text


def test_decode_equals_openclip(corpus, reference, tok):
    # OpenCLIP's decoder leaves a trailing space after the last word.
    for text in corpus[:1000]:
        ids = tok.encode(text)
        assert tok.decode(ids) == reference.decode(ids).rstrip(" ")
    rng = random.Random(0)  # arbitrary ids, many of them invalid UTF-8 byte sequences
    for _ in range(500):
        ids = [rng.randrange(512 if rng.random() < 0.5 else 49406) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == reference.decode(ids).rstrip(" ")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([320, 60000])


def test_special_token_text_is_ordinary_text(reference, tok):
    # A caption cannot inject a start or end token. OpenAI's tokenizer would turn "<|endoftext|>"
    # into id 49407 and OpenCLIP turns its spelling "<end_of_text>" into 49407; we do neither.
    for text in ["<|endoftext|> after", "<|startoftext|>", "<end_of_text> after", "<start_of_text>"]:
        assert not {49406, 49407} & set(tok.encode(text))
    assert 49407 in reference.encode("<end_of_text> after")  # the documented difference


def test_unicode_classes_are_the_regex_modules():
    # Letters the regex engine inside `tokenizers` does not know yet (Unicode 16/17) must still be
    # letters: "x" + letter is one word, so no word-boundary "</w>" token is inserted between them.
    reference = open_clip_tokenizer.SimpleTokenizer()
    for text in ["a\u0c5cb", "\U00031350\U00031351", "'ſa", "α\u0345"]:
        assert get_tokenizer("openai").encode(text) == reference.encode(text)


def test_get_tokenizer_sources(tmp_path):
    tok = get_tokenizer("openai")
    assert get_tokenizer() is tok and get_tokenizer("ViT-B-32") is tok and get_tokenizer("ViT-B/32") is tok
    assert get_tokenizer(TextConfig()) is tok
    short = get_tokenizer(TextConfig(context_length=32))
    assert short.context_length == 32 and short("a cat").shape == (1, 32)
    assert clip.get_tokenizer is get_tokenizer and clip.tokenize is tokenize
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        get_tokenizer("no-such-model")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        get_tokenizer(str(broken))


def test_text_config_must_match_tokenizer():
    with pytest.raises(ValueError, match=r"model.text.eot_token_id=3, .* ends texts with id 49407"):
        get_tokenizer(TextConfig(eot_token_id=3))
    with pytest.raises(ValueError, match=r"model.text.vocab_size=1000 is smaller than the 49408 ids"):
        get_tokenizer(TextConfig(vocab_size=1000, eot_token_id=999))
    get_tokenizer(TextConfig(vocab_size=49472))  # an embedding padded to a multiple of 64 is fine


def test_pickles_by_name(tok):
    data = pickle.dumps(tok)
    assert len(data) < 200 and pickle.loads(data) is tok


def test_bad_inputs(tok):
    with pytest.raises(TypeError, match="text 1 of the batch is a int"):
        tok(["fine", 3])
    with pytest.raises(ValueError, match="context_length=1"):
        tok("a", context_length=1)


DATALOADER_SCRIPT = """
import json, os, sys, torch
from torch.utils.data import DataLoader, Dataset
from clip.tokenizer import get_tokenizer

def num_threads():
    return len(os.listdir("/proc/self/task"))

texts_path, source, parent = sys.argv[1:]
texts = json.loads(open(texts_path).read())
tok = get_tokenizer(source)
before = num_threads()
expected = tok(texts)  # the parent tokenizes before forking, as a trainer building eval prompts does
if parent == "control":
    tok._backend.encode_batch(["warm up"] * 1000)  # what a `tokenizers` batch call does
print("thread pool started:", num_threads() > before)

class Captions(Dataset):
    def __len__(self):
        return len(texts)
    def __getitem__(self, i):
        return tok(texts[i])[0]

loader = DataLoader(Captions(), batch_size=32, num_workers=2, multiprocessing_context="fork")
assert torch.equal(torch.cat(list(loader)), expected), "ids differ in workers"
print("workers ok")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("source, parent", [("openai", "ours"), ("openai", "control"), ("trained", "ours")])
def test_forked_dataloader_workers(corpus, trained, tmp_path, source, parent):
    # `tokenizers` starts a Rayon thread pool on its first batch call; forking after that can
    # deadlock a worker, or (in versions before 0.23) make every worker print a warning. Our
    # tokenizers must never start it. The control run shows that the thread count sees the pool.
    # A subprocess, because open_clip sets TOKENIZERS_PARALLELISM on import, which hides all this.
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(corpus[:600]))  # escapes the lone surrogates
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent(DATALOADER_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    env["PYTHONPATH"] = str(REPO)
    source = str(trained) if source == "trained" else source
    result = subprocess.run(
        [sys.executable, str(script), str(texts), source, parent],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "workers ok" in result.stdout, result.stderr
    assert f"thread pool started: {parent == 'control'}" in result.stdout
    if parent == "ours":
        assert "tokenizers" not in result.stderr.lower(), result.stderr


# --- vocabularies trained by scripts/train_tokenizer.py -----------------------------------------

WORDS = (
    "photo picture image drawing painting of a an the red green blue small large old young dog cat "
    "bird horse car bicycle house tree river mountain beach city street on in under near with at "
    "sunset night snow rain café 東京 чай"
).split()


def training_captions(num: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(num)]


def write_shard(path: Path, captions: list[str], marker: Path, max_bytes: int) -> None:
    """A WebDataset shard whose captions come with members the script must never read."""

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def add(tar, name, data=b"", **info):
        member = tarfile.TarInfo(name)
        member.size = len(data)
        for key, value in info.items():
            setattr(member, key, value)
        tar.addfile(member, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            add(tar, f"{i:06d}.txt", caption.encode())
            add(tar, f"{i:06d}.jpg", os.urandom(64))
        add(tar, "bad.pyd", pickle.dumps(Payload()))
        add(tar, "link.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "big.txt", b"x" * (max_bytes + 1))
        add(tar, "latin1.txt", "caf\xe9".encode("latin-1"))
        add(tar, "../../outside.txt", b"a caption whose name climbs out")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 600-id vocabulary trained by the script on a caption file and a shard."""
    root = tmp_path_factory.mktemp("trained")
    (root / "captions.txt").write_text("\n".join(training_captions(1500, seed=1)), encoding="utf-8")
    marker = root / "unpickled"
    write_shard(root / "shard-000000.tar", training_captions(500, seed=2), marker, max_bytes=1024)
    before = set(root.rglob("*"))
    output = root / "tok" / "tokenizer.json"
    command = [sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--vocab-size", "600"]
    command += ["--output", str(output), "--max-text-bytes", "1024", "captions.txt", "shard-000000.tar"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert set(root.rglob("*")) - before == {output.parent, output}  # nothing extracted
    output.with_suffix(".log").write_text(result.stdout)
    return output


def test_training_reads_only_regular_text_members(trained):
    log = trained.with_suffix(".log").read_text()
    # 1500 lines + 500 shard captions + the one whose member name climbs out (read, never a path)
    assert "trained on 2001 captions (skipped: 1 not UTF-8, 1 not a regular file, 1 over 1024 bytes)" in log
    tok = get_tokenizer(str(trained))
    assert f"model.text.vocab_size={tok.vocab_size} model.text.eot_token_id={tok.eot_token_id}" in log


def test_trained_vocabulary(trained):
    tok = get_tokenizer(str(trained))
    assert 300 < tok.vocab_size <= 600  # fewer when the captions run out of pairs to merge
    # start and end of text are the largest ids, as in OpenAI's vocabulary
    assert (tok.sot_token_id, tok.eot_token_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    caption = "a small red bicycle near the river at sunset"
    assert len(tok.encode(caption)) == 9  # the frequent words became single tokens
    assert tok(caption)[0, :11].tolist() == [tok.sot_token_id, *tok.encode(caption), tok.eot_token_id]


@pytest.mark.parametrize(
    "text",
    ["A Photo of  the CAT", "unseen words: zyzzyva, quixotic!", "東京 タワー 🇯🇵 👨‍👩‍👧", "&amp; Ã©t", "", "  \t "],
)
def test_trained_tokenizer_round_trips(trained, text):
    tok = get_tokenizer(str(trained))
    assert tok.decode(tok(text)[0]) == clean_text(text).lower()
    assert tok.decode(tok.encode(text)) == clean_text(text).lower()


def test_trained_tokenizer_plugs_into_a_model(trained):
    cfg = get_model_config("tiny-vit")
    tok = get_tokenizer(str(trained))
    cfg.text.tokenizer, cfg.text.vocab_size, cfg.text.eot_token_id = str(trained), tok.vocab_size, tok.eot_token_id
    tokenizer = get_tokenizer(cfg.text)  # checks vocab_size and eot_token_id against the file
    model = CLIP(cfg)
    images = torch.randn(8, 3, cfg.vision.image_size, cfg.vision.image_size)
    texts = tokenizer(training_captions(8, seed=3), context_length=16)  # short rows: a fast test
    assert (texts == tok.eot_token_id).sum() == 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    labels = torch.arange(8)
    losses = []
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a shared machine
    try:
        for _ in range(20):
            logits_per_image, logits_per_text = model(images, texts)
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(num_threads)
    assert losses[-1] < 0.2 * losses[0], losses


def _train_tokenizer_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tokenizer_script", REPO / "scripts" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_inputs_take_brace_patterns_and_must_all_exist(tmp_path, capsys):
    """Shards are named as everywhere else (a brace pattern), and a missing input stops the script
    before training, naming it."""
    script = _train_tokenizer_script()
    for index in range(2):
        write_shard(tmp_path / f"shard-{index:06d}.tar", training_captions(50, seed=index), tmp_path / "m", 1024)
    output = tmp_path / "tokenizer.json"
    pattern = str(tmp_path / "shard-{000000..000001}.tar")
    script.main(["--vocab-size", "300", "--output", str(output), pattern])
    assert "trained on 104 captions" in capsys.readouterr().out  # 2 x (50 + big.txt + the one that climbs out)

    missing = str(tmp_path / "shard-{000001..000003}.tar")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--vocab-size", "300", "--output", str(tmp_path / "other.json"), missing])
    assert exit_info.value.code == 2 and not (tmp_path / "other.json").exists()
    assert f"2 of 3 inputs do not exist: {tmp_path}/shard-000002.tar, {tmp_path}/shard-000003.tar" in (
        capsys.readouterr().err)


def test_an_export_carries_its_vocabulary(trained, tmp_path):
    """A model trained with its own tokenizer.json tokenizes from its export alone, and the export's
    vocabulary is recognised as the same one wherever the file lives (e.g. init_from=the export)."""
    original = tmp_path / "tokenizer.json"
    original.write_text(trained.read_text(encoding="utf-8"), encoding="utf-8")
    tok = get_tokenizer(str(original))
    cfg = get_model_config("tiny-vit")
    cfg.text.tokenizer, cfg.text.vocab_size, cfg.text.eot_token_id = str(original), tok.vocab_size, tok.eot_token_id
    export = clip.export_model(CLIP(cfg), tmp_path / "model.safetensors")
    original.unlink()  # the training machine's file is gone

    loaded = clip.create_model(pretrained=export)
    assert loaded.config.text.tokenizer == str(export.resolve())
    captions = training_captions(4, seed=5) + ["東京 café"]
    expected = get_tokenizer(str(trained))(captions)
    assert torch.equal(get_tokenizer(loaded.config.text)(captions), expected)
    assert torch.equal(get_tokenizer(str(export))(captions), expected)

    elsewhere = copy.deepcopy(cfg)
    elsewhere.text.tokenizer = str(trained)  # the same vocabulary at another path
    assert config_differences(loaded.config, elsewhere) == []
    content = json.loads(trained.read_text(encoding="utf-8"))
    content["model"]["merges"] = content["model"]["merges"][::-1]  # same ids and size, other merges
    other = tmp_path / "other.json"
    other.write_text(json.dumps(content), encoding="utf-8")
    elsewhere.text.tokenizer = str(other)
    assert [key for key, *_ in config_differences(loaded.config, elsewhere)] == ["text.tokenizer"]
