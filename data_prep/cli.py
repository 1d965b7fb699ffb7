"""`rwkv7-prep`: the command-line face of prep.prepare."""

from __future__ import annotations

import argparse
import logging
import sys

from rwkv7_train.errors import UserError

PROG = "rwkv7-prep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text files with the RWKV World tokenizer into one binidx pair (PREFIX.bin + "
                    "PREFIX.idx, the layout RWKV-LM trains from; each document is followed by token 0) and a "
                    "manifest PREFIX.json with document/token counts and sha256 checksums.",
        epilog="Example: rwkv7-prep corpus/*.jsonl --output data/world --text-key text",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (.txt, .jsonl, ...)")
    parser.add_argument("--output", "-o", required=True, metavar="PREFIX",
                        help="output path prefix, without .bin/.idx (directories are created)")
    parser.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                        help="text: each file is one document; jsonl: each line is a JSON object, one document; "
                             "auto (default): .jsonl/.ndjson files are jsonl, all others text")
    parser.add_argument("--text-key", default="text", metavar="KEY",
                        help="jsonl field holding the document text (default: text)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: warning: %(message)s")
    from rwkv7_data_prep.prep import manifest_path, prepare

    try:
        manifest = prepare(args.inputs, args.output, fmt=args.format, text_key=args.text_key)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    skipped = manifest["skipped"]
    files = [f["name"] for f in manifest["files"].values()] + [manifest_path(args.output).name]
    print(f"{PROG}: {manifest['documents']} documents, {manifest['tokens']} tokens "
          f"(skipped {skipped['empty']} empty, {skipped['invalid_utf8']} invalid UTF-8); "
          f"wrote {', '.join(files)} in {manifest_path(args.output).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
