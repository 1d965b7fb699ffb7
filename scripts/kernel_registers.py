"""Registers, spills and instruction counts of the WKV-7 kernels (Triton and Gluon), compiled for an H100 (sm_90)
on any machine, no GPU needed.

Compiles each kernel with the launch settings of a KernelConfig (the defaults, or overrides; N = 64, bf16 inputs, no
cu_seqlens) and prints the resource use that `cuobjdump -res-usage` reads from the cubin (registers per thread,
stack: bytes per thread spilled to local memory), the shared memory a launch asks for (Triton's figure: the
launch fails above the GPU's 232,448 bytes), and counts in its machine code (`cuobjdump -sass`; static counts,
each loop body once): all instructions (predicated ones included), tensor-core ones (HMMA, and Hopper's HGMMA),
barriers (BAR), and spill stores and loads (STL, LDL). A quick check of a kernel change or of a setting before
spending GPU time on it; the kernels do the same work per chunk step however many steps run, so fewer spills, then
fewer instructions and barriers in a loop body are a fair first sign of a faster kernel, not a timing (on an H200
the spills weighed most: docs/benchmarks.md). The machine code depends on the Triton version: to see what a GPU
with another Triton runs, put that version first on the path.

    python scripts/kernel_registers.py                                        # the defaults
    python scripts/kernel_registers.py '{"chunk": 32, "keep_mats": false}'    # KernelConfig overrides (JSON)
    pip install --no-deps --target /tmp/t36 triton==3.6.0 && PYTHONPATH=/tmp/t36 python scripts/kernel_registers.py
    python scripts/kernel_registers.py --cubins DIR        # also write the Gluon kernels' machine code to DIR

--cubins writes the two Gluon kernels as compiled here (DIR/<kernel>.cubin) and what launching them takes
(DIR/launch.json), for scripts/check_gluon_cubins.py to run on a GPU whose own Triton is another version.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict

os.environ.pop("TRITON_INTERPRET", None)   # compile for real

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from rwkv7_kernels import KernelConfig  # noqa: E402
from rwkv7_kernels.wkv7 import gluon_bwd, gluon_fwd, launch, triton_bwd, triton_fwd  # noqa: E402

N = 64
FP32_ARGS = {"w", "dw", "s0", "states", "mats", "ht", "dstates", "ds0", "dht"}
INT_ARGS = {"T", "H", "n_docs"}
INDEX_ARGS = {"cu_seqlens", "chunk_offsets", "chunk_docs"}


class _Cuda:
    type = "cuda"


def signature(fn, constants):
    def kind(name):
        if name in constants:
            return "constexpr"
        if name in INT_ARGS:
            return "i32"
        if name in INDEX_ARGS:
            return "*i64"
        return "*fp32" if name in FP32_ARGS else "*bf16"
    return {name: kind(name) for name in fn.arg_names}


def aligned(fn, sig):
    """What Triton's launcher tells the compiler at the benchmark's shape: every tensor's address and T, H (4096,
    64) are multiples of 16 (it lets loads and stores of contiguous elements go in 16-byte vectors)."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items()
            if kind.startswith("*") or name in ("T", "H")}


def report(fn, kernel, flags, config):
    """Compiles one kernel ("gluon": a Gluon one, 4 warps) under config, prints its line of the table and returns
    the compiled kernel with its argument signature."""
    if kernel == "gluon":
        bv, opts, warps, stages, source = N, {}, 4, 1, GluonASTSource
    else:
        bv, opts = launch.settings(N, kernel, _Cuda(), torch.bfloat16, config)
        warps, stages, source = opts.pop("num_warps"), opts.pop("num_stages"), ASTSource
    constants = dict(N=N, L=config.chunk, IS_VARLEN=False, **opts, **flags)
    if "BV" in fn.arg_names:
        constants["BV"] = bv
    sig = signature(fn, constants)
    src = source(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
                 attrs=aligned(fn, sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)", sass)
    count = {name: sum(op.split(".")[0] in prefixes for op in ops)
             for name, prefixes in dict(tc=("HMMA", "HGMMA"), bar=("BAR",), stl=("STL",), ldl=("LDL",)).items()}
    print(f"{fn.__name__:26s} {warps:5d} {m.group(1):>9s} {m.group(2):>11s} {compiled.metadata.shared:>13d} "
          f"{len(ops):>12d} {count['tc']:>11d} {count['bar']:>8d} {count['stl']:>9d}/{count['ldl']}")
    return compiled, sig


def launch_info(fn, compiled, sig, flags):
    """What a driver launch of the compiled kernel takes: its arguments in order (the constexpr ones are compiled
    in), how many pointer parameters Triton appends (scratch buffers, which must be unused: size 0), the shared
    memory, the warps and the flags it was compiled with."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", compiled.asm["ptx"], re.S)
    args = [name for name in fn.arg_names if sig[name] != "constexpr"]
    extra = entry.group(1).count(".param") - len(args)
    scratch = compiled.metadata.global_scratch_size + compiled.metadata.profile_scratch_size
    if extra < 0 or scratch:
        sys.exit(f"{fn.__name__}: {extra} appended parameters, {scratch} scratch bytes: not launchable as compiled")
    return dict(kernel=compiled.metadata.name, cubin=f"{fn.__name__}.cubin", args=args,
                extra_pointer_params=extra, shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                flags=flags, triton=triton.__version__, target="sm_90")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="?", default="{}", help="KernelConfig overrides (JSON)")
    parser.add_argument("--cubins", metavar="DIR", help="write the Gluon kernels' cubins and launch.json to DIR")
    options = parser.parse_args()
    config = KernelConfig(**json.loads(options.overrides))
    print(f"sm_90, N={N}, Triton {triton.__version__}, KernelConfig {json.dumps(asdict(config))}")
    print(f"{'kernel':26s} {'warps':>5s} {'registers':>9s} {'stack bytes':>11s} {'shared bytes':>13s} "
          f"{'instructions':>12s} {'tensor core':>11s} {'barriers':>8s} {'spill st/ld':>13s}")
    kept = config.keep_mats
    launches = {}
    for fn, flags in ((gluon_fwd.wkv7_fwd_gluon_kernel, dict(HAS_S0=False, STORE_STATES=True, STORE_MATS=kept)),
                      (gluon_bwd.wkv7_bwd_gluon_kernel, dict(HAS_DHT=False, STORE_DS0=False))):
        compiled, sig = report(fn, "gluon", flags, config)
        if options.cubins:
            os.makedirs(options.cubins, exist_ok=True)
            with open(os.path.join(options.cubins, f"{fn.__name__}.cubin"), "wb") as f:
                f.write(compiled.asm["cubin"])
            launches[fn.__name__] = launch_info(fn, compiled, sig, flags)
    report(triton_fwd._wkv7_fwd_kernel, "fwd", dict(HAS_S0=False, STORE_STATES=True, STORE_MATS=kept), config)
    report(triton_bwd._wkv7_bwd_fused_kernel, "bwd", dict(HAS_DHT=False, STORE_DS0=False, KEPT=kept), config)
    report(triton_bwd._wkv7_bwd_state_kernel, "dstate", dict(HAS_DHT=False, STORE_DS0=False, KEPT=kept), config)
    report(triton_bwd._wkv7_bwd_chunk_kernel, "grad", dict(KEPT=kept), config)
    if options.cubins:
        with open(os.path.join(options.cubins, "launch.json"), "w") as f:
            json.dump(launches, f, indent=1)
        print(f"wrote the Gluon kernels' cubins and launch.json to {options.cubins}")


if __name__ == "__main__":
    main()
