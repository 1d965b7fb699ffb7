"""`rwkv7-convert`: move weights between rwkv7-train checkpoints and BlinkDL's official layout (`.pth` or
`.safetensors`)."""
import argparse
import sys
from pathlib import Path

from .errors import UserError


def _export(args):
    from .checkpoints import load_model
    from .official import official_suffix, save_official

    # Both refusals come before the checkpoint is read, which may take minutes (a DeepSpeed directory).
    suffix = official_suffix(args.output)
    if Path(args.output).exists() and not args.force:
        raise UserError(f"{args.output} exists: pass --force to overwrite it")
    model = load_model(args.checkpoint)
    save_official(model, args.output)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: official RWKV-7 layout ({suffix[1:]}), bf16, {n / 1e6:.1f}M parameters")


def _info(args):
    from .checkpoints import read_checkpoint

    sd, c = read_checkpoint(args.checkpoint)
    n = sum(t.numel() for t in sd.values())
    print(f"RWKV-7 x070: L{c.n_layer} D{c.n_embd} heads {c.n_head}x{c.head_size} vocab {c.vocab_size} "
          f"ffn {c.dim_ffn} LoRA w/a/v/g {c.dim_w}/{c.dim_a}/{c.dim_v}/{c.dim_g}, {n / 1e6:.1f}M parameters")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="rwkv7-convert",
        description="Convert RWKV-7 checkpoints. Importing an official .pth or .safetensors needs no conversion: "
                    "train from it with `rwkv7-train init_from=MODEL.pth` (the model config must match), or load "
                    "it in Python with rwkv7_train.load_official. Upgrading RWKV-6 checkpoints is not implemented "
                    "yet.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="rwkv7-train checkpoint (.ckpt file or DeepSpeed directory) -> official "
                                      ".pth or .safetensors (bf16)")
    p.add_argument("checkpoint", help="a .ckpt written by rwkv7-train, a DeepSpeed checkpoint directory, or a .pth")
    p.add_argument("output", help="the official checkpoint to write; its suffix picks the format: .pth "
                                  "(torch.save) or .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(run=_export)
    p = sub.add_parser("info", help="print the architecture of any RWKV-7 checkpoint (.safetensors too)")
    p.add_argument("checkpoint")
    p.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"rwkv7-convert: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
