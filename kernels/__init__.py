"""The operators of rwkv7-train (import name `rwkv7_kernels`), one folder each: wkv7/ today.

`wkv7` is the one function the model calls, with its settings in a `KernelConfig` (the `kernel` config group);
`wkv7_naive` (step-by-step definition) and `wkv7_chunked_torch` (the CPU path) are exported for tests and
benchmarks. Nothing here imports rwkv7_train. (`rwkv7_kernels.wkv7` is the function; the folder's modules import
as `from rwkv7_kernels.wkv7 import dispatch`.)
"""
from .config import KernelConfig
from .wkv7 import wkv7, wkv7_chunked_torch, wkv7_naive

__all__ = ["KernelConfig", "wkv7", "wkv7_naive", "wkv7_chunked_torch"]
