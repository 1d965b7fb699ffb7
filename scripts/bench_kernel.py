"""Accuracy and speed of the WKV-7 kernels on a CUDA GPU (issue 3, points 5 to 7).

    python scripts/bench_kernel.py                      # accuracy, kernel speed and layer timing
    python scripts/bench_kernel.py --only speed --variants '[{"fwd_bv": 64}, {"prec": "tf32x3"}]'

accuracy: bf16 inputs (w in float32, as the model passes it), B=2 T=4096 H=8 N=64, against the float64 loop on
    the same (upcast) inputs: the output's relative L2 error next to the bf16 floor (the error of the float64
    result itself rounded to bf16) and the relative L2 error of every gradient. A variant that leaves the backward
    to the automatic choice is also checked with each backward forced: this shape (16 programs) runs the split
    one, larger batches the fused one.
speed: forward (no autograd) and forward+backward at B=8 T=4096 H=64 N=64, bf16, median of CUDA-event timings,
    side by side with flash-linear-attention's chunk_rwkv7 (if installed) at its fastest setting and with the
    chunked PyTorch path; the ratios, and the achieved bandwidth and FLOP rate of our kernels.
layer: one whole RWKV-7 block (time-mix + channel-mix) forward+backward in bf16 at C=768 and C=2048, and where
    its GPU time goes (torch.profiler, kernels grouped by kind).
choice (only with --only choice): the op's forward+backward at B=8 T=4096 with the fused and with the split
    backward forced, H from 2 to 40, next to what the automatic choice takes (the measurement behind its rule).
--variants: a JSON list of KernelConfig overrides ({} = the defaults); each is checked and timed (and the block
    timed with each).
Everything printed is also written to --log.
"""
import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict

import torch

from rwkv7_kernels import KernelConfig, wkv7_chunked_torch, wkv7_naive
from rwkv7_kernels.wkv7 import dispatch
from rwkv7_kernels.wkv7.triton_op import wkv7_triton

# (bytes/s of a device-to-device copy, read + write; FLOP/s of dense bf16 matrix products), measured with PyTorch:
# the H100 figures as issue 3 gives them, the H200's as the device tool's KINDS.md records them.
PEAKS = {"H100": (3.0e12, 800e12), "H200": (4.3e12, 790e12)}
W_MIN = -math.exp(-0.5)
FLA_KW = dict(scale=1.0, safe_gate=True, lower_bound=-0.6065306597126334, chunk_size=64)

LOG = []


def say(*args):
    line = " ".join(str(a) for a in args)
    print(line, flush=True)
    LOG.append(line)


def make_inputs(B, T, H, N, seed=0, device="cuda"):
    """Model-like inputs: unit-normal r, v, 0.3-scaled k, a = -kk, b = kk * iclr, w = -e^-0.5 sigmoid(.)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (B, T, H, N)

    def randn():
        return torch.randn(shape, generator=g, device=device)

    r, k, v = randn(), 0.3 * randn(), randn()
    w = W_MIN * torch.sigmoid(2 * randn())
    kk = torch.nn.functional.normalize(randn(), dim=-1)
    iclr = torch.sigmoid(randn())
    bf = torch.bfloat16
    return [r.to(bf), w, k.to(bf), v.to(bf), (-kk).to(bf), (kk * iclr).to(bf)]


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def ours(config):
    """Our CUDA op under `config` (a KernelConfig), as a function of the six inputs returning y."""
    def run(r, w, k, v, a, b):
        return wkv7_triton(r, w, k, v, a, b, config=config)[0]
    return run


def torch_path(r, w, k, v, a, b):
    return wkv7_chunked_torch(r, w, k, v, a, b)[0]


def fla_fn():
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        say(f"fla not importable ({e}); its rows are skipped")
        return None

    def fla(r, w, k, v, a, b):
        return chunk_rwkv7(r, w, k, v, a, b, **FLA_KW)[0]
    return fla


def grads_of(fn, xs, gy):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward(gy)
    return y.detach(), [x.grad for x in xs]


# ------------------------------------------------------------------------------------------------- accuracy
def each_backward(variants):
    """The variants, each followed, where it leaves bwd to the automatic choice, by its copies with the fused and
    the split backward forced."""
    out = []
    for v in variants:
        out.append(v)
        if (v or {}).get("bwd", KernelConfig().bwd) == "auto":
            out += [dict(v or {}, bwd="fused"), dict(v or {}, bwd="split")]
    return out


def accuracy(variants, fla):
    B, T, H, N = 2, 4096, 8, 64
    xs = make_inputs(B, T, H, N, seed=1)
    gy = torch.randn(B, T, H, N, device="cuda", dtype=torch.float64, generator=torch.Generator("cuda").manual_seed(2))
    t0 = time.time()
    y64, g64 = grads_of(lambda *a: wkv7_naive(*a)[0], [x.double() for x in xs], gy)
    floor = rel(y64.bfloat16(), y64)
    say(f"\n## accuracy: bf16 inputs, B={B} T={T} H={H} N={N}, vs float64 loop ({time.time() - t0:.1f} s)")
    say(f"bf16 floor of y (fp64 result rounded to bf16): {floor:.3e}")
    say(f"{'kernel':44s} {'y err':>9s} {'x floor':>7s}  " + " ".join(f"{'d' + n:>8s}" for n in "rwkvab"))
    rows = [(f"ours {json.dumps(v)}", lambda v=v: ours(KernelConfig(**(v or {})))) for v in each_backward(variants)]
    rows.append(("chunked torch (fp32 inside)", lambda: torch_path))
    if fla is not None:
        rows.append(("fla 0.6.0 chunk_rwkv7 (chunk 64, safe_gate)", lambda: fla))
    results = []
    for name, make in rows:
        try:
            y, g = grads_of(make(), xs, gy.to(torch.bfloat16))
            e = rel(y, y64)
            ge = [rel(a, b) for a, b in zip(g, g64)]
            say(f"{name:44s} {e:9.3e} {e / floor:7.3f}  " + " ".join(f"{x:8.1e}" for x in ge))
            results.append(dict(name=name, y_err=e, floor=floor, grads=ge))
        except Exception as exc:  # keep going: one broken variant must not cost the rest of the run
            say(f"{name:44s} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    return results


# ------------------------------------------------------------------------------------------------- speed
def cuda_time(fn, reps, warmup=2):
    """Median milliseconds of fn() over reps runs, CUDA events around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_kernel(fn, xs, gy, reps, name=None):
    """(forward ms, forward+backward ms); with a name, each is printed as soon as it is measured."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]

    def fwd():
        with torch.no_grad():
            fn(*xs)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(gy)

    f = cuda_time(fwd, reps)
    if name:
        say(f"{name:44s} {f:8.2f}")
    fb = cuda_time(fwd_bwd, reps)
    if name:
        say(f"{name:44s} {f:8.2f} {fb:10.2f}")
    return f, fb


def traffic_and_flops(B, T, H, N, L=16):
    """Fewest bytes our kernels move and the FLOPs of the chunked algorithm as written (one product each, whatever
    its dot mode), with the chunks' matrices kept (keep_mats). Forward (training): reads the inputs, writes y,
    the float32 chunk states and the matrices. Backward: reads every input, dy, the states and the matrices and
    writes six gradients."""
    tok = B * T * H * N
    inputs = tok * (5 * 2 + 4)                      # r, k, v, a, b bf16; w float32
    slots = B * H * (T // L + 1)
    states, mats = slots * N * N * 4, slots * 4 * L * L * 4
    fwd_bytes = inputs + tok * 2 + states + mats
    bwd_bytes = inputs + tok * 2 + states + mats + inputs
    chunks = B * H * T // L
    fwd_flops = chunks * 2 * (8 * L * L * N + 4 * L * N * N + L ** 3 / 3)
    bwd_flops = chunks * 2 * (18 * L * L * N + 9 * L * N * N)
    return fwd_bytes, bwd_bytes, fwd_flops, bwd_flops


def kernel_times(fn, xs, gy):
    """GPU time per kernel of one forward+backward (torch.profiler, mean of 3)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for x in leaves:
                x.grad = None        # else .grad accumulation adds kernels that are not the op's
            fn(*leaves).backward(gy)
        torch.cuda.synchronize()
    rows = [(ev.self_device_time_total / 3 / 1000, ev.key) for ev in prof.key_averages()
            if ev.self_device_time_total > 0]
    return sorted(rows, reverse=True)


def speed(variants, fla, with_torch=True):
    B, T, H, N = 8, 4096, 64, 64
    xs = make_inputs(B, T, H, N, seed=3)
    gy = torch.randn(B, T, H, N, device="cuda", dtype=torch.bfloat16)
    say(f"\n## speed: B={B} T={T} H={H} N={N}, bf16 (w float32), {torch.cuda.get_device_name()}")
    say(f"{'kernel':44s} {'fwd ms':>8s} {'fwd+bwd ms':>10s}")
    results, configs = {}, {}
    for v in variants:
        name = f"ours {json.dumps(v)}"
        try:
            configs[name] = KernelConfig(**(v or {}))
            t0 = time.time()
            f, fbk = time_kernel(ours(configs[name]), xs, gy, reps=20)
            results[name] = (f, fbk)
            say(f"{name:44s} {f:8.2f} {fbk:10.2f}   (incl. compile {time.time() - t0:.0f} s)")
        except Exception as exc:
            say(f"{name:44s} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    if fla is not None:
        try:
            results["fla"] = time_kernel(fla, xs, gy, reps=20, name="fla 0.6.0 chunk_rwkv7 (chunk 64, safe_gate)")
        except Exception as exc:
            say(f"fla FAILED: {type(exc).__name__}: {str(exc)[:300]}")
    if with_torch:
        try:
            results["torch"] = time_kernel(torch_path, xs, gy, reps=3, name="chunked PyTorch path")
        except Exception as exc:
            say(f"torch path FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        torch.cuda.empty_cache()
    ours_rows = {k: v for k, v in results.items() if k.startswith("ours")}
    if ours_rows:
        best = min(ours_rows, key=lambda k: ours_rows[k][1])
        fb, bb, ff, bf = traffic_and_flops(B, T, H, N, L=configs[best].chunk)
        bw, bf16 = next((p for name, p in PEAKS.items() if name in torch.cuda.get_device_name()), PEAKS["H100"])
        f, fbk = ours_rows[best]
        say(f"\nbest: {best}")
        say(f"  forward {f:.2f} ms; forward+backward {fbk:.2f} ms (backward alone {fbk - f:.2f} ms, its forward "
            f"writes the states: see 'fwd (training)' below)")
        for other in ("fla", "torch"):
            if other in results:
                of, ofb = results[other]
                say(f"  vs {other}: forward {of / f:.2f}x faster, forward+backward {ofb / fbk:.2f}x faster")
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        f_train = cuda_time(lambda: ours(configs[best])(*leaves), reps=20)
        bwd = fbk - f_train
        say(f"  fwd (training, writes states) {f_train:.2f} ms: {fb / f_train * 1e-6:.0f} GB/s "
            f"({fb / f_train * 1e3 / bw:.0%} of {bw / 1e12:.1f} TB/s), {ff / f_train * 1e-9:.1f} TFLOP/s "
            f"({ff / f_train * 1e3 / bf16:.1%} of {bf16 / 1e12:.0f})")
        say(f"  bwd {bwd:.2f} ms: {bb / bwd * 1e-6:.0f} GB/s ({bb / bwd * 1e3 / bw:.0%}), "
            f"{bf / bwd * 1e-9:.1f} TFLOP/s ({bf / bwd * 1e3 / bf16:.1%})")
        say(f"  minimum traffic fwd {fb / 1e9:.2f} GB, bwd {bb / 1e9:.2f} GB; FLOPs fwd {ff / 1e9:.0f} G, "
            f"bwd {bf / 1e9:.0f} G")
        say("  GPU time per kernel, one forward+backward:")
        for ms, name in kernel_times(ours(configs[best]), xs, gy)[:8]:
            say(f"    {ms:7.2f} ms  {name[:80]}")
    return results


# ------------------------------------------------------------------------------------------------- layer
def layer(variants, B=8, T=4096):
    sys.path.insert(0, ".")
    from rwkv7_train.model import RWKV7, RWKV7Config
    say(f"\n## one RWKV-7 block forward+backward, bf16, B={B} T={T}")
    for C, v in ((C, v) for C in (768, 2048) for v in variants):
        model = RWKV7(RWKV7Config(vocab_size=256, n_layer=2, n_embd=C), kernel=KernelConfig(**(v or {}))).cuda()
        block = model.blocks[1].to(torch.bfloat16)
        with torch.no_grad():   # the official init zeroes some matrices; time on non-zero weights
            for p in block.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
        x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v_first = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)

        def step():
            x.grad = v_first.grad = None
            block.zero_grad(set_to_none=True)     # as a training step does: no accumulation kernels
            out = block(x, v_first)[0]
            out.backward(g)

        ms = cuda_time(step, reps=10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        groups = {}
        for ev in prof.key_averages():
            t = ev.self_device_time_total / 3 / 1000.0
            if t <= 0:
                continue
            name = ev.key.lower()
            if "wkv7" in name:
                kind = "WKV-7 kernels"
            elif any(s in name for s in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "sm90_")):
                kind = "matrix products"
            elif "norm" in name:
                kind = "layer/group norms"
            else:
                kind = "elementwise and other"
            groups[kind] = groups.get(kind, 0.0) + t
        total = sum(groups.values())
        parts = ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in sorted(groups.items(), key=lambda kv: -kv[1]))
        say(f"C={C} (H={C // 64}) {json.dumps(v)}: {ms:.2f} ms per block forward+backward; GPU time: {parts}")
        top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]
        for ev in top:
            say(f"    {ev.self_device_time_total / 3 / 1000:7.2f} ms  {ev.key[:90]}")
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- choice
def choice(variants, B=8, T=4096, heads=(2, 4, 6, 8, 10, 12, 16, 33, 40)):
    """The op's forward+backward with the fused and with the split backward forced, over the number of programs
    B*H, next to what the automatic choice (dispatch._fused_backward) takes."""
    say(f"\n## fused or split backward: forward+backward ms, B={B} T={T} N=64, bf16")
    slots = dispatch._program_slots(torch.device("cuda"))
    for variant in variants:
        say(f"{json.dumps(variant)} ({slots} programs run at a time)")
        for H in heads:
            xs = make_inputs(B, T, H, 64, seed=3)
            gy = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16)
            ms = {}
            for mode in ("fused", "split"):
                ms[mode] = time_kernel(ours(KernelConfig(**dict(variant, bwd=mode))), xs, gy, reps=10)[1]
            auto = KernelConfig(**dict(variant, bwd="auto"))
            r, w, k, v, a, b = xs
            gluon = dispatch._gluon_backward(r, k, v, a, b, gy, auto.keep_mats, auto)
            fused = dispatch._fused_backward(B * H, gy.device, gluon, auto)
            say(f"  programs {B * H:4d}: fused {ms['fused']:6.2f}  split {ms['split']:6.2f}  "
                f"automatic: {'fused' if fused else 'split'}{' (Gluon)' if fused and gluon else ''}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["accuracy", "speed", "layer", "choice"], action="append")
    ap.add_argument("--variants", default="[{}]", help="JSON list of KernelConfig overrides ({} = the defaults)")
    ap.add_argument("--no-torch", action="store_true", help="skip timing the PyTorch path (slow)")
    ap.add_argument("--no-fla", action="store_true", help="skip fla (its first call autotunes for minutes)")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA GPU")
    import triton
    say(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    say(f"defaults: {json.dumps(asdict(KernelConfig()))}")
    variants = json.loads(args.variants)
    parts = args.only or ["accuracy", "speed", "layer"]
    fla = None if args.no_fla else fla_fn()
    out = {}
    try:
        if "accuracy" in parts:
            out["accuracy"] = accuracy(variants, fla)
        if "speed" in parts:
            out["speed"] = speed(variants, fla, with_torch=not args.no_torch)
        if "layer" in parts:
            layer(variants)
        if "choice" in parts:
            choice(variants)
    finally:
        if args.log:
            with open(args.log, "w") as f:
                f.write("\n".join(LOG) + "\n")
                f.write(json.dumps(out, default=str) + "\n")


if __name__ == "__main__":
    main()
