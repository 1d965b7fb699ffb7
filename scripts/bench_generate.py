"""Speed of rwkv7-generate at batch 1: prefill and decode tokens/s, through the CLI's own path (generate.decode
with generate.sample_next: the prompt in one parallel forward, then one RNN step and one sample per token).

    python scripts/bench_generate.py --model tiny --device cpu
    python scripts/bench_generate.py --model 0.1b --device cuda --prompt-tokens 512 --max-tokens 256
    python scripts/bench_generate.py --checkpoint model.pth --device cuda --dtype fp32

--model NAME builds configs/model/NAME.yaml at the official init (the weights do not change the speed); the prompt
is random token ids. Each repeat (after one warm-up run, which also compiles the CUDA kernels) generates
--max-tokens tokens after a --prompt-tokens prompt:
prefill: prompt tokens / time to the first sampled token (the parallel forward and one sample).
decode: the tokens after the first / their time (one RNN step and one sample each); also the median ms per token
and, of that, the median ms in sample_next (a random-init model's logits are nearly flat, the slowest case for
top-p: a trained model's nucleus is a few tokens).
memory: allocated (CUDA) or resident (CPU) memory after half the decode and after all of it: the same when a
step needs only the state. Figures are medians over --repeats.
"""
import argparse
import os
import platform
import statistics
import time
from itertools import islice
from pathlib import Path

import torch
import yaml

from rwkv7_train import RWKV7, RWKV7Config
from rwkv7_train.checkpoints import load_model
from rwkv7_train.generate import DTYPES, decode, sample_next

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def build(args, dtype) -> tuple[RWKV7, str]:
    if args.checkpoint:
        return load_model(args.checkpoint, dtype=dtype, device=args.device).eval(), Path(args.checkpoint).name
    cfg = RWKV7Config.from_dict(yaml.safe_load((MODEL_CONFIGS / f"{args.model}.yaml").read_text()))
    with torch.device(args.device):
        model = RWKV7(cfg)
    return model.to(dtype).eval(), args.model


def memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(model, prompt: list[int], n: int, args) -> dict:
    """One generation of n tokens after `prompt`, timed at each sampled token (sampling reads the logits on the
    CPU, so every time is after the GPU finished)."""
    generator = torch.Generator().manual_seed(0)
    sampling = []

    def pick(logits):
        begin = time.perf_counter()
        token = sample_next(logits, args.temperature, args.top_p, args.top_k, generator)
        sampling.append(time.perf_counter() - begin)
        return token

    stamps, memory = [], []
    start = time.perf_counter()
    for _ in islice(decode(model, prompt, pick), n):
        stamps.append(time.perf_counter())
        if len(stamps) in (n // 2, n):
            memory.append(memory_mib(args.device))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prefill": len(prompt) / (stamps[0] - start), "decode": len(steps) / sum(steps),
            "ms": 1e3 * statistics.median(steps), "sample_ms": 1e3 * statistics.median(sampling[1:]),
            "mem_half": memory[0], "mem_end": memory[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="tiny", help="a config of configs/model (default tiny)")
    source.add_argument("--checkpoint", help="any checkpoint rwkv7-generate takes, instead of --model")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per repeat (at least 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)   # the sampler's settings: rwkv7-generate's defaults
    parser.add_argument("--top-p", type=float, default=0.85)
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args()
    if args.max_tokens < 4 or args.prompt_tokens < 1:
        parser.error("--max-tokens must be >= 4 and --prompt-tokens >= 1")
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    model, name = build(args, DTYPES[dtype_name])
    cfg = model.cfg
    ids = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, cfg.vocab_size, (args.prompt_tokens,), generator=ids).tolist()

    run(model, prompt, 4, args)   # warm-up
    runs = [run(model, prompt, args.max_tokens, args) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    params = sum(p.numel() for p in model.parameters())
    # The state per layer: the time-mix and channel-mix inputs of the last token, and the float32 WKV matrices.
    layer_bytes = 2 * cfg.n_embd * DTYPES[dtype_name].itemsize + cfg.n_head * cfg.head_size ** 2 * 4
    state_kib = cfg.n_layer * layer_bytes / 2**10
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; sampler temperature {args.temperature} top-p {args.top_p} "
          f"top-k {args.top_k}; medians of {args.repeats} runs after a warm-up")
    print("| model | params | device | dtype | prompt | prefill tok/s | new tokens | decode tok/s | ms/token | "
          "sample ms | state KiB | memory MiB half / end |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {name} L{cfg.n_layer} D{cfg.n_embd} | {params / 1e6:.1f}M | {args.device} | {dtype_name} | "
          f"{args.prompt_tokens} | {med['prefill']:.0f} | {args.max_tokens} | {med['decode']:.1f} | {med['ms']:.2f} | "
          f"{med['sample_ms']:.2f} | {state_kib:.0f} | {med['mem_half']:.0f} / {med['mem_end']:.0f} |")


if __name__ == "__main__":
    main()
