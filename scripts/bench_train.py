"""Training-step speed and memory on one device: rwkv7-train's own step next to flash-linear-attention's
RWKV7ForCausalLM in a plain PyTorch loop, at the same size, batch, context and data.

    python scripts/bench_train.py --models 0.1b,0.4b,1.5b --batch 8 --ctx 4096 --activation-checkpointing both
    python scripts/bench_train.py --models 1.5b --batch 1 --ctx 8192,16384,32768 --stacks ours
    python scripts/bench_train.py --models tiny --ctx 256 --batch 2 --steps 2 --device cpu     # smoke check

ours: the config rwkv7-train composes for `model=NAME data=binidx` (its trainer, optim and data groups), built as
train.fit builds it: RWKVDataModule on the --corpus source + RWKV7LitModule + Lightning Trainer, precision
bf16-mixed on CUDA (float32 weights, bf16 autocast), AdamW, gradient clipping 1.0; only the run's side work
(validation, checkpoints, loggers, samples, progress bar) is left out.
fla: fla.models.RWKV7ForCausalLM of the same sizes and LoRA ranks (rwkv7_train.hf.hf_config), float32 weights under
bf16 autocast too, torch AdamW with the same settings (not fused, as ours), clipping 1.0, reading each step's loss
as ours does. Its loss is its fused linear cross-entropy with L2Wrap (--fla-loss linear: chunked, no full logits,
as ours) or its default fused cross-entropy on the full logits (--fla-loss logits). Its input is the batches of
the same DataModule. fla runs on CUDA only (Triton); on the CPU its rows say so.

--warmup steps run first (kernel compiles, fla's autotuning); then --steps are timed, from the start of the first
to the end of the last after a device sync, data waits included. tokens/s = steps * B * ctx / time.
MFU = tokens/s * rwkv7_train.flops.training_flops_per_token (the same model FLOPs for both stacks; the recompute
under activation checkpointing is not counted) / the GPU's dense bf16 peak (flops.GPU_PEAK_BF16).
peak GiB: torch.cuda.max_memory_allocated over the run (max_memory_reserved in brackets).
A run that runs out of GPU memory is a row "OOM"; the next one starts from freed memory, and longer contexts of
the same stack, model, batch and checkpointing are skipped (--ctx 8192,16384,32768 finds the longest that fits).
"""
import argparse
import gc
import platform
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STACKS = ("ours", "fla")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_corpus(path: Path) -> None:
    """A small rwkv7-prep source at `path`: the sample corpus's text (this Python's stdlib), tokenized."""
    from rwkv7_data_prep.prep import prepare
    from rwkv7_data_prep.sample import stdlib_sources

    print(f"no corpus at {path}: tokenizing this Python's stdlib into it with rwkv7-prep", flush=True)
    prepare([str(p) for p in stdlib_sources()], path, fmt="text")


def compose_config(args, model: str, batch: int, ctx: int, ckpt: bool, device: torch.device):
    """The run config rwkv7-train would compose for these settings."""
    from hydra import compose, initialize_config_module

    import rwkv7_train.train  # noqa: F401  (registers the resolvers the config uses)

    cuda = device.type == "cuda"
    overrides = [f"model={model}", "data=binidx", f"data.train_path={args.corpus}", f"data.ctx_len={ctx}",
                 f"data.micro_bsz={batch}", f"activation_checkpointing={str(ckpt).lower()}", "logger=none",
                 f"trainer.max_steps={args.warmup + args.steps}", "trainer.devices=1",
                 f"trainer.accelerator={'gpu' if cuda else 'cpu'}",
                 f"trainer.precision={'bf16-mixed' if cuda else '32-true'}",
                 "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0"]
    with initialize_config_module("rwkv7_train.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def run_ours(cfg, args, device: torch.device) -> float:
    """Seconds for --steps steps of rwkv7-train's Lightning module, after --warmup."""
    import hydra
    import lightning as L
    from omegaconf import OmegaConf

    from rwkv7_train.lit_module import RWKV7LitModule

    class StepTimer(L.Callback):
        def __init__(self):
            self.start = self.end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == trainer.max_steps:
                sync(device)
                self.end = time.perf_counter()

    resolved = OmegaConf.to_container(cfg, resolve=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    tokens_per_step = cfg.data.micro_bsz * cfg.data.ctx_len
    L.seed_everything(cfg.seed, verbose=False)
    module = RWKV7LitModule(model=resolved["model"], optim=resolved["optim"], tokens_per_step=tokens_per_step,
                            total_tokens=tokens_per_step * cfg.trainer.max_steps,
                            activation_checkpointing=cfg.activation_checkpointing, kernel=resolved["kernel"])
    timer = StepTimer()
    trainer = L.Trainer(**resolved["trainer"], strategy="auto", logger=False, enable_checkpointing=False,
                        callbacks=[timer])
    trainer.fit(module, datamodule=datamodule)
    return timer.end - timer.start


def run_fla(cfg, args, device: torch.device) -> float:
    """Seconds for --steps steps of fla's RWKV7ForCausalLM in a plain loop, after --warmup."""
    import hydra
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM
    from omegaconf import OmegaConf

    from rwkv7_train.hf import hf_config
    from rwkv7_train.model import RWKV7Config

    resolved = OmegaConf.to_container(cfg, resolve=True)
    fla_cfg = hf_config(RWKV7Config.from_dict(resolved["model"]))
    linear = args.fla_loss == "linear"
    fla_cfg.update(fuse_linear_cross_entropy=linear, fuse_cross_entropy=not linear, use_l2warp=True, use_cache=False)
    torch.manual_seed(cfg.seed)
    model = RWKV7ForCausalLM(FlaConfig(**fla_cfg)).to(device=device, dtype=torch.float32)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    o = resolved["optim"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr_init"], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])
    datamodule = hydra.utils.instantiate(cfg.data)
    clip = resolved["trainer"]["gradient_clip_val"]
    start = None
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        idx, targets = batch.idx.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=idx, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError(f"fla: loss {loss.item()} at step {i}")
        if i == args.warmup + args.steps - 1:
            sync(device)
            return time.perf_counter() - start
    raise RuntimeError("the data loader ended before the last timed step")


def bench(stack: str, model: str, batch: int, ctx: int, ckpt: bool, args, device: torch.device) -> tuple[str, bool]:
    """One table row, and whether the run ran out of GPU memory."""
    from omegaconf import OmegaConf

    from rwkv7_train.flops import mfu, peak_flops, training_flops_per_token
    from rwkv7_train.model import RWKV7Config

    label = f"fla ({args.fla_loss})" if stack == "fla" else stack
    row = f"| {label} | {model} | {batch} | {ctx} | {'on' if ckpt else 'off'} |"
    if stack == "fla" and device.type != "cuda":
        return f"{row} needs CUDA (Triton) | | |", False
    cfg = compose_config(args, model, batch, ctx, ckpt, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = (run_ours if stack == "ours" else run_fla)(cfg, args, device)
    except torch.cuda.OutOfMemoryError:
        seconds = None
    gc.collect()   # after the except block: the traceback and the run's tensors are gone
    if device.type == "cuda":
        peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} "
                f"({torch.cuda.max_memory_reserved(device) / 2**30:.2f})")
        torch.cuda.empty_cache()
    else:
        peak = "-"
    if seconds is None:
        return f"{row} OOM | | {peak} |", True
    tokens_per_s = args.steps * batch * ctx / seconds
    model_cfg = RWKV7Config.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    peak_flops_s = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    utilisation = mfu(tokens_per_s, training_flops_per_token(model_cfg, ctx), peak_flops_s)
    mfu_text = "-" if utilisation is None else f"{utilisation:.1%}"
    return f"{row} {tokens_per_s:,.0f} | {mfu_text} | {peak} |", False


def main() -> None:
    from rwkv7_train.quiet import quiet_libraries
    from rwkv7_train.train import CACHE_DIR

    models = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="0.1b,0.4b,1.5b", help=f"comma-separated, of: {', '.join(models)}")
    p.add_argument("--batch", default="8", help="micro-batch size(s), comma-separated (default 8)")
    p.add_argument("--ctx", default="4096", help="context length(s), comma-separated (default 4096)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--activation-checkpointing", choices=("on", "off", "both"), default="off")
    p.add_argument("--stacks", default="ours,fla", help="comma-separated, of: ours, fla (default both)")
    p.add_argument("--fla-loss", choices=("linear", "logits"), default="linear",
                   help="fla's fused linear cross-entropy (default) or fused cross-entropy on full logits")
    p.add_argument("--corpus", type=Path, default=CACHE_DIR / "bench_corpus",
                   help="an rwkv7-prep source directory (built from the stdlib sample text if absent)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    chosen = args.models.split(",")
    stacks = args.stacks.split(",")
    unknown = sorted(set(chosen) - set(models)) + sorted(set(stacks) - set(STACKS))
    if unknown:
        p.error(f"unknown model or stack: {', '.join(unknown)}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first step compiles kernels)")
    batches, ctxs = [int(b) for b in args.batch.split(",")], [int(c) for c in args.ctx.split(",")]
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[args.activation_checkpointing]
    device = torch.device(args.device)
    if "fla" in stacks and device.type == "cuda":
        try:
            import fla.models  # noqa: F401
        except ImportError as e:
            print(f"fla left out: {e}")
            stacks.remove("fla")
    if not (args.corpus / "manifest.json").is_file():
        build_corpus(args.corpus)
    quiet_libraries()
    torch.set_float32_matmul_precision("high")   # as rwkv7-train sets it
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {args.steps} timed steps after {args.warmup}; corpus {args.corpus}",
          flush=True)
    rows, out_of_memory = [], set()
    for model in chosen:
        for batch in batches:
            for ctx in sorted(ctxs):
                for ckpt in ckpts:
                    for stack in stacks:
                        if (stack, model, batch, ckpt) in out_of_memory:   # a longer context needs more
                            continue
                        row, oom = bench(stack, model, batch, ctx, ckpt, args, device)
                        print(f"done: {row}", flush=True)
                        rows.append(row)
                        if oom:
                            out_of_memory.add((stack, model, batch, ckpt))
    print("\n| stack | model | B | ctx | ckpt | tokens/s | MFU | peak GiB (reserved) |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
