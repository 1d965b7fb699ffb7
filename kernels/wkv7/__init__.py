"""The WKV-7 operator: `wkv7` (dispatch.py: its contract, and which implementation runs), the step-by-step
definition `wkv7_naive` and the chunked PyTorch path `wkv7_chunked_torch`, the references tests compare against.

    naive.py          the recurrence, one step at a time: the definition
    chunked_torch.py  the chunked form in PyTorch: the CPU path
    dispatch.py       wkv7 and the choice of implementation
    triton_op.py      the CUDA path as an autograd function: buffers, then the kernels dispatch.py picks
    launch.py         sequence layout and chunk-state slots; each Triton kernel's launch options and dot modes
    triton_chunk.py   the chunk algebra in Triton, shared by the forward and the backward
    triton_fwd.py     the Triton forward
    triton_bwd.py     the Triton backward, fused or split
    gluon_parts.py    Gluon layouts and bf16x3 products
    gluon_fwd.py      the Gluon forward (bf16, heads of 64)
    gluon_bwd.py      the Gluon fused backward (bf16, heads of 64)
"""
from .chunked_torch import wkv7_chunked_torch
from .dispatch import wkv7
from .naive import wkv7_naive

__all__ = ["wkv7", "wkv7_naive", "wkv7_chunked_torch"]
