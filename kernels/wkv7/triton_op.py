"""The CUDA path of wkv7 as an autograd function: it allocates the buffers and runs the kernels dispatch.py picks.

The forward writes, for the backward, every chunk's entering state (and the final one) in float32 and, with
keep_mats, the chunk's four [L, L] matrices; without autograd (inference) it writes neither. Runs on the CPU in
Triton's interpreter (TRITON_INTERPRET=1), where only the Triton kernels exist.
"""
import torch

from ..config import KernelConfig
from .dispatch import _check_documents, backward_kernel, forward_kernel
from .launch import Layout
from .triton_bwd import wkv7_bwd_fused, wkv7_bwd_split
from .triton_fwd import wkv7_fwd_triton

DEFAULTS = KernelConfig()


def wkv7_fwd(r, w, k, v, a, b, initial_state, layout, config, store_states=True):
    """y, final states and (with store_states, for the backward) every chunk's entering state and, with keep_mats,
    its matrices (else None)."""
    B, T, H, N = r.shape
    L = layout.L
    y = torch.empty_like(r)
    states = (torch.empty(layout.n_slots, H, N, N, device=r.device, dtype=torch.float32) if store_states
              else None)
    mats = (torch.empty(layout.n_slots, H, 4, L, L, device=r.device, dtype=torch.float32)
            if store_states and config.keep_mats else None)
    ht = torch.empty(layout.n_seq, H, N, N, device=r.device, dtype=torch.float32)
    if forward_kernel(r, k, v, a, b, config) == "gluon":
        from .gluon_fwd import wkv7_fwd_gluon   # Gluon imports only where it runs
        wkv7_fwd_gluon(r, w, k, v, a, b, initial_state, y, states, mats, ht, layout)
    else:
        wkv7_fwd_triton(r, w, k, v, a, b, initial_state, y, states, mats, ht, layout, config)
    return y, ht, states, mats


def wkv7_bwd(r, w, k, v, a, b, dy, states, mats, dht, need_ds0, layout, config):
    """Every input gradient (and dS_0 with need_ds0), reading the forward's chunk states and, when it kept them, the
    chunks' matrices."""
    B, T, H, N = r.shape
    ds0 = torch.empty(layout.n_seq, H, N, N, device=r.device, dtype=torch.float32) if need_ds0 else None
    grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
    kind = backward_kernel(layout.n_seq * H, r, k, v, a, b, dy, mats is not None, config)
    if kind == "gluon":
        from .gluon_bwd import wkv7_bwd_gluon
        wkv7_bwd_gluon(r, w, k, v, a, b, dy, states, mats, dht, ds0, grads, layout)
    else:
        run = wkv7_bwd_fused if kind == "fused" else wkv7_bwd_split
        run(r, w, k, v, a, b, dy, states, mats, dht, ds0, grads, layout, config)
    return (*grads, ds0)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, cu_seqlens, training, config):
        B, T, H, N = r.shape
        layout = Layout(B, T, cu_seqlens, r.device, config.chunk)
        y, ht, states, mats = wkv7_fwd(r, w, k, v, a, b, initial_state, layout, config, store_states=training)
        ctx.save_for_backward(r, w, k, v, a, b, states, mats)
        ctx.layout, ctx.config = layout, config
        ctx.has_s0 = initial_state is not None
        ctx.s0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.set_materialize_grads(False)
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        r, w, k, v, a, b, states, mats = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(r)
        dr, dw, dk, dv, da, db, ds0 = wkv7_bwd(
            r, w, k, v, a, b, dy.contiguous(), states, mats, None if dht is None else dht.contiguous(),
            ctx.has_s0 and ctx.needs_input_grad[6], ctx.layout, ctx.config)
        if ds0 is not None:
            ds0 = ds0.to(ctx.s0_dtype)
        return dr, dw, dk, dv, da, db, ds0, None, None, None


def wkv7_triton(r, w, k, v, a, b, initial_state=None, cu_seqlens=None, config=None):
    """Same contract as `rwkv7_kernels.wkv7`; returns (y in r's dtype, final state float32 [B or D, H, N, N]).

    cu_seqlens is handled natively (B must be 1): one program per document and head.
    """
    B, T, H, N = r.shape
    if N % 16 or N > 128:
        raise ValueError(f"wkv7_triton: head size must be a multiple of 16 up to 128, got {N}")
    _check_documents(r, cu_seqlens)
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    # Without autograd (inference) the forward skips writing the per-chunk states.
    training = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state))
    return _WKV7.apply(r, w, k, v, a, b, initial_state, cu_seqlens, training, config or DEFAULTS)
