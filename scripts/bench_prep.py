"""Throughput of rwkv7-prep (MB of text per second) with one worker and with all cores, next to the raw tokenizer.

The text is built at run time by bench_tokenizer.py's builders (nothing committed): half Python standard-library
sources, half seeded random words in 8 scripts; it is cut into documents of 1-8 KB and written twice, as one jsonl
file and as one text file per document (--copies N writes the documents N times over, for inputs larger than the
text builders make quickly). `prepare` runs in this process (interpreter start-up excluded, worker start-up
included) and the best of --repeats runs counts. "tokenizer" is `encode_to_numpy` on the same documents, one call
each, on one core: the limit one core would reach if reading, parsing and writing cost nothing.

    python scripts/bench_prep.py [--mb 40] [--copies 1] [--seed 0] [--repeats 3] [--workers N (default: all cores)]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
from pathlib import Path

from rwkv7_data_prep.prep import all_cores, prepare
from rwkv7_train.tokenizer import WorldTokenizer


def best_time(fn, repeats: int) -> float:
    from bench_tokenizer import best_time as best  # see documents() for why the import is local

    return best(fn, repeats)


def documents(mb: float, seed: int) -> list[str]:
    # Imported here, not at the top: spawned workers re-import this script, and need none of it.
    from bench_tokenizer import random_multilingual_text, stdlib_text

    half = int(mb * 1e6 / 2)
    text = stdlib_text(half) + random_multilingual_text(half, seed)
    rng = random.Random(seed)
    docs, i = [], 0
    while i < len(text):
        n = rng.randint(1000, 8000)
        docs.append(text[i:i + n])
        i += n
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40.0, help="size of the text in MB (10**6 bytes of UTF-8)")
    parser.add_argument("--copies", type=int, default=1, help="write the documents this many times over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=all_cores(), help="the 'all cores' setting")
    args = parser.parse_args()
    from bench_tokenizer import cpu_name

    tok = WorldTokenizer()
    docs = documents(args.mb, args.seed) * args.copies
    data = [d.encode("utf-8") for d in docs]
    mb = sum(map(len, data)) / 1e6
    raw_s = best_time(lambda: [tok.encode_to_numpy(d) for d in data], args.repeats)
    n_tokens = sum(tok.encode_to_numpy(d).size for d in data)

    print(f"machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"text: {mb:.2f} MB UTF-8 in {len(docs):,} documents of 1-8 KB ({args.copies} copies), {n_tokens:,} "
          f"tokens ({mb * 1e6 / n_tokens:.2f} bytes/token)")
    print(f"{'':34s} {'MB/s':>8s}  {'x tokenizer':>11s}")
    print(f"{'tokenizer (encode_to_numpy, 1 core)':34s} {mb / raw_s:8.1f}  {1:11.2f}")
    with tempfile.TemporaryDirectory(prefix="bench_prep_") as tmp:
        tmp = Path(tmp)
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
        (tmp / "txt").mkdir()
        for i, d in enumerate(data):
            (tmp / "txt" / f"{i:06d}.txt").write_bytes(d)
        inputs = {"jsonl": [str(tmp / "docs.jsonl")], "text": sorted(str(p) for p in (tmp / "txt").iterdir())}
        for fmt, paths in inputs.items():
            for workers in sorted({1, args.workers}):
                def run():
                    shutil.rmtree(tmp / "out", ignore_errors=True)
                    prepare(paths, tmp / "out", workers=workers, tokenizer=tok)
                s = best_time(run, args.repeats)
                label = f"rwkv7-prep {fmt}, --workers {workers}"
                print(f"{label:34s} {mb / s:8.1f}  {raw_s / s:11.2f}")


if __name__ == "__main__":
    main()
