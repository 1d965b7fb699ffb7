"""Upgrading saves training, end to end on this machine's CPU.

1. A small RWKV-6 (x060, the default job's shape: L4 C128, World vocab) trains on the sample corpus, on windows
   that the RWKV-7 runs below never read, and is saved as an official x060 .pth.
2. `rwkv7-convert upgrade-v6` turns it into an official RWKV-7 (x070) checkpoint.
3. `rwkv7-train` trains the default tiny RWKV-7 twice for the same steps on the same windows: from the official init,
   and with init_from= the upgrade.

Prints a markdown table (first-step loss, final losses, the step at which the upgraded run reaches the fresh run's
final loss) and writes OUT/curves.svg (both training-loss curves, 10-step means).

    python scripts/upgrade_demo.py OUT_DIR [--v6-steps 300] [--steps 300]
"""
import argparse
import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from rwkv7_data_prep.sample import build_sample_corpus
from rwkv7_train.data.batch import collate
from rwkv7_train.data.datamodule import RWKVDataModule
from rwkv7_train.loss import lm_loss
from rwkv7_train.official import save_official
from rwkv7_train.optim import lr_at, param_groups
from rwkv7_train.rwkv6 import RWKV6, RWKV6Config
from rwkv7_train.train import CACHE_DIR

V, L, C, N = 65536, 4, 128, 64            # configs/model/tiny.yaml
CTX, BSZ = 256, 4                          # configs/data/sample.yaml
LR_INIT, LR_FINAL, WARMUP = 6e-4, 6e-5, 10  # configs/optim/adamw.yaml
SMOOTH = 10                                # steps per mean of the training loss


def train_rwkv6(out: Path, steps: int, first_sample: int, seed: int = 0) -> Path:
    """Train the RWKV-6 with the RWKV-7 recipe (AdamW groups, cosine, clip 1.0) on samples first_sample, ...; save
    it in the official layout. Returns the .pth path."""
    train, val = build_sample_corpus(str(CACHE_DIR / "sample"))
    data = RWKVDataModule(train_path=str(Path(train).parent), val_path=str(Path(val).parent), ctx_len=CTX,
                          micro_bsz=BSZ, vocab_size=V, epoch_steps=1000)
    windows = data.train_dataset()
    torch.manual_seed(seed)
    model = RWKV6(RWKV6Config(vocab_size=V, n_layer=L, n_embd=C, head_size=N, dim_decay=32))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR_INIT, betas=(0.9, 0.99), eps=1e-18)
    log = open(out / "rwkv6_loss.csv", "w")
    log.write("step,loss\n")
    start = time.time()
    for step in range(steps):
        lr = lr_at(step * BSZ * CTX, step, LR_INIT, LR_FINAL, WARMUP, steps * BSZ * CTX)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch = collate([windows[first_sample + step * BSZ + b] for b in range(BSZ)], packed=False)
        loss = lm_loss(model(batch.idx), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.write(f"{step},{loss.item():.6f}\n")
        if step % 50 == 0 or step == steps - 1:
            print(f"rwkv6 step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    log.close()
    path = out / "rwkv6.pth"
    save_official(model, path)
    return path


def run(args: list[str]) -> None:
    exe = Path(sys.executable).parent / args[0]
    print("$", " ".join(args), flush=True)
    subprocess.run([str(exe), *args[1:]], check=True)


def losses(run_dir: Path, key: str) -> dict[int, float]:
    got = {}
    for f in [run_dir / "metrics.csv"]:
        for row in csv.DictReader(open(f)):
            if row.get(key):
                got[int(row["step"])] = float(row[key])
    return got


def smoothed(curve: dict[int, float]) -> list[tuple[int, float]]:
    """(last step, mean loss) of each SMOOTH consecutive steps."""
    steps = sorted(curve)
    return [(steps[i + SMOOTH - 1], sum(curve[s] for s in steps[i:i + SMOOTH]) / SMOOTH)
            for i in range(0, len(steps) - SMOOTH + 1, SMOOTH)]


def write_svg(path: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    """A line chart of `curves` (name -> [(step, loss)]), with no plotting library."""
    W, H, pad = 640, 400, 50
    xs = [s for c in curves.values() for s, _ in c]
    ys = [v for c in curves.values() for _, v in c]
    x0, x1, y0, y1 = 0, max(xs), 0.0, math.ceil(max(ys))

    def xy(s, v):
        return pad + (s - x0) / (x1 - x0) * (W - 2 * pad), H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>']
    for v in range(int(y0), int(y1) + 1):
        _, y = xy(0, v)
        parts.append(f'<line x1="{pad}" x2="{W - pad}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{pad - 8}" y="{y + 4:.1f}" text-anchor="end">{v}</text>')
    parts.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">step (training loss, {SMOOTH}-step means)'
                 f'</text><text x="{W - pad}" y="{H - pad + 16}" text-anchor="end">{x1}</text>')
    for (name, curve), colour, i in zip(curves.items(), ("#d62728", "#1f77b4"), range(len(curves))):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in curve))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
                     f'<text x="{W - pad - 4}" y="{pad + 16 * i}" text-anchor="end" fill="{colour}">{name}</text>')
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--v6-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="steps of each RWKV-7 run")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The RWKV-7 runs read samples 0 .. steps * BSZ - 1; the RWKV-6 reads the ones after them.
    v6 = args.out / "rwkv6.pth"
    if not v6.exists():
        v6 = train_rwkv6(args.out, args.v6_steps, first_sample=args.steps * BSZ)
    up = args.out / "rwkv7_upgraded.pth"
    if not up.exists():
        run(["rwkv7-convert", "upgrade-v6", str(v6), str(up)])
    common = ["logger=none", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=null"]
    for name, extra in (("fresh", []), ("upgraded", [f"init_from={up}"])):
        if not losses(args.out / name, "val/loss"):
            run(["rwkv7-train", *common, *extra, f"hydra.run.dir={args.out / name}"])

    train = {name: losses(args.out / name, "train/loss") for name in ("fresh", "upgraded")}
    val = {name: losses(args.out / name, "val/loss") for name in ("fresh", "upgraded")}
    smooth = {name: smoothed(c) for name, c in train.items()}
    target = smooth["fresh"][-1][1]
    reached = next((s for s, v in smooth["upgraded"] if v <= target), None)
    print(f"\nln(V) = {math.log(V):.3f}; training losses are {SMOOTH}-step means, validation on the held-out files\n")
    print("| run | loss at step 0 | first mean | final mean | validation loss (by step) |")
    print("|---|---:|---:|---:|---|")
    for name in train:
        vals = ", ".join(f"{v:.3f} ({s})" for s, v in sorted(val[name].items()))
        print(f"| {name} | {train[name][min(train[name])]:.3f} | {smooth[name][0][1]:.3f} | "
              f"{smooth[name][-1][1]:.3f} | {vals} |")
    last = max(train["fresh"]) + 1
    where = f"step {reached} of {last} ({reached / last:.0%})" if reached is not None else "never"
    print(f"\nthe upgraded run reaches the fresh run's final mean loss {target:.3f} at {where}")
    write_svg(args.out / "curves.svg", {"fresh init": smooth["fresh"], "upgraded from RWKV-6": smooth["upgraded"]})
    print(f"curves: {args.out / 'curves.svg'}")


if __name__ == "__main__":
    main()
