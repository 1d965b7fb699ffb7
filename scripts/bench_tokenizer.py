"""Benchmark WorldTokenizer against BlinkDL's reference TRIE_TOKENIZER on a few MB of mixed text, on one core.

The text is built at run time (nothing committed): half is the Python standard library's own .py/.txt files read
from disk (English prose in docstrings plus code), half is seeded random "words" made of syllables from several
scripts, with digits, punctuation, emoji and newlines between them. Both tokenizers must give identical ids.

    python scripts/bench_tokenizer.py [--mb 4] [--seed 0] [--repeats 5] [--ref-repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkv7_train.tokenizer import BUNDLED_VOCAB, WorldTokenizer

# (name, codepoint ranges syllables are drawn from, syllable length range, separator between words)
SCRIPTS = [
    ("latin", [(0x61, 0x7A)], (1, 3), " "),
    ("cyrillic", [(0x430, 0x44F)], (1, 3), " "),
    ("greek", [(0x3B1, 0x3C9)], (1, 3), " "),
    ("arabic", [(0x627, 0x64A)], (1, 3), " "),
    ("devanagari", [(0x915, 0x939), (0x93E, 0x94C)], (1, 3), " "),
    ("han", [(0x4E00, 0x62FF)], (1, 1), ""),  # the low, common part of the CJK block
    ("kana", [(0x3041, 0x3093), (0x30A1, 0x30F3)], (1, 2), ""),
    ("hangul", [(0xAC00, 0xD7A3)], (1, 1), " "),
]
EMOJI = ["\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f469\u200d\U0001f4bb", "\u2764\ufe0f", "\U0001f1ef\U0001f1f5"]
PUNCT = [".", ",", "!", "?", ":", ";", "\u3002", "\uff0c", "\u060c", "-", "(", ")", '"']


def stdlib_text(n_bytes: int) -> str:
    """Concatenate stdlib .py/.txt files (sorted, so the same Python gives the same text) up to n_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.rglob("*")):
        if size >= n_bytes:
            break
        if path.suffix not in (".py", ".txt") or "site-packages" in path.parts or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode("utf-8"))
    return "".join(parts)


def random_multilingual_text(n_bytes: int, seed: int) -> str:
    """Paragraphs of random words, each paragraph in one script, made of random syllables from that script."""
    rng = random.Random(seed)
    # A fixed syllable inventory per script, so words repeat the way real words do and multi-char tokens can match.
    inventories = {}
    for name, ranges, (lo, hi), _ in SCRIPTS:
        chars = [chr(c) for a, b in ranges for c in range(a, b + 1)]
        inventories[name] = ["".join(rng.choices(chars, k=rng.randint(lo, hi))) for _ in range(300)]
    parts, size = [], 0
    while size < n_bytes:
        name, _, _, sep = rng.choice(SCRIPTS)
        words = []
        for _ in range(rng.randint(20, 120)):
            word = "".join(rng.choices(inventories[name], k=rng.randint(1, 4)))
            roll = rng.random()
            if roll < 0.1:
                word += rng.choice(PUNCT)
            elif roll < 0.13:
                word = str(rng.randint(0, 99999))
            elif roll < 0.15:
                word = rng.choice(EMOJI)
            words.append(word)
        paragraph = sep.join(words) + "\n\n"
        parts.append(paragraph)
        size += len(paragraph.encode("utf-8"))
    return "".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="size of the text in MB (10**6 bytes of UTF-8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of WorldTokenizer; the best counts")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed runs of TRIE_TOKENIZER; the best counts")
    args = parser.parse_args()

    # One core, so the figures compare single-threaded throughput whatever the machine.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    half = int(args.mb * 1e6 / 2)
    code, multilingual = stdlib_text(half), random_multilingual_text(half, args.seed)
    text = code + multilingual
    data = text.encode("utf-8")
    mb = len(data) / 1e6

    fast = WorldTokenizer()
    ref = TRIE_TOKENIZER(str(BUNDLED_VOCAB))

    ref_ids = ref.encode(text)
    fast_ids = fast.encode(text)
    if fast_ids != ref_ids:
        i = next((i for i, (a, b) in enumerate(zip(fast_ids, ref_ids)) if a != b), min(len(fast_ids), len(ref_ids)))
        sys.exit(f"MISMATCH at token {i}: WorldTokenizer {fast_ids[i:i + 5]} vs reference {ref_ids[i:i + 5]}")
    if fast.encode_to_numpy(text).tolist() != ref_ids:
        sys.exit("MISMATCH: encode_to_numpy differs from the reference")

    ref_s = best_time(lambda: ref.encode(text), args.ref_repeats)
    list_s = best_time(lambda: fast.encode(text), args.repeats)
    numpy_s = best_time(lambda: fast.encode_to_numpy(text), args.repeats)
    decode_s = best_time(lambda: fast.decode(fast_ids), args.repeats)

    print(f"machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, pinned to one core")
    print(f"text: {mb:.2f} MB UTF-8, {len(text):,} chars, {len(ref_ids):,} tokens "
          f"({len(data) / len(ref_ids):.2f} bytes/token); ids identical")
    print(f"mix: {len(code.encode()) / 1e6:.2f} MB Python stdlib .py/.txt, "
          f"{len(multilingual.encode()) / 1e6:.2f} MB seeded random words in {len(SCRIPTS)} scripts + emoji")
    print(f"TRIE_TOKENIZER.encode          {mb / ref_s:8.2f} MB/s")
    print(f"WorldTokenizer.encode          {mb / list_s:8.2f} MB/s   {ref_s / list_s:7.1f}x")
    print(f"WorldTokenizer.encode_to_numpy {mb / numpy_s:8.2f} MB/s   {ref_s / numpy_s:7.1f}x")
    print(f"WorldTokenizer.decode          {mb / decode_s:8.2f} MB/s")


if __name__ == "__main__":
    main()
