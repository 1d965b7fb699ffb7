"""`rwkv7-prep`: the command-line face of prep.prepare."""

from __future__ import annotations

import argparse
import logging
import sys

from rwkv7_data_prep.readers import FORMATS  # light: no numpy, no datasets
from rwkv7_train.errors import UserError

PROG = "rwkv7-prep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize a corpus with the RWKV World tokenizer into a prepared source: a directory of binidx "
                    "shards (DIR/shard-00000.bin + .idx, ..., the layout RWKV-LM trains from; each document is "
                    "followed by token 0) and DIR/manifest.json (document and token counts, sha256 checksums, "
                    "tokenizer). Re-running the same command resumes an interrupted run, or does nothing.",
        epilog="Examples: rwkv7-prep corpus/*.jsonl --output data/web --val-every 1000;  "
               "rwkv7-prep --dataset HuggingFaceFW/fineweb-edu --config sample-10BT --output data/edu",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="input files (.txt, .jsonl, .parquet)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="the source directory (created)")
    parser.add_argument("--name", help="the source's name in its manifest (default: DIR's name)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="text: each file is one document; jsonl: one JSON object (one document) per line; "
                             "parquet: one document per row; auto (default): by suffix (.jsonl/.ndjson/.json, "
                             ".parquet), all others text")
    parser.add_argument("--text-key", default="text", metavar="KEY",
                        help="jsonl field or parquet/dataset column holding the text (default: text)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                        help="start a new shard once one holds N tokens (default: 100000000)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes that tokenize, this one included (default: all cores; 1: no others)")
    parser.add_argument("--val-every", type=int, default=None, metavar="K",
                        help="hold out every K-th document (the K-th, 2K-th, ...) into a second source DIR_val")
    parser.add_argument("--dataset", metavar="NAME",
                        help="read a Hugging Face dataset (hub name, or a local dataset directory) instead of files, "
                             "streaming")
    parser.add_argument("--config", metavar="NAME", help="the dataset's configuration (with --dataset)")
    parser.add_argument("--split", default="train", help="the dataset's split (with --dataset; default: train)")
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{PROG}: {level}{record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("rwkv7_data_prep")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    from rwkv7_data_prep.prep import prepare  # after parsing, so --help stays fast

    try:
        manifests = prepare(args.inputs, args.output, name=args.name, fmt=args.format, text_key=args.text_key,
                shard_tokens=args.shard_tokens, workers=args.workers, val_every=args.val_every,
                dataset=args.dataset, config=args.config, split=args.split)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    for m in manifests:
        print(f"{PROG}: {m.source_dir}: {m.documents} documents, {m.tokens} tokens in {len(m.shards)} shards "
              f"(skipped {m.skipped['empty']} empty, {m.skipped['invalid_utf8']} invalid UTF-8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
