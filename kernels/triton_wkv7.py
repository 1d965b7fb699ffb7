"""WKV-7 in Triton: chunked forward and backward with float32 chunk states (the CUDA path of `wkv7`).

The chunk algebra is the one in chunked_torch.py (read its docstring): within a chunk of L = 16 steps, with
c_t = sum_{s<=t} w_s (per key channel, relative to the chunk start) and the state S_0 entering the chunk,

    A~ = a e^{c_{t-1}},  R~ = r e^{c_t},  B^ = b e^{-c_t},  K^ = k e^{-c_t}                       ([L, N] each)
    M_ab = strict(A~ B^T), M_ak = strict(A~ K^T), M_rb = incl(R~ B^T), M_rk = incl(R~ K^T)       ([L, L])
    U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V)        (row t: u_t = S_{t-1} a_t)
    Y = R~ S_0^T + M_rb U + M_rk V
    S_L = (S_0 + U^T B^ + V^T K^) diag(e^{c_L})

One program owns one (sequence, head, block of BV value rows): rows of S (value index i) evolve independently,
so the state block [BV, N] stays in float32 registers while the program walks its chunks in order. The forward
writes every chunk's entering state (and the final state) in float32; the backward walks the chunks in reverse,
carrying dS = dLoss/dS_L, and differentiates the formulas above by hand:

    dS' = dS diag(e^{c_L});  dU = M_rb^T dY + B^ dS'^T;  dX = (I - M_ab)^{-T} dU
    dV = M_rk^T dY + K^ dS'^T + M_ak^T dX;  dS_0 = dS' + dY^T R~ + dX^T A~
    dM_rb = incl(dY U^T), dM_rk = incl(dY V^T), dM_ak = strict(dX V^T), dM_ab = strict(dX U^T)
    dR~ = dY S_0 + dM_rb B^ + dM_rk K^;   dA~ = dX S_0 + dM_ab B^ + dM_ak K^
    dB^ = dM_rb^T R~ + dM_ab^T A~ + U dS';  dK^ = dM_rk^T R~ + dM_ak^T A~ + V dS'
    dw_t = sum_{s>=t} (dr r + da a - db b - dk k)_s - (da a)_t + sum_i (S_L dS)_i

(the last term from c_L; the first from r~, b^, k^ depending on c_t and a~ on c_{t-1} = c_t - w_t).
With several value blocks, the key-side gradients (dr, dw, dk, da, db) are partial sums, added on the host.

Decay range: w >= -exp(-0.5) gives e^{-c} <= e^{9.7} over 16 steps, far inside float32. Any T (the last chunk
is masked: padding steps have w = 0 and zero inputs, which leave the state untouched), any H, packed documents
through cu_seqlens (one program per document; its chunks start at the document start).
"""
import os

import torch
import triton
import triton.language as tl

CHUNK = 16


@triton.jit
def _mm(x, y, P: tl.constexpr):
    return tl.dot(x, y, input_precision=P)


@triton.jit
def _chunk_prep(r_, w_, k_, a_, b_, L: tl.constexpr, PREC: tl.constexpr, INV: tl.constexpr,
                PREC_INV: tl.constexpr):
    """Decay-scaled chunk inputs, the four [L, L] interaction matrices and (I - M_ab)^{-1}."""
    o_t = tl.arange(0, L)
    strict = o_t[:, None] > o_t[None, :]
    incl = o_t[:, None] >= o_t[None, :]
    c = tl.cumsum(w_, axis=0)
    c_last = tl.sum(w_, axis=0)
    e_c = tl.exp(c)
    e_cp = tl.exp(c - w_)
    e_nc = tl.exp(-c)
    e_end = tl.exp(c_last[None, :] - c)            # e^{c_L - c_t} <= 1
    at = a_ * e_cp
    rt = r_ * e_c
    bh = b_ * e_nc
    kh = k_ * e_nc
    m_ak = tl.where(strict, _mm(at, tl.trans(kh), PREC), 0.0)
    m_rb = tl.where(incl, _mm(rt, tl.trans(bh), PREC), 0.0)
    m_rk = tl.where(incl, _mm(rt, tl.trans(kh), PREC), 0.0)
    if INV == "subst":
        # M_ab^T[s, t] = b^_s . a~_t for s < t: its columns are the rows of M_ab, which the substitution walks.
        a_inv = _inverse_subst(tl.where(o_t[:, None] < o_t[None, :], _mm(bh, tl.trans(at), PREC), 0.0), L)
    else:
        a_inv = _inverse_blocked(tl.where(strict, _mm(at, tl.trans(bh), PREC), 0.0), L, PREC_INV)
    return c_last, e_c, e_cp, e_nc, e_end, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk


@triton.jit
def _inverse_subst(mt, L: tl.constexpr):
    """(I - M)^{-1} for a strictly lower triangular M given as its transpose mt, by forward substitution.

    Row i of the inverse is e_i + sum_{s<i} M[i, s] X[s, :]; every intermediate is an entry of the inverse
    itself (no partial Neumann sums), so float32 rounding stays at the level of the result.
    """
    o = tl.arange(0, L)
    x = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.static_range(1, L):
        m_i = tl.sum(tl.where(o[None, :] == i, mt, 0.0), axis=1)        # M[i, s], indexed by s
        x_i = tl.sum(m_i[:, None] * x, axis=0)                           # sum_s M[i, s] X[s, :]
        x = tl.where(o[:, None] == i, x + x_i[None, :], x)
    return x


@triton.jit
def _inverse_blocked(m, L: tl.constexpr, P: tl.constexpr):
    """(I - M)^{-1} for a strictly lower triangular [16, 16] M: substitution inside the four 4x4 diagonal blocks
    (all four at once, one matrix product a step), then two merges X <- X + X M_off X, where M_off holds the
    blocks below the diagonal blocks of X (exact, since (X M_off)^2 = 0). Standard blocked triangular inversion:
    every intermediate is a block of the inverse itself."""
    tl.static_assert(L == 16, "the blocked inverse is written for chunks of 16")
    o = tl.arange(0, L)
    blk4 = (o[:, None] // 4) == (o[None, :] // 4)
    blk8 = (o[:, None] // 8) == (o[None, :] // 8)
    m4 = tl.where(blk4, m, 0.0)
    x = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.static_range(1, 4):
        x = x + tl.where((o % 4 == i)[:, None], _mm(m4, x, P), 0.0)
    x = x + _mm(_mm(x, tl.where(blk8 & ~blk4, m, 0.0), P), x, P)
    x = x + _mm(_mm(x, tl.where(~blk8, m, 0.0), P), x, P)
    return x


@triton.jit
def _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, L: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Token range of sequence i_n in the flattened [B*T] axis, its chunk count and its first state slot."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        slot0 = tl.load(chunk_offsets + i_n).to(tl.int64) + i_n
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        slot0 = i_n.to(tl.int64) * (tl.cdiv(T, L) + 1)
    seq_len = (eos - bos).to(tl.int32)
    return bos, seq_len, tl.cdiv(seq_len, L), slot0


@triton.jit
def _wkv7_fwd_kernel(r, w, k, v, a, b, y, s0, states, ht, cu_seqlens, chunk_offsets, T, H,
                     N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                     HAS_S0: tl.constexpr, STORE_STATES: tl.constexpr, IS_VARLEN: tl.constexpr,
                     PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr):
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, n_chunks, slot0 = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, L, IS_VARLEN)

    o_t = tl.arange(0, L)
    o_k = tl.arange(0, N)
    o_v = i_v * BV + tl.arange(0, BV)
    p_state = o_v[:, None] * N + o_k[None, :]                      # S[i, j], i value (this block), j key
    if HAS_S0:
        S = tl.load(s0 + (i_n.to(tl.int64) * H + i_h) * N * N + p_state).to(tl.float32)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)

    for ic in range(0, n_chunks):
        tok = bos + ic * L + o_t
        m_t = (ic * L + o_t) < seq_len
        row = (tok * H + i_h) * N
        p_k = row[:, None] + o_k[None, :]
        p_v = row[:, None] + o_v[None, :]
        r_ = tl.load(r + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        w_ = tl.load(w + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        k_ = tl.load(k + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        a_ = tl.load(a + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        b_ = tl.load(b + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        v_ = tl.load(v + p_v, mask=m_t[:, None], other=0.0).to(tl.float32)

        c_last, e_c, e_cp, e_nc, e_end, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
            r_, w_, k_, a_, b_, L, PREC, INV, PREC_INV)

        if STORE_STATES:
            tl.store(states + ((slot0 + ic) * H + i_h) * N * N + p_state, S)
        # PREC_S: every product that reads or writes the state; PREC: the chunk-internal ones
        rhs = _mm(at, tl.trans(S), PREC_S) + _mm(m_ak, v_, PREC)
        u = _mm(a_inv, rhs, PREC)                                                       # [L, BV]
        y_ = _mm(rt, tl.trans(S), PREC_S) + _mm(m_rb, u, PREC) + _mm(m_rk, v_, PREC)
        tl.store(y + p_v, y_.to(y.dtype.element_ty), mask=m_t[:, None])

        S = (S * tl.exp(c_last)[None, :] + _mm(tl.trans(u), b_ * e_end, PREC_S)
             + _mm(tl.trans(v_), k_ * e_end, PREC_S))

    if STORE_STATES:
        tl.store(states + ((slot0 + n_chunks) * H + i_h) * N * N + p_state, S)
    tl.store(ht + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, S)


@triton.jit
def _wkv7_bwd_kernel(r, w, k, v, a, b, dy, states, dht, dr, dw, dk, dv, da, db, ds0,
                     cu_seqlens, chunk_offsets, T, part_stride, H,
                     N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                     HAS_DHT: tl.constexpr, STORE_DS0: tl.constexpr, IS_VARLEN: tl.constexpr,
                     PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr):
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, seq_len, n_chunks, slot0 = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, L, IS_VARLEN)

    o_t = tl.arange(0, L)
    o_k = tl.arange(0, N)
    o_v = i_v * BV + tl.arange(0, BV)
    strict = o_t[:, None] > o_t[None, :]
    incl = o_t[:, None] >= o_t[None, :]
    p_state = o_v[:, None] * N + o_k[None, :]
    part = i_v.to(tl.int64) * part_stride                          # this block's slice of the partial sums
    if HAS_DHT:
        dS = tl.load(dht + (i_n.to(tl.int64) * H + i_h) * N * N + p_state).to(tl.float32)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)
    S_next = tl.load(states + ((slot0 + n_chunks) * H + i_h) * N * N + p_state)

    for i in range(0, n_chunks):
        ic = n_chunks - 1 - i
        tok = bos + ic * L + o_t
        m_t = (ic * L + o_t) < seq_len
        row = (tok * H + i_h) * N
        p_k = row[:, None] + o_k[None, :]
        p_v = row[:, None] + o_v[None, :]
        r_ = tl.load(r + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        w_ = tl.load(w + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        k_ = tl.load(k + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        a_ = tl.load(a + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        b_ = tl.load(b + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
        v_ = tl.load(v + p_v, mask=m_t[:, None], other=0.0).to(tl.float32)
        dy_ = tl.load(dy + p_v, mask=m_t[:, None], other=0.0).to(tl.float32)
        S0 = tl.load(states + ((slot0 + ic) * H + i_h) * N * N + p_state)

        c_last, e_c, e_cp, e_nc, e_end, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
            r_, w_, k_, a_, b_, L, PREC, INV, PREC_INV)
        rhs = _mm(at, tl.trans(S0), PREC_S) + _mm(m_ak, v_, PREC)
        u = _mm(a_inv, rhs, PREC)                                                       # [L, BV]

        g_end = tl.sum(S_next * dS, axis=0)                       # d/dc_L, this block's share
        dSp = dS * tl.exp(c_last)[None, :]
        b_end = b_ * e_end
        k_end = k_ * e_end
        du = _mm(tl.trans(m_rb), dy_, PREC) + _mm(b_end, tl.trans(dS), PREC_S)
        dx = _mm(tl.trans(a_inv), du, PREC)
        dv_ = _mm(tl.trans(m_rk), dy_, PREC) + _mm(k_end, tl.trans(dS), PREC_S) + _mm(tl.trans(m_ak), dx, PREC)
        dm_rb = tl.where(incl, _mm(dy_, tl.trans(u), PREC), 0.0)
        dm_rk = tl.where(incl, _mm(dy_, tl.trans(v_), PREC), 0.0)
        dm_ak = tl.where(strict, _mm(dx, tl.trans(v_), PREC), 0.0)
        dm_ab = tl.where(strict, _mm(dx, tl.trans(u), PREC), 0.0)
        d_rt = _mm(dy_, S0, PREC_S) + _mm(dm_rb, bh, PREC) + _mm(dm_rk, kh, PREC)
        d_at = _mm(dx, S0, PREC_S) + _mm(dm_ab, bh, PREC) + _mm(dm_ak, kh, PREC)
        d_bh = _mm(tl.trans(dm_rb), rt, PREC) + _mm(tl.trans(dm_ab), at, PREC)
        d_kh = _mm(tl.trans(dm_rk), rt, PREC) + _mm(tl.trans(dm_ak), at, PREC)
        dr_ = d_rt * e_c
        da_ = d_at * e_cp
        db_ = d_bh * e_nc + _mm(u, dS, PREC_S) * e_end
        dk_ = d_kh * e_nc + _mm(v_, dS, PREC_S) * e_end
        dS = dSp + _mm(tl.trans(dy_), rt, PREC_S) + _mm(tl.trans(dx), at, PREC_S)
        S_next = S0

        g = dr_ * r_ + da_ * a_ - db_ * b_ - dk_ * k_
        dw_ = tl.cumsum(g, axis=0, reverse=True) - da_ * a_ + g_end[None, :]
        m_2d = m_t[:, None]
        tl.store(dv + p_v, dv_.to(dv.dtype.element_ty), mask=m_2d)
        tl.store(dr + part + p_k, dr_.to(dr.dtype.element_ty), mask=m_2d)
        tl.store(dw + part + p_k, dw_.to(dw.dtype.element_ty), mask=m_2d)
        tl.store(dk + part + p_k, dk_.to(dk.dtype.element_ty), mask=m_2d)
        tl.store(da + part + p_k, da_.to(da.dtype.element_ty), mask=m_2d)
        tl.store(db + part + p_k, db_.to(db.dtype.element_ty), mask=m_2d)

    if STORE_DS0:
        tl.store(ds0 + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, dS)


# GPU launch settings; scripts/bench_kernel.py times alternatives by editing this dict. fwd_bv/bwd_bv: value rows
# of the state per program (the backward at bwd_bv < N writes float32 partial sums of the key-side gradients);
# prec/prec_s: fp32 dot mode of the chunk-internal products and of those that read or write the state
# ("tf32" truncates its operands to 10 mantissa bits; "tf32x3" is float32-accurate at three times the work);
# inv: (I - M_ab)^{-1} by row substitution ("subst") or 4x4 blocks and two merges ("block").
# Defaults: the fastest measured on an H100 (docs/benchmarks.md); plain tf32 anywhere cost 1.19x the bf16 floor.
CONFIG = dict(fwd_bv=64, fwd_warps=4, fwd_stages=2, bwd_bv=64, bwd_warps=8, bwd_stages=2,
              prec="tf32x3", prec_s="tf32x3", inv="block", prec_inv="tf32x3")


def _settings(N, backward, device):
    """Block size, launch options and precisions for one kernel. The interpreter (exact float32 dots, slow per
    program) runs whole states in IEEE float32."""
    c = CONFIG
    if device.type != "cuda" or _interpreting():
        return N, dict(num_warps=1, PREC="ieee", PREC_S="ieee", INV=c["inv"], PREC_INV="ieee")
    side = "bwd" if backward else "fwd"
    return min(N, c[side + "_bv"]), dict(num_warps=c[side + "_warps"], num_stages=c[side + "_stages"],
                                         PREC=c["prec"], PREC_S=c["prec_s"], INV=c["inv"], PREC_INV=c["prec_inv"])


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _Layout:
    """Sequences in the flattened [B*T] token axis: B rows of T, or the documents of cu_seqlens."""

    def __init__(self, B, T, cu_seqlens, device):
        self.is_varlen = cu_seqlens is not None
        self.T = T
        if self.is_varlen:
            self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
            self.n_seq = cu_seqlens.numel() - 1
            n_chunks = torch.div(self.cu_seqlens[1:] - self.cu_seqlens[:-1] + CHUNK - 1, CHUNK, rounding_mode="floor")
            self.chunk_offsets = torch.cumsum(n_chunks, 0) - n_chunks
            # sum_d ceil(len_d / L) <= T / L + D; one extra slot per document for its final state (no host sync)
            self.n_slots = triton.cdiv(T, CHUNK) + 2 * self.n_seq
        else:
            self.cu_seqlens = self.chunk_offsets = None
            self.n_seq = B
            self.n_slots = B * (triton.cdiv(T, CHUNK) + 1)


def wkv7_fwd(r, w, k, v, a, b, initial_state, layout, store_states=True):
    """y, final states and (with store_states, for the backward) every chunk's entering state."""
    B, T, H, N = r.shape
    y = torch.empty_like(r)
    states = (torch.empty(layout.n_slots, H, N, N, device=r.device, dtype=torch.float32) if store_states
              else None)
    ht = torch.empty(layout.n_seq, H, N, N, device=r.device, dtype=torch.float32)
    BV, opts = _settings(N, False, r.device)
    grid = (layout.n_seq * H, N // BV)
    _wkv7_fwd_kernel[grid](
        r, w, k, v, a, b, y, initial_state, states, ht, layout.cu_seqlens, layout.chunk_offsets, layout.T, H,
        N=N, L=CHUNK, BV=BV, HAS_S0=initial_state is not None, STORE_STATES=store_states,
        IS_VARLEN=layout.is_varlen, **opts)
    return y, ht, states


def wkv7_bwd(r, w, k, v, a, b, dy, states, dht, need_ds0, layout):
    B, T, H, N = r.shape
    BV, opts = _settings(N, True, r.device)
    NV = N // BV
    dv = torch.empty_like(v)
    if NV == 1:
        parts = [torch.empty_like(x) for x in (r, w, k, a, b)]
    else:
        parts = [torch.empty((NV,) + r.shape, device=r.device, dtype=torch.float32) for _ in range(5)]
    ds0 = torch.empty(layout.n_seq, H, N, N, device=r.device, dtype=torch.float32) if need_ds0 else None
    grid = (layout.n_seq * H, NV)
    _wkv7_bwd_kernel[grid](
        r, w, k, v, a, b, dy, states, dht, *parts[:3], dv, *parts[3:], ds0,
        layout.cu_seqlens, layout.chunk_offsets, layout.T, r.numel(), H,
        N=N, L=CHUNK, BV=BV, HAS_DHT=dht is not None, STORE_DS0=need_ds0,
        IS_VARLEN=layout.is_varlen, **opts)
    if NV > 1:
        parts = [p.sum(0).to(x.dtype) for p, x in zip(parts, (r, w, k, a, b))]
    dr, dw, dk, da, db = parts
    return dr, dw, dk, dv, da, db, ds0


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, cu_seqlens, training):
        B, T, H, N = r.shape
        layout = _Layout(B, T, cu_seqlens, r.device)
        y, ht, states = wkv7_fwd(r, w, k, v, a, b, initial_state, layout, store_states=training)
        ctx.save_for_backward(r, w, k, v, a, b, states)
        ctx.layout = layout
        ctx.has_s0 = initial_state is not None
        ctx.s0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.set_materialize_grads(False)
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        r, w, k, v, a, b, states = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(r)
        dr, dw, dk, dv, da, db, ds0 = wkv7_bwd(
            r, w, k, v, a, b, dy.contiguous(), states, None if dht is None else dht.contiguous(),
            ctx.has_s0 and ctx.needs_input_grad[6], ctx.layout)
        if ds0 is not None:
            ds0 = ds0.to(ctx.s0_dtype)
        return dr, dw, dk, dv, da, db, ds0, None, None


def wkv7_triton(r, w, k, v, a, b, initial_state=None, cu_seqlens=None):
    """Same contract as `rwkv7_kernels.wkv7`; returns (y in r's dtype, final state float32 [B or D, H, N, N]).

    cu_seqlens is handled natively (B must be 1): one program per document and head.
    """
    B, T, H, N = r.shape
    if N % 16 or N > 128:
        raise ValueError(f"wkv7_triton: head size must be a multiple of 16 up to 128, got {N}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"wkv7: cu_seqlens needs batch size 1, got {B}")
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    # Without autograd (inference) the forward skips writing the per-chunk states.
    training = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state))
    return _WKV7.apply(r, w, k, v, a, b, initial_state, cu_seqlens, training)
