"""The Triton backward, fused (one pass) or split (two), from the forward's chunk states and kept matrices.

Per chunk, given S_0 (the forward's states), dY and dS = dLoss/dS_L at the chunk's exit, the formulas of
triton_chunk.py differentiated by hand:

    dS' = dS diag(e^{c_L});  dU = M_rb^T dY + B^ dS'^T;  dX = (I - M_ab)^{-T} dU
    dV = M_rk^T dY + K^ dS'^T + M_ak^T dX;  dS_0 = dS' + dY^T R~ + dX^T A~
    dM_rb = incl(dY U^T), dM_rk = incl(dY V^T), dM_ak = strict(dX V^T), dM_ab = strict(dX U^T)
    dR~ = dY S_0 + dM_rb B^ + dM_rk K^;   dA~ = dX S_0 + dM_ab B^ + dM_ak K^
    dB^ = dM_rb^T R~ + dM_ab^T A~ + U dS';  dK^ = dM_rk^T R~ + dM_ak^T A~ + V dS'
    dw_t = sum_{s>=t} (dr r + da a - db b - dk k)_s - (da a)_t + sum_i (S_L dS)_i

(the last term from c_L; dr r = dR~ R~, da a = dA~ A~, db b = dB^ B^, dk k = dK^ K^, so the raw tiles are not
needed past the scaling). Fused: one program per (sequence, head) walks the chunks in reverse carrying dS, and
steps g_L = sum_i (S_L dS)_i back without reading S_L,

    g_L' = sum_i (S_0 dS_0)_i = g_L + sum_t (R~ (dY S_0) + A~ (dX S_0) - B^ (U dS') - K^ (V dS'))_t,

recomputing it every g_resync chunks in float32 (the products' tf32 rounding would add up). Split: a sequential
pass carries only dS (rows of dS are independent, like those of S) and stores it at every chunk's exit, then one
program per chunk differentiates it from S_0, S_L and dS: B*H*T/L programs where the fused pass has B*H.
"""
import torch
import triton
import triton.language as tl

from .launch import settings
from .triton_chunk import _chunk_prep, _chunk_u, _load_keys, _mats_at, _mm, _seq_bounds, _sequence_of_program, \
    _step_sums


@triton.jit
def _mats_t(mats, slot, a_inv, m_ak, m_rb, m_rk, L: tl.constexpr, KEPT: tl.constexpr):
    """The transposes of a chunk's four matrices. Kept ones are read transposed (lines just read, so from cache),
    which costs the backward fewer instructions and registers than transposing them in registers."""
    if KEPT:
        p = _mats_at(mats, slot, L, True)
        return tl.load(p), tl.load(p + L * L), tl.load(p + 2 * L * L), tl.load(p + 3 * L * L)
    return tl.trans(a_inv), tl.trans(m_ak), tl.trans(m_rb), tl.trans(m_rk)


@triton.jit
def _chunk_dx(ds_l, dy_, bh, m_rb_t, a_inv_t, PREC: tl.constexpr, PREC_S: tl.constexpr):
    """dX = (I - M_ab)^{-T} (M_rb^T dY + B^ dS'^T), given dS' = dS diag(e^{c_L}) (ds_l), B^ (bh) and the
    transposes of (I - M_ab)^{-1} and M_rb (see _mats_t)."""
    return _mm(a_inv_t, _mm(bh, tl.trans(ds_l), PREC_S, _mm(m_rb_t, dy_, PREC)), PREC)


@triton.jit
def _prefetch(p):
    """Asks the L2 cache for the lines at pointers p without waiting for them (PTX prefetch.global.L2)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [p], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_rows(x, row, N: tl.constexpr):
    """Prefetches the [len(row), N] tile of x whose rows start at offsets `row`: one address per 128-byte line."""
    BITS: tl.constexpr = x.dtype.element_ty.primitive_bitwidth
    LINES: tl.constexpr = (N * BITS + 1023) // 1024
    _prefetch(x + row[:, None] + (tl.arange(0, LINES) * (1024 // BITS))[None, :])


@triton.jit
def _prefetch_block(x, start, FLOATS: tl.constexpr):
    """Prefetches FLOATS contiguous float32 values of x from offset `start`."""
    _prefetch(x + start + tl.arange(0, FLOATS // 32) * 32)


@triton.jit
def _chunk_of_program(chunk_docs, chunk_offsets, cu_seqlens, n_docs, T, H, N: tl.constexpr, L: tl.constexpr,
                      IS_VARLEN: tl.constexpr):
    """Where a chunk-parallel program works: grid (chunks, H) with cu_seqlens, else (chunks, B*H). Returns the
    sequence (n_docs for the surplus programs of the cu_seqlens grid, an upper bound: they must exit), the head,
    the chunk's first state slot, the [L, N] offsets of its tokens' rows and the mask of its real steps."""
    i_c = tl.program_id(0)
    if IS_VARLEN:
        i_h = tl.program_id(1)
        i_n = tl.load(chunk_docs + i_c).to(tl.int32)
        i_safe = tl.minimum(i_n, n_docs - 1)          # keeps the surplus programs' reads in bounds
        ic = i_c - tl.load(chunk_offsets + i_safe).to(tl.int32)
    else:
        i_n = tl.program_id(1) // H
        i_h = tl.program_id(1) % H
        i_safe = i_n
        ic = i_c
    bos, seq_len, n_chunks, slot0 = _seq_bounds(cu_seqlens, chunk_offsets, i_safe, T, L, IS_VARLEN)
    o_t = tl.arange(0, L)
    tok = bos + ic * L + o_t
    p_k = ((tok * H + i_h) * N)[:, None] + tl.arange(0, N)[None, :]
    return i_n, (slot0 + ic) * H + i_h, p_k, (ic * L + o_t) < seq_len


@triton.jit
def _wkv7_bwd_state_kernel(r, w, k, a, b, dy, mats, dht, dstates, ds0, cu_seqlens, chunk_offsets, T, H,
                           N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                           HAS_DHT: tl.constexpr, STORE_DS0: tl.constexpr, KEPT: tl.constexpr,
                           IS_VARLEN: tl.constexpr,
                           PREC: tl.constexpr, PREC_S: tl.constexpr, PREC_INV: tl.constexpr, PREC_RK: tl.constexpr):
    """The split backward's sequential part: walks the chunks in reverse carrying only dS = dLoss/dS (rows of dS, like
    rows of S, are independent: one program per block of BV value rows) and stores dS at every chunk's exit, for
    _wkv7_bwd_chunk_kernel."""
    i_n, i_h, bos, seq_len, n_chunks, slot0 = _sequence_of_program(cu_seqlens, chunk_offsets, T, H, L, IS_VARLEN)
    i_v = tl.program_id(1)

    o_t = tl.arange(0, L)
    o_k = tl.arange(0, N)
    o_v = i_v * BV + tl.arange(0, BV)
    p_state = o_v[:, None] * N + o_k[None, :]
    if HAS_DHT:
        dS = tl.load(dht + (i_n.to(tl.int64) * H + i_h) * N * N + p_state).to(tl.float32)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)

    for i in range(0, n_chunks):
        ic = n_chunks - 1 - i
        tl.store(dstates + ((slot0 + ic + 1) * H + i_h) * N * N + p_state, dS)
        tok = bos + ic * L + o_t
        m_t = (ic * L + o_t) < seq_len
        row = (tok * H + i_h) * N
        r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, row[:, None] + o_k[None, :], m_t)
        dy_ = tl.load(dy + row[:, None] + o_v[None, :], mask=m_t[:, None], other=0.0)
        c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
            r_, w_, k_, a_, b_, mats, (slot0 + ic) * H + i_h, L, PREC, PREC_INV, PREC_RK,
            KEPT, False)                                                       # the unused ones are compiled away
        a_inv_t, m_ak_t, m_rb_t, m_rk_t = _mats_t(mats, (slot0 + ic) * H + i_h, a_inv, m_ak, m_rb, m_rk, L, KEPT)
        dS = dS * tl.math.exp2(c_last)[None, :]                                          # dS'
        dx = _chunk_dx(dS, dy_, bh, m_rb_t, a_inv_t, PREC, PREC_S)
        dS += _mm(tl.trans(dy_), rt, PREC_S) + _mm(tl.trans(dx), at, PREC_S)

    if STORE_DS0:
        tl.store(ds0 + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, dS)


@triton.jit
def _scaled_grad(d, keep, u, v_, S0, bh, kh, PREC: tl.constexpr, PREC_S: tl.constexpr):
    """d S_0 + dM_b B^ + dM_k K^ with dM_b = keep(d U^T), dM_k = keep(d V^T): dR~ from dY (keep: incl) and dA~ from
    dX (strict). Returns it, dM_b, dM_k and d S_0."""
    dm_b = tl.where(keep, _mm(d, tl.trans(u), PREC), 0.0)
    dm_k = tl.where(keep, _mm(d, tl.trans(v_), PREC), 0.0)
    d_s = _mm(d, S0, PREC_S)
    return d_s + _mm(dm_b, bh, PREC) + _mm(dm_k, kh, PREC), dm_b, dm_k, d_s


@triton.jit
def _chunk_grads(r_, w_, k_, v_, a_, b_, dy_, S0, S0_t, dS, g_end, mats, slot, p_k, m_t, dr, dw, dk, dv, da, db,
                 L: tl.constexpr, KEPT: tl.constexpr, PREC: tl.constexpr, PREC_S: tl.constexpr,
                 PREC_INV: tl.constexpr, PREC_RK: tl.constexpr):
    """Stores every input gradient of one chunk, given its entering state S0 (and S0_t, its transpose), dS at its
    exit and g_end = d/dc_L (sum_i S_L dS), and returns dS and g_end at its entry (the previous chunk's exit; see the
    module docstring)."""
    o_t = tl.arange(0, L)
    strict = o_t[:, None] > o_t[None, :]
    incl = o_t[:, None] >= o_t[None, :]
    m_2d = m_t[:, None]
    # Ordered so that each gradient is stored as soon as it is complete: fewer values live at once (registers).
    # The raw tiles r, k, a, b are not used past _chunk_prep (their gradients' parts of dw come from the scaled
    # tiles: dr r = (dr e^{-c}) r~, and so on), so they need no registers for the rest of the chunk.
    c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
        r_, w_, k_, a_, b_, mats, slot, L, PREC, PREC_INV, PREC_RK, KEPT, False)
    dS = dS * tl.math.exp2(c_last)[None, :]                                              # dS'
    a_inv_t, m_ak_t, m_rb_t, m_rk_t = _mats_t(mats, slot, a_inv, m_ak, m_rb, m_rk, L, KEPT)
    u = _chunk_u(S0_t, v_, at, m_ak, a_inv, PREC, PREC_S)                                 # [L, N]
    dx = _chunk_dx(dS, dy_, bh, m_rb_t, a_inv_t, PREC, PREC_S)
    dv_ = _mm(m_rk_t, dy_, PREC) + _mm(kh, tl.trans(dS), PREC_S) + _mm(m_ak_t, dx, PREC)
    tl.store(dv + p_k, dv_.to(dv.dtype.element_ty), mask=m_2d)
    x, dm_rb, dm_rk, dy_s = _scaled_grad(dy_, incl, u, v_, S0, bh, kh, PREC, PREC_S)            # dR~
    tl.store(dr + p_k, (x * e_c).to(dr.dtype.element_ty), mask=m_2d)
    g = x * rt                                                                            # dr r
    g_s = rt * dy_s                                         # the terms of g_end's step back (module docstring)
    x, dm_ab, dm_ak, dx_s = _scaled_grad(dx, strict, u, v_, S0, bh, kh, PREC, PREC_S)            # dA~
    tl.store(da + p_k, (x * e_cp).to(da.dtype.element_ty), mask=m_2d)
    da_a = x * at                                                                         # da a
    g += da_a
    g_s += at * dx_s
    u_ds = _mm(u, dS, PREC_S)
    x = _mm(tl.trans(dm_rb), rt, PREC) + _mm(tl.trans(dm_ab), at, PREC) + u_ds            # dB^
    tl.store(db + p_k, (x * e_nc).to(db.dtype.element_ty), mask=m_2d)
    g -= x * bh                                                                           # db b
    g_s -= bh * u_ds
    v_ds = _mm(v_, dS, PREC_S)
    x = _mm(tl.trans(dm_rk), rt, PREC) + _mm(tl.trans(dm_ak), at, PREC) + v_ds            # dK^
    tl.store(dk + p_k, (x * e_nc).to(dk.dtype.element_ty), mask=m_2d)
    g -= x * kh                                                                           # dk k
    g_s -= kh * v_ds
    dw_ = _step_sums(g, L, True) - da_a + g_end[None, :]
    tl.store(dw + p_k, dw_.to(dw.dtype.element_ty), mask=m_2d)
    d_s0 = dS + _mm(tl.trans(dy_), rt, PREC_S) + _mm(tl.trans(dx), at, PREC_S)
    return d_s0, g_end + tl.sum(g_s, axis=0)


@triton.jit
def _wkv7_bwd_chunk_kernel(r, w, k, v, a, b, dy, states, mats, dstates, dr, dw, dk, dv, da, db,
                           cu_seqlens, chunk_offsets, chunk_docs, n_docs, T, H,
                           N: tl.constexpr, L: tl.constexpr, KEPT: tl.constexpr, IS_VARLEN: tl.constexpr,
                           PREC: tl.constexpr, PREC_S: tl.constexpr, PREC_INV: tl.constexpr, PREC_RK: tl.constexpr):
    """The split backward's parallel part: one program per (chunk, sequence, head). With the chunk's entering and
    exiting states (forward) and dS at its exit (_wkv7_bwd_state_kernel), the chunk's gradients follow locally."""
    i_n, slot, p_k, m_t = _chunk_of_program(chunk_docs, chunk_offsets, cu_seqlens, n_docs, T, H, N, L, IS_VARLEN)
    if i_n >= n_docs:
        return
    o_k = tl.arange(0, N)
    p_state = o_k[:, None] * N + o_k[None, :]
    p_state_t = o_k[None, :] * N + o_k[:, None]          # the transposed state: read again, not transposed here
    r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, p_k, m_t)
    v_ = tl.load(v + p_k, mask=m_t[:, None], other=0.0)
    dy_ = tl.load(dy + p_k, mask=m_t[:, None], other=0.0)
    dS = tl.load(dstates + (slot + H) * N * N + p_state)
    g_end = tl.sum(tl.load(states + (slot + H) * N * N + p_state) * dS, axis=0)         # d/dc_L
    S0, S0_t = tl.load(states + slot * N * N + p_state), tl.load(states + slot * N * N + p_state_t)
    _chunk_grads(r_, w_, k_, v_, a_, b_, dy_, S0, S0_t, dS, g_end, mats, slot, p_k, m_t, dr, dw, dk, dv, da, db,
                 L, KEPT, PREC, PREC_S, PREC_INV, PREC_RK)       # the entering dS, g_end it returns: unused


@triton.jit
def _wkv7_bwd_fused_kernel(r, w, k, v, a, b, dy, states, mats, dht, ds0, dr, dw, dk, dv, da, db, cu_seqlens,
                           chunk_offsets, T, H, N: tl.constexpr, L: tl.constexpr,
                           HAS_DHT: tl.constexpr, STORE_DS0: tl.constexpr, KEPT: tl.constexpr, IS_VARLEN: tl.constexpr,
                           PREC: tl.constexpr, PREC_S: tl.constexpr, PREC_INV: tl.constexpr, PREC_RK: tl.constexpr,
                           PREFETCH: tl.constexpr, RESYNC: tl.constexpr):
    """The fused backward, in one pass: one program per (sequence, head) walks the chunks in reverse carrying
    dS = dLoss/dS at the current chunk's exit and g_end = sum_i S_L dS there (stepped back from the chunk's own
    products, and every RESYNC chunks computed afresh: see the module docstring), and stores every input gradient
    of each chunk."""
    i_n, i_h, bos, seq_len, n_chunks, slot0 = _sequence_of_program(cu_seqlens, chunk_offsets, T, H, L, IS_VARLEN)
    o_t = tl.arange(0, L)
    o_k = tl.arange(0, N)
    p_state = o_k[:, None] * N + o_k[None, :]
    p_state_t = o_k[None, :] * N + o_k[:, None]          # the transposed state: read again, not transposed here
    if HAS_DHT:
        dS = tl.load(dht + (i_n.to(tl.int64) * H + i_h) * N * N + p_state).to(tl.float32)
        g_end = tl.sum(tl.load(states + ((slot0 + n_chunks) * H + i_h) * N * N + p_state) * dS, axis=0)
    else:
        dS = tl.zeros([N, N], dtype=tl.float32)
        g_end = tl.zeros([N], dtype=tl.float32)

    for i0 in range(0, n_chunks, RESYNC):          # groups of RESYNC chunks, g_end afresh after each (a branch
        for i in range(i0, tl.minimum(i0 + RESYNC, n_chunks)):      # in one loop instead: more spills)
            ic = n_chunks - 1 - i
            tok = bos + ic * L + o_t
            m_t = (ic * L + o_t) < seq_len
            p_k = ((tok * H + i_h) * N)[:, None] + o_k[None, :]
            r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, p_k, m_t)
            v_ = tl.load(v + p_k, mask=m_t[:, None], other=0.0)
            dy_ = tl.load(dy + p_k, mask=m_t[:, None], other=0.0)
            slot = (slot0 + ic) * H + i_h
            S0, S0_t = tl.load(states + slot * N * N + p_state), tl.load(states + slot * N * N + p_state_t)
            if PREFETCH:                                  # the chunk PREFETCH chunks ahead, into the L2 cache
                i_p = tl.maximum(ic - PREFETCH, 0)
                row = ((bos + tl.minimum(i_p * L + o_t, seq_len - 1)) * H + i_h) * N     # in bounds: a real step
                _prefetch_rows(r, row, N)
                _prefetch_rows(w, row, N)
                _prefetch_rows(k, row, N)
                _prefetch_rows(a, row, N)
                _prefetch_rows(b, row, N)
                _prefetch_rows(v, row, N)
                _prefetch_rows(dy, row, N)
                _prefetch_block(states, ((slot0 + i_p) * H + i_h) * N * N, N * N)
                if KEPT:
                    _prefetch_block(mats, ((slot0 + i_p) * H + i_h) * 4 * L * L, 4 * L * L)
            dS, g_end = _chunk_grads(r_, w_, k_, v_, a_, b_, dy_, S0, S0_t, dS, g_end, mats, slot, p_k, m_t,
                                     dr, dw, dk, dv, da, db, L, KEPT, PREC, PREC_S, PREC_INV, PREC_RK)
        # S_0 of the group's last chunk read again (a cache hit), transposed: one layout conversion
        g_end = tl.sum(tl.load(states + ((slot0 + n_chunks - tl.minimum(i0 + RESYNC, n_chunks)) * H + i_h) * N * N
                               + p_state_t) * tl.trans(dS), axis=1)

    if STORE_DS0:
        tl.store(ds0 + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, dS)


def wkv7_bwd_fused(r, w, k, v, a, b, dy, states, mats, dht, ds0, grads, layout, config):
    """Fills grads (dr, dw, dk, dv, da, db) and ds0 (when not None) with the fused Triton backward."""
    H, N = r.shape[2], r.shape[3]
    _, opts = settings(N, "bwd", r.device, r.dtype, config)
    _wkv7_bwd_fused_kernel[(layout.n_seq * H,)](
        r, w, k, v, a, b, dy, states, mats, dht, ds0, *grads, layout.cu_seqlens, layout.chunk_offsets, layout.T, H,
        N=N, L=layout.L, HAS_DHT=dht is not None, STORE_DS0=ds0 is not None, KEPT=mats is not None,
        IS_VARLEN=layout.is_varlen, **opts)


def wkv7_bwd_split(r, w, k, v, a, b, dy, states, mats, dht, ds0, grads, layout, config):
    """Fills grads and ds0 (when not None) with the split Triton backward: the dS pass, then the chunks' gradients."""
    H, N = r.shape[2], r.shape[3]
    common = dict(N=N, L=layout.L, KEPT=mats is not None, IS_VARLEN=layout.is_varlen)
    dstates = torch.empty_like(states)
    BV, opts = settings(N, "dstate", r.device, r.dtype, config)
    _wkv7_bwd_state_kernel[(layout.n_seq * H, N // BV)](
        r, w, k, a, b, dy, mats, dht, dstates, ds0, layout.cu_seqlens, layout.chunk_offsets, layout.T, H, BV=BV,
        HAS_DHT=dht is not None, STORE_DS0=ds0 is not None, **common, **opts)
    _, opts = settings(N, "grad", r.device, r.dtype, config)
    _wkv7_bwd_chunk_kernel[layout.chunk_grid(H)](
        r, w, k, v, a, b, dy, states, mats, dstates, *grads, layout.cu_seqlens, layout.chunk_offsets,
        layout.chunk_docs, layout.n_seq, layout.T, H, **common, **opts)
