"""The Gluon WKV-7 kernels as another Triton version compiled them, run on this GPU beside the installed Triton's.

The Gluon kernels (kernels/wkv7/gluon_*.py) are written in Gluon, an experimental Triton API, and run under every
Triton version that dispatch.GLUON_TRITONS names. A GPU machine has one Triton (the one its torch pins); to check the
machine code another version makes, compile it anywhere (no GPU needed) and launch it here through the CUDA driver:

    python scripts/kernel_registers.py --cubins cubins      # where the other Triton is installed (CPU is fine)
    python scripts/check_gluon_cubins.py cubins              # on the GPU, with this project's Triton

On the same inputs it runs the forward (training: y, final state, every chunk's state and kept matrices) and the
fused backward (from the installed Triton's forward buffers) both ways, prints the relative L2 difference of every
output (0 where bitwise equal) and each kernel's time, and exits with status 1 if any difference exceeds 1e-5.
The cubins are built for an H100 (sm_90) without cu_seqlens, initial state or final-state gradient, and assume
16-byte aligned tensors with T and H multiples of 16 (what kernel_registers.py tells the compiler).
"""
import argparse
import ctypes
import json
import os
import sys

import torch
import triton

from bench_kernel import cuda_time, make_inputs, rel
from rwkv7_kernels import KernelConfig
from rwkv7_kernels.wkv7 import dispatch
from rwkv7_kernels.wkv7.launch import Layout
from rwkv7_kernels.wkv7.triton_op import wkv7_bwd, wkv7_fwd

SHAPES = ((2, 4096, 16), (8, 4096, 64))
FLAGS = dict(wkv7_fwd_gluon_kernel=dict(HAS_S0=False, STORE_STATES=True, STORE_MATS=True),
             wkv7_bwd_gluon_kernel=dict(HAS_DHT=False, STORE_DS0=False))
GRADS = ("dr", "dw", "dk", "dv", "da", "db")
GLUON = KernelConfig(fwd_gluon=True, bwd_gluon=True, keep_mats=True, bwd="fused")   # the installed Triton's Gluon
TOLERANCE = 1e-5
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class Cubin:
    """One kernel of DIR/launch.json, loaded into the current CUDA context."""

    def __init__(self, cuda, directory, info):
        self.cuda, self.info = cuda, info
        with open(os.path.join(directory, info["cubin"]), "rb") as f:
            self.image = f.read()                   # the driver reads it during cuModuleLoadData only; kept anyway
        self.module, self.function = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(cuda.cuModuleLoadData(ctypes.byref(self.module), self.image), "cuModuleLoadData")
        self.check(cuda.cuModuleGetFunction(ctypes.byref(self.function), self.module, info["kernel"].encode()),
                   "cuModuleGetFunction")
        self.check(cuda.cuFuncSetAttribute(self.function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           ctypes.c_int(info["shared"])), "cuFuncSetAttribute")

    def check(self, result, call):
        if result != 0:
            sys.exit(f"{self.info['kernel']}: {call} returned CUDA error {result}")

    def __call__(self, programs, tensors, T, H):
        """Launches one program per (sequence, head); pointer arguments not in tensors are passed as null (the
        flags it was compiled with keep the kernel from reading them)."""
        values = []
        for name in self.info["args"]:
            if name in ("T", "H"):
                values.append(ctypes.c_int32(T if name == "T" else H))
            else:
                values.append(ctypes.c_uint64(tensors[name].data_ptr() if name in tensors else 0))
        values += [ctypes.c_uint64(0)] * self.info["extra_pointer_params"]
        params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.cuda.cuLaunchKernel(self.function, programs, 1, 1, 32 * self.info["num_warps"], 1, 1,
                                            self.info["shared"], stream, params, None), "cuLaunchKernel")


def compare(fwd, bwd, B, T, H):
    """Prints one shape's differences and times; returns the largest difference."""
    r, w, k, v, a, b = make_inputs(B, T, H, 64, seed=5)
    dy = torch.randn_like(r)
    layout = Layout(B, T, None, r.device, 16)
    y0, ht0, states0, mats0 = wkv7_fwd(r, w, k, v, a, b, None, layout, GLUON, store_states=True)
    grads0 = wkv7_bwd(r, w, k, v, a, b, dy, states0, mats0, None, False, layout, GLUON)[:6]
    y, ht, states, mats = (torch.empty_like(x) for x in (y0, ht0, states0, mats0))
    grads = [torch.empty_like(g) for g in grads0]
    fwd_args = dict(r=r, w=w, k=k, v=v, a=a, b=b, y=y, states=states, mats=mats, ht=ht)
    bwd_args = dict(r=r, w=w, k=k, v=v, a=a, b=b, dy=dy, states=states0, mats=mats0,
                    **dict(zip(GRADS, grads)))
    fwd(B * H, fwd_args, T, H)
    bwd(B * H, bwd_args, T, H)
    torch.cuda.synchronize()
    diffs = dict(y=rel(y, y0), final_state=rel(ht, ht0), states=rel(states, states0), mats=rel(mats, mats0))
    diffs.update({name: rel(g, g0) for name, g, g0 in zip(GRADS, grads, grads0)})
    print(f"B={B} T={T} H={H}: " + ", ".join(f"{name} {d:.1e}" for name, d in diffs.items()))
    ms = [cuda_time(lambda: fwd(B * H, fwd_args, T, H), 20), cuda_time(lambda: bwd(B * H, bwd_args, T, H), 20)]
    print(f"  kernel ms, forward (training) / backward: the cubins {ms[0]:.3f} / {ms[1]:.3f}; the installed "
          f"Triton's (through the op's Python entry, allocations included) "
          f"{cuda_time(lambda: wkv7_fwd(r, w, k, v, a, b, None, layout, GLUON, store_states=True), 20):.3f} / "
          f"{cuda_time(lambda: wkv7_bwd(r, w, k, v, a, b, dy, states0, mats0, None, False, layout, GLUON), 20):.3f}")
    return max(diffs.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="what scripts/kernel_registers.py --cubins wrote")
    directory = parser.parse_args().directory
    with open(os.path.join(directory, "launch.json")) as f:
        launches = json.load(f)
    for name, flags in FLAGS.items():
        if launches.get(name, {}).get("flags") != flags:
            sys.exit(f"{directory}/launch.json: {name} not compiled with {flags}: rerun kernel_registers.py --cubins")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("needs an sm_90 GPU (H100, H200): the cubins hold sm_90 machine code")
    probe = torch.ones(1, 64, device="cuda", dtype=torch.bfloat16)
    if not dispatch._gluon_applies(probe, L=16):
        sys.exit(f"the installed Triton {triton.__version__} does not run the Gluon kernels: nothing to compare with")
    cuda = ctypes.CDLL("libcuda.so.1")
    fwd = Cubin(cuda, directory, launches["wkv7_fwd_gluon_kernel"])
    bwd = Cubin(cuda, directory, launches["wkv7_bwd_gluon_kernel"])
    print(f"{torch.cuda.get_device_name()}: cubins from Triton {fwd.info['triton']} against the installed Triton "
          f"{triton.__version__}")
    worst = max(compare(fwd, bwd, *shape) for shape in SHAPES)
    print(f"largest difference {worst:.1e}: " + ("the same results" if worst <= TOLERANCE else "DIFFERENT"))
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
