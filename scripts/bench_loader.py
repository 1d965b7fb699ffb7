"""Time the training DataLoader alone producing 0.1B-model batches, next to an estimate of the 0.1B model's step
time on an H100, so that the loader's share of a training step is visible.

    python scripts/bench_loader.py [--dir DIR] [--tokens 16e6] [--batches 200] [--workers 0 2]

Data: three generated sources of uint16 binidx files (random ids, log-normal document lengths), mixed by weight
0.5 / 0.3 / 0.2 as the DataModule does: "web" (one file), "code" (two shards given as a list, so windows cross
files), "books" (one file). One rank's loader (ctx_len 4096, micro_bsz 16) runs for --batches batches in each
sampling mode (magic_prime, packed) and worker count, once "cold" (the .bin files dropped from the page cache with
posix_fadvise, so windows come from the disk) and once "warm" (the same windows again, now cached).

The step time is an estimate, not a measurement: 6 * parameters * tokens per micro-step FLOPs at 40% of the
H100's 800 TFLOP/s bf16. With workers the loading overlaps the step, so ms/batch over the step time is an upper
bound of the loader's share; with 0 workers the step waits for all of it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from rwkv7_train.data.binidx import BinidxWriter
from rwkv7_train.data.datamodule import RWKVDataModule
from rwkv7_train.model import RWKV7, RWKV7Config

CTX_LEN, MICRO_BSZ, VOCAB = 4096, 16, 65536
H100_BF16_FLOPS, MFU = 800e12, 0.40
MODEL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "model" / "0.1b.yaml"


def write_source(prefix: Path, n_tokens: int, mean_doc: int, seed: int) -> None:
    """About n_tokens of random ids in documents of log-normal length around mean_doc (each then ends in 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=n_tokens, dtype=np.uint16)
    lengths = np.maximum(1, rng.lognormal(np.log(mean_doc), 1.0, size=n_tokens // 8).astype(np.int64))
    ends = np.cumsum(lengths)
    bounds = np.concatenate([[0], ends[ends < n_tokens]])
    with BinidxWriter(prefix, vocab_size=VOCAB) as w:
        for a, b in zip(bounds[:-1], bounds[1:]):
            w.add_document(ids[a:b])


def make_sources(root: Path, tokens: int) -> list[dict]:
    """The three sources under root, generated unless already there from an earlier run with the same size."""
    plan = {"web": [("web", tokens, 1500)], "code": [("code-0", tokens // 2, 4000), ("code-1", tokens // 2, 4000)],
            "books": [("books", tokens, 60000)]}
    sources = []
    for (name, parts), weight in zip(plan.items(), (0.5, 0.3, 0.2)):
        prefixes = []
        for i, (part, n, mean_doc) in enumerate(parts):
            prefix = root / f"{part}-{n}"
            if not Path(f"{prefix}.idx").is_file():
                write_source(prefix, n, mean_doc, seed=len(sources) * 10 + i)
            prefixes.append(str(prefix))
        sources.append({"name": name, "path": prefixes if len(prefixes) > 1 else prefixes[0], "weight": weight})
    return sources


def drop_from_page_cache(root: Path) -> None:
    for path in root.glob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_loader(sources: list[dict], sampling: str, workers: int, batches: int) -> tuple[float, float]:
    """(ms to the first batch, mean ms per batch over the next `batches`) for one rank's training loader."""
    dm = RWKVDataModule(sources=sources, sampling=sampling, ctx_len=CTX_LEN, micro_bsz=MICRO_BSZ, vocab_size=VOCAB,
                        epoch_steps=batches + 1, num_workers=workers, seed=0)
    t0 = time.perf_counter()
    it = iter(dm.train_dataloader())
    batch = next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    t2 = time.perf_counter()
    assert batch.idx.shape == (MICRO_BSZ, CTX_LEN)
    del it  # stops the workers
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / batches


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def step_estimate_ms() -> tuple[int, float]:
    """(parameters of the 0.1B model, estimated ms of one micro-step of MICRO_BSZ x CTX_LEN tokens on an H100)."""
    with torch.device("meta"):  # counts the parameters without allocating them
        model = RWKV7(RWKV7Config.from_dict(yaml.safe_load(MODEL_CONFIG.read_text())))
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * MICRO_BSZ * CTX_LEN
    return params, flops / (MFU * H100_BF16_FLOPS) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="where to write (or find) the generated files; default: a temp dir")
    ap.add_argument("--tokens", type=float, default=16e6, help="tokens per source (default 16e6)")
    ap.add_argument("--batches", type=int, default=200, help="timed batches per configuration (default 200)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts (default 0 2)")
    args = ap.parse_args()

    params, step_ms = step_estimate_ms()
    print(f"machine: {platform.machine()} {cpu_model()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"0.1B step time, an ESTIMATE (not measured): 6 x {params / 1e6:.1f}M params x {MICRO_BSZ * CTX_LEN} tokens "
          f"at {MFU:.0%} of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 = {step_ms:.0f} ms per micro-step per GPU")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sources = make_sources(root, int(args.tokens))
        print(f"data: {root}, 3 sources x {int(args.tokens):,} tokens, ready in {time.perf_counter() - t:.1f} s")
        print(f"{'sampling':<12} {'workers':>7} {'cache':>5} {'first batch ms':>14} {'ms/batch':>9} "
              f"{'Mtokens/s':>9} {'share of est. step':>18}")
        for sampling in ("magic_prime", "packed"):
            for workers in args.workers:
                drop_from_page_cache(root)
                for cache in ("cold", "warm"):
                    first, per_batch = time_loader(sources, sampling, workers, args.batches)
                    print(f"{sampling:<12} {workers:>7} {cache:>5} {first:>14.1f} {per_batch:>9.3f} "
                          f"{MICRO_BSZ * CTX_LEN / per_batch / 1e3:>9.1f} {per_batch / step_ms:>18.2%}")


if __name__ == "__main__":
    main()
