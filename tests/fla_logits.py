"""Logits of Hugging Face directories under flash-linear-attention's RWKV7ForCausalLM, in a process of their own.

    python fla_logits.py SPEC.json OUT.safetensors

SPEC: {"ids": [[token, ...], ...], "runs": {name: {"dir": DIR, "fuse_norm": bool}}}; OUT gets each run's float32
logits under its name. Without CUDA, fla's Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by the
caller); only its recurrent inference path works there: no gradients, fewer than 64 tokens.
"""
import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.runtime.autotuner as autotuner

    # The interpreter has no GPU to time an autotuner's configs on: report them all equally fast, so the first is taken.
    autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: [0.0, 0.0, 0.0])

import fla  # noqa: F401  (registers fla's models with transformers' Auto classes)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.tensor(spec["ids"], device=device)
    logits = {}
    for name, run in spec["runs"].items():
        model = AutoModelForCausalLM.from_pretrained(run["dir"], fuse_norm=run["fuse_norm"]).to(device).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits.float().cpu()
    save_file(logits, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
