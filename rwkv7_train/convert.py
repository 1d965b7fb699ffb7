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


def _export_hf(args):
    from .checkpoints import load_model
    from .hf import DTYPES as TORCH_DTYPES
    from .hf import export_hf

    if Path(args.output).exists() and not args.force:   # before the checkpoint is read, which may take minutes
        raise UserError(f"{args.output} exists: pass --force to replace it")
    model = load_model(args.checkpoint)
    export_hf(model, args.output, dtype=TORCH_DTYPES[args.dtype], force=args.force)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: Hugging Face model for flash-linear-attention's RWKV7ForCausalLM, {args.dtype}, "
          f"{n / 1e6:.1f}M parameters")


def _info(args):
    from .checkpoints import read_checkpoint

    sd, c = read_checkpoint(args.checkpoint)
    n = sum(t.numel() for t in sd.values())
    print(f"RWKV-7 x070: {_describe(c)}, {n / 1e6:.1f}M parameters")


def _describe(c) -> str:
    """The shapes of an RWKV7Config in one phrase."""
    return (f"L{c.n_layer} D{c.n_embd} heads {c.n_head}x{c.head_size} vocab {c.vocab_size} ffn {c.dim_ffn} "
            f"LoRA w/a/v/g {c.dim_w}/{c.dim_a}/{c.dim_v}/{c.dim_g}")


DTYPES = ("bf16", "fp16", "fp32")


def _upgrade(args):
    from .hf import DTYPES as TORCH_DTYPES
    from .official import load_state_dict_file, official_suffix, save_state_dict
    from .upgrade import NAMES, UPGRADES, UpgradeOptions

    suffix = official_suffix(args.output)
    if Path(args.output).exists() and not args.force:
        raise UserError(f"{args.output} exists: pass --force to overwrite it")
    options = UpgradeOptions(dim_w=args.dim_w, dim_a=args.dim_a, dim_v=args.dim_v, dim_g=args.dim_g,
                             w0_max=args.w0_max, r_k_scale=args.r_k_scale, seed=args.seed,
                             dtype=TORCH_DTYPES[args.dtype])
    up = UPGRADES[args.version](load_state_dict_file(args.checkpoint), options, source=args.checkpoint)
    save_state_dict(up.state_dict, args.output)
    c = up.config
    print(f"upgraded {NAMES[args.version]} {args.checkpoint} -> {args.output}: RWKV-7 x070 {_describe(c)}, "
          f"{args.dtype} {suffix[1:]}; gate LoRA relative error {up.gate_error:.3g} (largest over layers), "
          f"{up.clamped} of {c.n_layer * c.n_embd} decay channels clamped to w0={args.w0_max:g}")


def _rank(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a LoRA rank must be a positive integer, got {text}")
    return value


def _add_upgrade(sub, command: str, version: str, name: str) -> None:
    from .upgrade import UpgradeOptions

    d = UpgradeOptions()
    p = sub.add_parser(command, help=f"official {name} .pth or .safetensors -> official RWKV-7 (x070), by the RWKV-7 "
                                     "paper's upgrade recipe (docs/checkpoints.md)")
    p.add_argument("checkpoint", help=f"the official {name} checkpoint")
    p.add_argument("output", help="the RWKV-7 checkpoint to write; its suffix picks the format: .pth (torch.save) "
                                  "or .safetensors")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="tensor type written (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the x070 init of the new tensors and the draws "
                                                             "of the widened regions (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    w_default = "the x070 default for the width, or the source's rank if larger" if version == "x060" else \
        "the x070 default for the width"
    p.add_argument("--dim-w", type=_rank, help=f"decay LoRA rank (default: {w_default})")
    p.add_argument("--dim-a", type=_rank, help="in-context learning rate LoRA rank (default: the x070 default for "
                                               "the width)")
    p.add_argument("--dim-v", type=_rank, help="value residual LoRA rank (default: the x070 default for the width)")
    p.add_argument("--dim-g", type=_rank, help="gate LoRA rank, where the gate matrix's SVD is cut (default: the "
                                               "x070 default for the width)")
    p.add_argument("--w0-max", type=float, default=d.w0_max,
                   help="cap on w0 where the source's decay is faster than RWKV-7 can decay, or needs a larger w0 "
                        "(default: %(default)s, the largest w0 of the x070 init)")
    p.add_argument("--r-k-scale", type=float, default=d.r_k_scale,
                   help="r_k = R_K_SCALE * time_faaaa (default: %(default)s, a copy: both weight the bonus term)")
    p.set_defaults(run=_upgrade, version=version)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="rwkv7-convert",
        description="Convert RWKV-7 checkpoints. Importing an official .pth or .safetensors needs no conversion: "
                    "train from it with `rwkv7-train init_from=MODEL.pth` (the model config must match), or load "
                    "it in Python with rwkv7_train.load_official. upgrade-v6 and upgrade-v5 turn RWKV-6 (x060) "
                    "and RWKV-5.2 (x052) checkpoints into RWKV-7 ones (init_from= also takes them, upgraded on the "
                    "fly).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="rwkv7-train checkpoint (.ckpt file or DeepSpeed directory) -> official "
                                      ".pth or .safetensors (bf16)")
    p.add_argument("checkpoint", help="a .ckpt written by rwkv7-train, a DeepSpeed checkpoint directory, or a .pth")
    p.add_argument("output", help="the official checkpoint to write; its suffix picks the format: .pth "
                                  "(torch.save) or .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(run=_export)
    p = sub.add_parser("export-hf", help="any RWKV-7 checkpoint -> Hugging Face directory (config.json, "
                                         "model.safetensors, World vocab) for flash-linear-attention's "
                                         "RWKV7ForCausalLM")
    p.add_argument("checkpoint", help="a .ckpt written by rwkv7-train, a DeepSpeed checkpoint directory, or an "
                                      "official .pth or .safetensors")
    p.add_argument("output", help="the directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="the weights' dtype (default bf16)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it is a former export")
    p.set_defaults(run=_export_hf)
    p = sub.add_parser("info", help="print the architecture of any RWKV-7 checkpoint (.safetensors too)")
    p.add_argument("checkpoint")
    p.set_defaults(run=_info)
    _add_upgrade(sub, "upgrade-v6", "x060", "RWKV-6 (x060)")
    _add_upgrade(sub, "upgrade-v5", "x052", "RWKV-5.2 (x052)")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"rwkv7-convert: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
