"""Which products of the Triton WKV-7 forward need float32: a CPU emulation of its tf32 rounding.

The forward's chunk algebra (chunks of 16, the blocked inverse; see kernels/wkv7/triton_chunk.py) in PyTorch, each
product's operands truncated to tf32 (10 mantissa bits, as the GPU's tensor cores read float32 registers) or kept
float32, against the float64 step-by-step loop. Prints y's relative L2 error over the bf16 floor (the error of the
float64 result itself rounded to bf16) for: every product in float32; every product in tf32; each product alone in
tf32; the kernels' defaults (KernelConfig: tf32 except M_rk, r.S and the forward's state products in tf32x3 and M_rk v
in "split"); those with the forward's state products in tf32 (prec_s="tf32"); and those with every tf32x3 product
in Triton's bf16x3 instead (three bf16 products, which the tensor cores run at twice tf32's rate). Runs on the CPU
in seconds.

    python scripts/kernel_precision.py                                  # random decays, no initial state
    python scripts/kernel_precision.py --T 208 --H 4 --decay near_1 --initial-state   # a state that barely decays
"""
import argparse
import math

import torch

from rwkv7_kernels import wkv7_naive

L = 16
PRODUCTS = {  # name in the table: what the kernel computes (triton_chunk.py's symbols)
    "M_ak": "A~ K^T", "M_rb": "R~ B^T", "M_rk": "R~ K^T", "M_ab": "A~ B^T", "inverse": "inside (I - M_ab)^-1",
    "A~S": "A~ S^T", "M_ak v": "M_ak V", "u": "(I - M_ab)^-1 rhs", "r.S": "R~ S^T", "M_rb u": "M_rb U",
    "M_rk v": "M_rk V", "u B": "U^T B_end", "v K": "V^T K_end",
}
DEFAULTS = {"M_rk": "x3", "r.S": "x3", "A~S": "x3", "u B": "x3", "v K": "x3", "M_rk v": "split"}


def tf32(x):
    """float32 -> its top 10 mantissa bits (truncation, as the tensor cores read float32 registers)."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def product(x, y, mode):
    """x @ y as the kernel's dot mode computes it, accumulated in float64 (the accumulation is not in question)."""
    d = torch.float64
    if mode == "fp32":
        return (x.to(d) @ y.to(d)).float()
    xh, yh = tf32(x), tf32(y)
    if mode == "tf32":
        return (xh.to(d) @ yh.to(d)).float()
    if mode == "split":   # x in two tf32 parts; y tf32 as it is (bf16-exact in the kernel)
        return (xh.to(d) @ yh.to(d) + tf32(x - xh).to(d) @ yh.to(d)).float()
    if mode == "x3":      # tf32x3: hi*hi + hi*lo + lo*hi
        xl, yl = tf32(x - xh), tf32(y - yh)
        return (xh.to(d) @ yh.to(d) + xh.to(d) @ yl.to(d) + xl.to(d) @ yh.to(d)).float()
    if mode == "bf16x3":  # Triton's bf16x3: bf16 (round to nearest) hi and lo parts, hi*hi + hi*lo + lo*hi
        xh, yh = x.bfloat16().float(), y.bfloat16().float()
        xl, yl = (x - xh).bfloat16().float(), (y - yh).bfloat16().float()
        return (xh.to(d) @ yh.to(d) + xh.to(d) @ yl.to(d) + xl.to(d) @ yh.to(d)).float()
    raise ValueError(mode)


def forward(r, w, k, v, a, b, s0, modes):
    """y of the chunked forward with each product in modes[name] ("fp32", "tf32", "split", "x3", "bf16x3")."""
    B, T, H, N = r.shape
    S = s0.float().clone()
    o = torch.arange(L)
    strict, incl = (o[:, None] > o[None, :]).float(), (o[:, None] >= o[None, :]).float()
    eye = torch.eye(L)
    ys = []
    for c0 in range(0, T, L):
        r_, w_, k_, v_, a_, b_ = (x[:, c0:c0 + L].transpose(1, 2).float() for x in (r, w, k, v, a, b))
        c = torch.cumsum(w_, 2)
        c_last = c[:, :, -1:]
        at, rt = a_ * torch.exp(c - w_), r_ * torch.exp(c)
        bh, kh = b_ * torch.exp(-c), k_ * torch.exp(-c)
        e_end = torch.exp(c_last - c)
        m_ak = strict * product(at, kh.mT, modes["M_ak"])
        m_rb = incl * product(rt, bh.mT, modes["M_rb"])
        m_rk = incl * product(rt, kh.mT, modes["M_rk"])
        m_ab = strict * product(at, bh.mT, modes["M_ab"])
        x = eye.expand_as(m_ab).clone()   # the blocked inverse, as _inverse_blocked
        for i in range(1, 4):
            x = x + (o % 4 == i).float()[:, None] * product(m_ab * ((o[:, None] // 4) == (o[None, :] // 4)), x,
                                                            modes["inverse"])
        for level in (2, 3):
            inside = (o[:, None] >> (level + 1)) == (o[None, :] >> (level + 1))
            same = (o[:, None] >> level) == (o[None, :] >> level)
            x = x + product(product(x, m_ab * (inside & ~same), modes["inverse"]), x, modes["inverse"])
        u = product(x, product(at, S.mT, modes["A~S"]) + product(m_ak, v_, modes["M_ak v"]), modes["u"])
        ys.append((product(rt, S.mT, modes["r.S"]) + product(m_rb, u, modes["M_rb u"])
                   + product(m_rk, v_, modes["M_rk v"])).transpose(1, 2))
        S = (S * torch.exp(c_last) + product(u.mT, b_ * e_end, modes["u B"])
             + product(v_.mT, k_ * e_end, modes["v K"]))
    return torch.cat(ys, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=1024, help="a multiple of 16")
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--decay", choices=["random", "near_1"], default="random")
    ap.add_argument("--initial-state", action="store_true", help="start from a 0.5-scaled random state")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.T % L:
        ap.error(f"--T must be a multiple of {L}")
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.B, args.T, args.H, 64)

    def randn(*s):
        return torch.randn(*s, generator=g)

    # Model-like inputs, as bench_kernel.py makes them: r, k, v, a, b rounded to bf16 (the kernel's inputs), w float32.
    r, k, v = randn(*shape), 0.3 * randn(*shape), randn(*shape)
    w = (-math.exp(-0.5) * torch.sigmoid(2 * randn(*shape)) if args.decay == "random"
         else torch.full(shape, -1e-6))
    kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
    iclr = torch.sigmoid(randn(*shape))
    xs = [x.bfloat16().float() for x in (r, w, k, v, -kk, kk * iclr)]
    xs[1] = w
    s0 = (0.5 * randn(args.B, args.H, 64, 64) if args.initial_state else torch.zeros(args.B, args.H, 64, 64))
    y64 = wkv7_naive(*(x.double() for x in xs), s0.double())[0]
    floor = ((y64.bfloat16().double() - y64).norm() / y64.norm()).item()
    print(f"B={args.B} T={args.T} H={args.H} decay={args.decay} initial_state={args.initial_state}: "
          f"bf16 floor of y {floor:.4e}")

    def row(name, modes):
        y = forward(*xs, s0, modes).bfloat16().double()
        err = ((y - y64).norm() / y64.norm()).item()
        print(f"{name:40s} {err:.4e}  {err / floor:6.3f}x floor", flush=True)

    row("every product float32", dict.fromkeys(PRODUCTS, "fp32"))
    row("every product tf32", dict.fromkeys(PRODUCTS, "tf32"))
    for name, what in PRODUCTS.items():
        row(f"only {name} ({what}) tf32", {**dict.fromkeys(PRODUCTS, "fp32"), name: "tf32"})
    row("the kernels' defaults", {**dict.fromkeys(PRODUCTS, "tf32"), **DEFAULTS})
    row("defaults, forward state products tf32", {**dict.fromkeys(PRODUCTS, "tf32"), **DEFAULTS,
                                                   "A~S": "tf32", "u B": "tf32", "v K": "tf32"})
    row("defaults, their tf32x3 products bf16x3", {**dict.fromkeys(PRODUCTS, "tf32"), **DEFAULTS,
                                                    **{name: "bf16x3" for name, mode in DEFAULTS.items()
                                                       if mode == "x3"}})


if __name__ == "__main__":
    main()
