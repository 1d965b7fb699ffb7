"""WKV-7 in Triton: chunked forward and backward with float32 chunk states (the CUDA path of `wkv7`).

The chunk algebra is the one in chunked_torch.py (read its docstring): within a chunk of L steps (CONFIG["chunk"]:
16, 32 or 64), with c_t = sum_{s<=t} w_s (per key channel, relative to the chunk start) and the state S_0 entering
the chunk,

    A~ = a e^{c_{t-1}},  R~ = r e^{c_t},  B^ = b e^{-c_t},  K^ = k e^{-c_t}                       ([L, N] each)
    M_ab = strict(A~ B^T), M_ak = strict(A~ K^T), M_rb = incl(R~ B^T), M_rk = incl(R~ K^T)       ([L, L])
    U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V)        (row t: u_t = S_{t-1} a_t)
    Y = R~ S_0^T + M_rb U + M_rk V
    S_L = (S_0 + U^T B^ + V^T K^) diag(e^{c_L})

Forward (on the GPU for bf16 inputs and N = 64, gluon_wkv7.py's kernel computes the same buffers faster: CONFIG
fwd_gluon): one program per (sequence, head, block of BV value rows): rows of S (value index i) evolve
independently, so the state block [BV, N] stays in float32 registers while the program walks its chunks in order;
it writes every chunk's entering state (and the final state) in float32. Backward, fused: one program per
(sequence, head) walks the chunks in reverse carrying dS = dLoss/dS_L at the current chunk's exit; at each chunk,
given S_0 (read from the forward's states), it differentiates the formulas above by hand, stores the chunk's
gradients and steps dS back. Or split, in two launches: a sequential pass carrying only dS (rows of dS are
independent, like those of S) stores it at every chunk's exit, then one program per chunk does the same
differentiation from S_0, S_L and dS:

    dS' = dS diag(e^{c_L});  dU = M_rb^T dY + B^ dS'^T;  dX = (I - M_ab)^{-T} dU
    dV = M_rk^T dY + K^ dS'^T + M_ak^T dX;  dS_0 = dS' + dY^T R~ + dX^T A~
    dM_rb = incl(dY U^T), dM_rk = incl(dY V^T), dM_ak = strict(dX V^T), dM_ab = strict(dX U^T)
    dR~ = dY S_0 + dM_rb B^ + dM_rk K^;   dA~ = dX S_0 + dM_ab B^ + dM_ak K^
    dB^ = dM_rb^T R~ + dM_ab^T A~ + U dS';  dK^ = dM_rk^T R~ + dM_ak^T A~ + V dS'
    dw_t = sum_{s>=t} (dr r + da a - db b - dk k)_s - (da a)_t + sum_i (S_L dS)_i

(the last term from c_L; the first from r~, b^, k^ depending on c_t and a~ on c_{t-1} = c_t - w_t; dr r = dR~ R~,
da a = dA~ A~, db b = dB^ B^, dk k = dK^ K^, so the raw tiles are not needed past the scaling). The fused pass
does less (no dS buffer as large as the states, written and read back; dX computed once) but has only B*H
programs; the split one spreads B*H*T/L over the GPU: see _fused_backward for which runs. The fused pass also
steps g_L = sum_i (S_L dS)_i back without reading S_L: with S_L and dS_0 as above, the previous chunk's is

    g_L' = sum_i (S_0 dS_0)_i = g_L + sum_t (R~ (dY S_0) + A~ (dX S_0) - B^ (U dS') - K^ (V dS'))_t

from products the gradients compute anyway, and every CONFIG g_resync chunks from the left-hand side, elementwise
in float32: the products' tf32 rounding would otherwise add up from chunk to chunk.

Decay range: w >= -exp(-0.5) gives e^{-c} <= e^{9.7} over 16 steps (e^{38.8} over 64), inside float32 (and tf32,
which has its exponent range). Any T (the last chunk
is masked: padding steps have w = 0 and zero inputs, which leave the state untouched), any H, packed documents
through cu_seqlens (sequential passes: one program per document; its chunks start at the document start).
"""
import os

import torch
import triton
import triton.language as tl

@triton.jit
def _mm(x, y, P: tl.constexpr, acc=None):
    """acc + x @ y (acc None: zero) in dot mode P: a tl.dot input_precision; "split": x as the sum of two tf32
    numbers (its top 10 mantissa bits, then the rest), two tf32 products, for a y that tf32 holds exactly (bf16
    inputs): float32-accurate at two thirds of tf32x3's work; "bf16x3": each float32 operand as the sum of two bf16
    numbers (a bf16 operand, an input tile, is exact as it is), the products of the parts but lo lo: three bf16
    products, two with a bf16 operand. Written out here rather than left to tl.dot's own bf16x3, which checks
    every product for NaN and adds acc after the products, where here it enters the tensor cores."""
    if P == "bf16x3":
        x_hi = x.to(tl.bfloat16)
        y_hi = y.to(tl.bfloat16)
        if y.dtype != tl.bfloat16:
            acc = tl.dot(x_hi, (y - y_hi.to(tl.float32)).to(tl.bfloat16), acc)
        if x.dtype != tl.bfloat16:
            acc = tl.dot((x - x_hi.to(tl.float32)).to(tl.bfloat16), y_hi, acc)
        return tl.dot(x_hi, y_hi, acc)
    x = x.to(tl.float32)
    y = y.to(tl.float32)
    if P == "split":
        x_hi = _tf32_part(x)
        return tl.dot(x - x_hi, y, tl.dot(x_hi, y, acc, input_precision="tf32"), input_precision="tf32")
    else:
        return tl.dot(x, y, acc, input_precision=P)


@triton.jit
def _tf32_part(x):
    """x's top 10 mantissa bits (a tf32 number); x minus it is exact in tf32 to 2^-22 of x."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _step_sums(x, L: tl.constexpr, TO_END: tl.constexpr):
    """Sums of an [L, W] tile over the steps from the chunk's start to each step, or (TO_END) from each step to the
    chunk's end, as products with a triangular matrix of ones (x split in two tf32 parts: float32-accurate). On the
    tensor cores, where tl.cumsum's scan is a chain of lane shuffles, and the sums come out in a product's register
    layout, the one the backward's other tiles are in, so they need no conversion through shared memory (the
    forward's c stays a tl.cumsum: its static count had more spills this way, and a version timed slower)."""
    o = tl.arange(0, L)
    if TO_END:
        ones = tl.where(o[:, None] <= o[None, :], 1.0, 0.0)
    else:
        ones = tl.where(o[:, None] >= o[None, :], 1.0, 0.0)
    x_hi = _tf32_part(x)
    return tl.dot(ones, x - x_hi, tl.dot(ones, x_hi, input_precision="tf32"), input_precision="tf32")


@triton.jit
def _mats_at(mats, slot, L: tl.constexpr, TRANS: tl.constexpr = False):
    """Where chunk-state slot `slot` (times H, plus the head) keeps its [4, L, L] matrices in `mats`: (I - M_ab)^{-1},
    M_ak, M_rb, M_rk at this pointer plus 0, 1, 2, 3 times L * L (with TRANS, their transposes' offsets)."""
    o_t = tl.arange(0, L)
    if TRANS:
        return mats + slot * 4 * L * L + o_t[None, :] * L + o_t[:, None]
    return mats + slot * 4 * L * L + o_t[:, None] * L + o_t[None, :]


@triton.jit
def _store_mats(mats, slot, a_inv, m_ak, m_rb, m_rk, L: tl.constexpr):
    """Keeps a chunk's matrices where _chunk_prep reads them (see _mats_at)."""
    p = _mats_at(mats, slot, L)
    tl.store(p, a_inv)
    tl.store(p + L * L, m_ak)
    tl.store(p + 2 * L * L, m_rb)
    tl.store(p + 3 * L * L, m_rk)


@triton.jit
def _chunk_prep(r_, w_, k_, a_, b_, mats, slot, L: tl.constexpr, PREC: tl.constexpr, INV: tl.constexpr,
                PREC_INV: tl.constexpr, PREC_RK: tl.constexpr, KEPT: tl.constexpr, SCAN: tl.constexpr):
    """Decay-scaled chunk inputs, the four [L, L] interaction matrices and (I - M_ab)^{-1}; with KEPT the
    matrices are read from `mats` at `slot`, where the forward wrote them (CONFIG keep_mats), not computed. c_last
    is log2 of the chunk's decay product (e^{c_L} = 2^{c_last}). c by tl.cumsum with SCAN, else see _step_sums."""
    o_t = tl.arange(0, L)
    strict = o_t[:, None] > o_t[None, :]
    incl = o_t[:, None] >= o_t[None, :]
    w2 = w_ * 1.4426950408889634            # c and c_last in base 2: exp2 is one instruction, exp is not
    if SCAN:
        c = tl.cumsum(w2, axis=0)
        c_last = tl.sum(w2, axis=0)
    else:
        c = _step_sums(w2, L, False)
        c_last = tl.sum(tl.where(o_t[:, None] == L - 1, c, 0.0), axis=0)      # c's last row, in c's layout
    e_c = tl.math.exp2(c)
    e_cp = tl.math.exp2(c - w2)
    e_nc = tl.math.exp2(-c)
    at = a_ * e_cp
    rt = r_ * e_c
    bh = b_ * e_nc
    kh = k_ * e_nc
    if KEPT:
        p = _mats_at(mats, slot, L)
        a_inv, m_ak, m_rb, m_rk = tl.load(p), tl.load(p + L * L), tl.load(p + 2 * L * L), tl.load(p + 3 * L * L)
    else:
        m_ak = tl.where(strict, _mm(at, tl.trans(kh), PREC), 0.0)
        m_rb = tl.where(incl, _mm(rt, tl.trans(bh), PREC), 0.0)
        m_rk = tl.where(incl, _mm(rt, tl.trans(kh), PREC_RK), 0.0)
        if INV == "subst":
            # M_ab^T[s, t] = b^_s . a~_t for s < t: its columns are the rows of M_ab, which the substitution walks.
            a_inv = _inverse_subst(tl.where(o_t[:, None] < o_t[None, :], _mm(bh, tl.trans(at), PREC), 0.0), L)
        else:
            a_inv = _inverse_blocked(tl.where(strict, _mm(at, tl.trans(bh), PREC), 0.0), L, PREC_INV)
    return c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk


@triton.jit
def _mats_t(mats, slot, a_inv, m_ak, m_rb, m_rk, L: tl.constexpr, KEPT: tl.constexpr):
    """The transposes of a chunk's four matrices. Kept ones are read transposed (lines just read, so from cache),
    which costs the backward fewer instructions and registers than transposing them in registers."""
    if KEPT:
        p = _mats_at(mats, slot, L, True)
        return tl.load(p), tl.load(p + L * L), tl.load(p + 2 * L * L), tl.load(p + 3 * L * L)
    return tl.trans(a_inv), tl.trans(m_ak), tl.trans(m_rb), tl.trans(m_rk)


@triton.jit
def _chunk_u(S_t, v_, at, m_ak, a_inv, PREC: tl.constexpr, PREC_S: tl.constexpr):
    """U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V), given S_0^T (S_t); row t is u_t = S_{t-1} a_t."""
    return _mm(a_inv, _mm(m_ak, v_, PREC, _mm(at, S_t, PREC_S)), PREC)


@triton.jit
def _chunk_y(S_t, u, v_, rt, m_rb, m_rk, PREC: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """Y = R~ S_0^T + M_rb U + M_rk V, given S_0^T (S_t)."""
    return _mm(m_rk, v_, PREC_RKV, _mm(m_rb, u, PREC, _mm(rt, S_t, PREC_RS)))


@triton.jit
def _chunk_dx(ds_l, dy_, bh, m_rb_t, a_inv_t, PREC: tl.constexpr, PREC_S: tl.constexpr):
    """dX = (I - M_ab)^{-T} (M_rb^T dY + B^ dS'^T), given dS' = dS diag(e^{c_L}) (ds_l), B^ (bh) and the
    transposes of (I - M_ab)^{-1} and M_rb (see _mats_t)."""
    return _mm(a_inv_t, _mm(bh, tl.trans(ds_l), PREC_S, _mm(m_rb_t, dy_, PREC)), PREC)


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
    """(I - M)^{-1} for a strictly lower triangular [L, L] M (L = 16, 32 or 64): substitution inside the 4x4
    diagonal blocks (all at once, one matrix product a step), then merges doubling the block size, X <- X + X E X,
    where E holds the entries of M in the same 2s-block but not the same s-block (exact: (X E)^2 = 0). Standard
    blocked triangular inversion: every intermediate is a block of the inverse itself."""
    o = tl.arange(0, L)
    blk4 = (o[:, None] // 4) == (o[None, :] // 4)
    m4 = tl.where(blk4, m, 0.0)
    x = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.static_range(1, 4):
        x = x + tl.where((o % 4 == i)[:, None], _mm(m4, x, P), 0.0)
    tl.static_assert(L == 16 or L == 32 or L == 64, "chunks of 16, 32 or 64 steps")
    for level in tl.static_range(2, 6):
        if (1 << level) < L:                                      # block sizes s = 1 << level = 4, ..., L / 2
            inside = (o[:, None] >> (level + 1)) == (o[None, :] >> (level + 1))
            same = (o[:, None] >> level) == (o[None, :] >> level)
            x = x + _mm(_mm(x, tl.where(inside & ~same, m, 0.0), P), x, P)
    return x


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
def _sequence_of_program(cu_seqlens, chunk_offsets, T, H, L: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Where a sequential program works: program_id(0) = sequence * H + head; returns the sequence, the head and
    the sequence's bounds (see _seq_bounds)."""
    i_n = tl.program_id(0) // H
    bos, seq_len, n_chunks, slot0 = _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, L, IS_VARLEN)
    return i_n, tl.program_id(0) % H, bos, seq_len, n_chunks, slot0


@triton.jit
def _tile(x, TMA: tl.constexpr, i_n, t0, i_h, col, p, m_t, L: tl.constexpr, W: tl.constexpr):
    """One chunk's [L, W] tile of a [B, T, H, N] input (steps t0.. of sequence i_n, head i_h, columns col..) in the
    input's dtype, the steps past the sequence zero: with TMA x is a tensor descriptor whose bounds do the masking
    (no cu_seqlens), else a pointer, p the tile's offsets and m_t its real steps."""
    if TMA:
        return tl.reshape(x.load([i_n, t0, i_h, col]), [L, W])
    else:
        return tl.load(x + p, mask=m_t[:, None], other=0.0)


@triton.jit
def _store_tile(x, val, TMA: tl.constexpr, i_n, t0, i_h, col, p, m_t, L: tl.constexpr, W: tl.constexpr):
    """Stores an [L, W] tile where _tile reads one (only the real steps)."""
    if TMA:
        x.store([i_n, t0, i_h, col], tl.reshape(val.to(x.dtype), [1, L, 1, W]))
    else:
        tl.store(x + p, val.to(x.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _store_state(states, S, TMA: tl.constexpr, i_slot, i_h, H, row0, p_state, BV: tl.constexpr, N: tl.constexpr):
    """Writes S, rows row0.. (p_state: their offsets) of head i_h's state in slot i_slot of a [slots, H, N, N]
    buffer (with TMA its descriptor)."""
    if TMA:
        states.store([i_slot.to(tl.int32), i_h, row0, 0], tl.reshape(S, [1, 1, BV, N]))
    else:
        tl.store(states + (i_slot * H + i_h) * N * N + p_state, S)


@triton.jit
def _load_keys(r, w, k, a, b, TMA: tl.constexpr, i_n, t0, i_h, p_k, m_t, L: tl.constexpr, N: tl.constexpr):
    """The key-side inputs of one chunk as float32 [L, N] tiles (masked steps: zeros, i.e. no decay)."""
    return (_tile(r, TMA, i_n, t0, i_h, 0, p_k, m_t, L, N).to(tl.float32),
            _tile(w, TMA, i_n, t0, i_h, 0, p_k, m_t, L, N).to(tl.float32),
            _tile(k, TMA, i_n, t0, i_h, 0, p_k, m_t, L, N).to(tl.float32),
            _tile(a, TMA, i_n, t0, i_h, 0, p_k, m_t, L, N).to(tl.float32),
            _tile(b, TMA, i_n, t0, i_h, 0, p_k, m_t, L, N).to(tl.float32))


@triton.jit
def _wkv7_fwd_kernel(r, w, k, v, a, b, y, s0, states, mats, ht, cu_seqlens, chunk_offsets, T, H,
                     N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                     HAS_S0: tl.constexpr, STORE_STATES: tl.constexpr, STORE_MATS: tl.constexpr,
                     STORE_Y: tl.constexpr,
                     IS_VARLEN: tl.constexpr, TMA: tl.constexpr,
                     PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr,
                     PREC_RK: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """Walks the chunks in order carrying S; with STORE_Y false it only writes the states (the outputs then come
    from the chunk-parallel _wkv7_fwd_out_kernel). With TMA, r, w, k, v, a, b, y and states are tensor
    descriptors (see wkv7_fwd)."""
    i_n, i_h, bos, seq_len, n_chunks, slot0 = _sequence_of_program(cu_seqlens, chunk_offsets, T, H, L, IS_VARLEN)
    i_v = tl.program_id(1)

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
        r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, TMA, i_n, ic * L, i_h, p_k, m_t, L, N)
        v_ = _tile(v, TMA, i_n, ic * L, i_h, i_v * BV, p_v, m_t, L, BV)

        slot = (slot0 + ic) * H + i_h
        c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
            r_, w_, k_, a_, b_, mats, slot, L, PREC, INV, PREC_INV, PREC_RK, False, True)

        if STORE_STATES:
            _store_state(states, S, TMA, slot0 + ic, i_h, H, i_v * BV, p_state, BV, N)
        if STORE_MATS:
            if i_v == 0:                     # the same for every block of value rows: written once
                _store_mats(mats, slot, a_inv, m_ak, m_rb, m_rk, L)
        # PREC_S: the products that read or write the state; PREC: the chunk-internal ones; PREC_RS, PREC_RK and
        # PREC_RKV: the three that carry the output's largest terms (see CONFIG)
        u = _chunk_u(tl.trans(S), v_, at, m_ak, a_inv, PREC, PREC_S)                      # [L, BV]
        if STORE_Y:
            y_ = _chunk_y(tl.trans(S), u, v_, rt, m_rb, m_rk, PREC, PREC_RS, PREC_RKV)
            _store_tile(y, y_, TMA, i_n, ic * L, i_h, i_v * BV, p_v, m_t, L, BV)

        S = _mm(tl.trans(v_), kh, PREC_S, _mm(tl.trans(u), bh, PREC_S, S)) * tl.math.exp2(c_last)[None, :]

    if STORE_STATES:
        _store_state(states, S, TMA, slot0 + n_chunks, i_h, H, i_v * BV, p_state, BV, N)
    tl.store(ht + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, S)


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
def _wkv7_fwd_out_kernel(r, w, k, v, a, b, y, states, mats, cu_seqlens, chunk_offsets, chunk_docs, n_docs, T, H,
                         N: tl.constexpr, L: tl.constexpr, KEPT: tl.constexpr, IS_VARLEN: tl.constexpr,
                         PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr,
                         PREC_RK: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """The outputs of one chunk from its entering state (written by the state pass, with its matrices when they
    are kept): one program per chunk."""
    i_n, slot, p_k, m_t = _chunk_of_program(chunk_docs, chunk_offsets, cu_seqlens, n_docs, T, H, N, L, IS_VARLEN)
    if i_n >= n_docs:
        return
    o_k = tl.arange(0, N)
    r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, False, 0, 0, 0, p_k, m_t, L, N)
    v_ = tl.load(v + p_k, mask=m_t[:, None], other=0.0).to(tl.float32)
    S_t = tl.load(states + slot * N * N + o_k[None, :] * N + o_k[:, None])              # S_0^T
    c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
        r_, w_, k_, a_, b_, mats, slot, L, PREC, INV, PREC_INV, PREC_RK, KEPT, False)
    u = _chunk_u(S_t, v_, at, m_ak, a_inv, PREC, PREC_S)
    y_ = _chunk_y(S_t, u, v_, rt, m_rb, m_rk, PREC, PREC_RS, PREC_RKV)
    tl.store(y + p_k, y_.to(y.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _wkv7_bwd_state_kernel(r, w, k, a, b, dy, mats, dht, dstates, ds0, cu_seqlens, chunk_offsets, T, H,
                           N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                           HAS_DHT: tl.constexpr, STORE_DS0: tl.constexpr, KEPT: tl.constexpr,
                           IS_VARLEN: tl.constexpr,
                           PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr,
                           PREC_RK: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """The backward's sequential part: walks the chunks in reverse carrying only dS = dLoss/dS (rows of dS, like
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
        _store_state(dstates, dS, False, slot0 + ic + 1, i_h, H, i_v * BV, p_state, BV, N)
        tok = bos + ic * L + o_t
        m_t = (ic * L + o_t) < seq_len
        row = (tok * H + i_h) * N
        r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, False, 0, 0, 0, row[:, None] + o_k[None, :], m_t, L, N)
        dy_ = tl.load(dy + row[:, None] + o_v[None, :], mask=m_t[:, None], other=0.0)
        c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
            r_, w_, k_, a_, b_, mats, (slot0 + ic) * H + i_h, L, PREC, INV, PREC_INV, PREC_RK,
            KEPT, False)                                                       # the unused ones are compiled away
        a_inv_t, m_ak_t, m_rb_t, m_rk_t = _mats_t(mats, (slot0 + ic) * H + i_h, a_inv, m_ak, m_rb, m_rk, L, KEPT)
        dS = dS * tl.math.exp2(c_last)[None, :]                                          # dS'
        dx = _chunk_dx(dS, dy_, bh, m_rb_t, a_inv_t, PREC, PREC_S)
        dS += _mm(tl.trans(dy_), rt, PREC_S) + _mm(tl.trans(dx), at, PREC_S)

    if STORE_DS0:
        tl.store(ds0 + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, dS)


@triton.jit
def _chunk_grads(r_, w_, k_, v_, a_, b_, dy_, S0, S0_t, dS, g_end, mats, slot, p_k, m_t, dr, dw, dk, dv, da, db,
                 L: tl.constexpr, KEPT: tl.constexpr, PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr,
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
        r_, w_, k_, a_, b_, mats, slot, L, PREC, INV, PREC_INV, PREC_RK, KEPT, False)
    dS = dS * tl.math.exp2(c_last)[None, :]                                              # dS'
    a_inv_t, m_ak_t, m_rb_t, m_rk_t = _mats_t(mats, slot, a_inv, m_ak, m_rb, m_rk, L, KEPT)
    u = _chunk_u(S0_t, v_, at, m_ak, a_inv, PREC, PREC_S)                                 # [L, N]
    dx = _chunk_dx(dS, dy_, bh, m_rb_t, a_inv_t, PREC, PREC_S)
    dv_ = _mm(m_rk_t, dy_, PREC) + _mm(kh, tl.trans(dS), PREC_S) + _mm(m_ak_t, dx, PREC)
    tl.store(dv + p_k, dv_.to(dv.dtype.element_ty), mask=m_2d)
    dm_rb = tl.where(incl, _mm(dy_, tl.trans(u), PREC), 0.0)
    dm_rk = tl.where(incl, _mm(dy_, tl.trans(v_), PREC), 0.0)
    dy_s = _mm(dy_, S0, PREC_S)
    x = dy_s + _mm(dm_rb, bh, PREC) + _mm(dm_rk, kh, PREC)                               # dR~
    tl.store(dr + p_k, (x * e_c).to(dr.dtype.element_ty), mask=m_2d)
    g = x * rt                                                                            # dr r
    g_s = rt * dy_s                                         # the terms of g_end's step back (module docstring)
    dm_ab = tl.where(strict, _mm(dx, tl.trans(u), PREC), 0.0)
    dm_ak = tl.where(strict, _mm(dx, tl.trans(v_), PREC), 0.0)
    dx_s = _mm(dx, S0, PREC_S)
    x = dx_s + _mm(dm_ab, bh, PREC) + _mm(dm_ak, kh, PREC)                               # dA~
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
                           PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr,
                           PREC_RK: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """The split backward's parallel part: one program per (chunk, sequence, head). With the chunk's entering and
    exiting states (forward) and dS at its exit (_wkv7_bwd_state_kernel), the chunk's gradients follow locally."""
    i_n, slot, p_k, m_t = _chunk_of_program(chunk_docs, chunk_offsets, cu_seqlens, n_docs, T, H, N, L, IS_VARLEN)
    if i_n >= n_docs:
        return
    o_k = tl.arange(0, N)
    p_state = o_k[:, None] * N + o_k[None, :]
    p_state_t = o_k[None, :] * N + o_k[:, None]          # the transposed state: read again, not transposed here
    r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, False, 0, 0, 0, p_k, m_t, L, N)
    v_ = tl.load(v + p_k, mask=m_t[:, None], other=0.0)
    dy_ = tl.load(dy + p_k, mask=m_t[:, None], other=0.0)
    dS = tl.load(dstates + (slot + H) * N * N + p_state)
    g_end = tl.sum(tl.load(states + (slot + H) * N * N + p_state) * dS, axis=0)         # d/dc_L
    S0, S0_t = tl.load(states + slot * N * N + p_state), tl.load(states + slot * N * N + p_state_t)
    _chunk_grads(r_, w_, k_, v_, a_, b_, dy_, S0, S0_t, dS, g_end, mats, slot, p_k, m_t, dr, dw, dk, dv, da, db,
                 L, KEPT, PREC, PREC_S, INV, PREC_INV, PREC_RK)       # the entering dS, g_end it returns: unused


@triton.jit
def _wkv7_bwd_fused_kernel(r, w, k, v, a, b, dy, states, mats, dht, ds0, dr, dw, dk, dv, da, db, cu_seqlens,
                           chunk_offsets, T, H, N: tl.constexpr, L: tl.constexpr,
                           HAS_DHT: tl.constexpr, STORE_DS0: tl.constexpr, KEPT: tl.constexpr, IS_VARLEN: tl.constexpr,
                           PREC: tl.constexpr, PREC_S: tl.constexpr, INV: tl.constexpr, PREC_INV: tl.constexpr,
                           PREC_RK: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr,
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

    for i0 in range(0, n_chunks, RESYNC):          # groups of RESYNC chunks, g_end afresh after each (CONFIG
        for i in range(i0, tl.minimum(i0 + RESYNC, n_chunks)):      # g_resync; a branch in one loop: more spills)
            ic = n_chunks - 1 - i
            tok = bos + ic * L + o_t
            m_t = (ic * L + o_t) < seq_len
            p_k = ((tok * H + i_h) * N)[:, None] + o_k[None, :]
            r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, False, 0, 0, 0, p_k, m_t, L, N)
            v_ = tl.load(v + p_k, mask=m_t[:, None], other=0.0)
            dy_ = tl.load(dy + p_k, mask=m_t[:, None], other=0.0)
            slot = (slot0 + ic) * H + i_h
            S0, S0_t = tl.load(states + slot * N * N + p_state), tl.load(states + slot * N * N + p_state_t)
            if PREFETCH:                                  # the chunk PREFETCH chunks ahead (see CONFIG prefetch)
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
                                     dr, dw, dk, dv, da, db, L, KEPT, PREC, PREC_S, INV, PREC_INV, PREC_RK)
        # S_0 of the group's last chunk read again (a cache hit), transposed: one layout conversion
        g_end = tl.sum(tl.load(states + ((slot0 + n_chunks - tl.minimum(i0 + RESYNC, n_chunks)) * H + i_h) * N * N
                               + p_state_t) * tl.trans(dS), axis=1)

    if STORE_DS0:
        tl.store(ds0 + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, dS)


# GPU launch settings; scripts/bench_kernel.py times alternatives by editing this dict. fwd_gluon, bwd_gluon: the
# forward and the fused backward run gluon_wkv7's kernels where they apply (see _gluon_applies; the backward also
# needs keep_mats; the fwd_*, bwd_*, fwd_split, tma and prec* settings are the Triton kernels'), which are the faster
# ones on Hopper (docs/benchmarks.md, "The forward in Gluon"). The Triton kernels: the forward
# (fwd_*; with fwd_split, when training, it only writes the states and a chunk-parallel kernel, out_*, computes
# the outputs from them) and the backward: bwd "fused" (bwd_*), "split" into the sequential dS pass (dstate_*) and
# the chunk-parallel gradient pass (grad_*), or "auto" (see _fused_backward). chunk: steps per chunk (16, 32 or
# 64); *_bv: value rows of S (or dS) per program. keep_mats: the forward writes each chunk's [L, L] matrices
# ((I - M_ab)^{-1}, M_ak, M_rb, M_rk; 4 L^2 floats, a quarter of a state at L = 16) and the later kernels (the
# backward; fwd_split's outputs) read them instead of recomputing them (faster: docs/benchmarks.md, "keep_mats and
# bf16x3"). tma: the forward reads and writes its tiles and states
# through tensor descriptors (bulk copies, no per-element addresses; without cu_seqlens only), which also lets the
# compiler fetch a chunk's tiles during the previous one: off, as it slows the forward with few programs and does
# not speed a training step (docs/benchmarks.md, "Tensor descriptors").
# *_stages: Triton's software pipelining of the chunk loop; it fetches the next chunk's tiles early, but the
# pointers it carries for them cost registers that the sequential kernels do not have, so 1 stage spills less and
# is faster, for the forward and the fused backward (docs/benchmarks.md).
# Dot modes of the float32 products ("tf32" truncates both operands to 10 mantissa bits; "tf32x3" is float32-
# accurate at three times the work; "bf16x3", as accurate here, hi and lo bf16 parts and three bf16 products, at
# half tf32x3's tensor-core work; "split" see _mm): prec, the chunk-internal products; prec_s, those that read
# or write the state in the forward (prec_ds: the backward's products with S and dS); prec_inv, inside
# (I - M_ab)^{-1}; and the three that carry the output's largest terms, the current chunk's r.k (prec_rk: M_rk,
# also in the backward), its product with v (prec_rkv) and r.S (prec_rs). An emulation of every product's tf32
# rounding (scripts/kernel_precision.py) found those three to be nearly all of plain tf32's error with decaying
# states, and the forward's state products the rest when the state barely decays; these defaults bring y within
# a few percent of the bf16 floor (docs/benchmarks.md, "Precision: which products need float32"). The gradients'
# tolerance (5e-3) leaves the backward at tf32.
# inv: (I - M_ab)^{-1} by row substitution ("subst") or 4x4 blocks and merges doubling them ("block"). prefetch:
# how many chunks ahead the fused backward asks the L2 cache for a chunk's inputs, state and matrices (0: off), so
# that its loads, the largest wait left in it, wait on L2 rather than on memory; the forward does not gain from it.
# g_resync: every how many chunks the fused backward computes g_L = sum_i (S_L dS)_i afresh in float32 rather than
# stepping it back through the chunk's tf32 products, whose rounding adds up over the chunks (module docstring).
# The measurements behind both: docs/benchmarks.md, "Fused backward: prefetch distance and g_resync".
CONFIG = dict(chunk=16, fwd_gluon=True, bwd_gluon=True, keep_mats=True, tma=False, fwd_bv=64, fwd_warps=4,
              fwd_stages=1, fwd_split=False, out_warps=4, out_stages=2, bwd="auto", bwd_warps=4, bwd_stages=1,
              dstate_bv=64, dstate_warps=4, dstate_stages=2, grad_warps=4, grad_stages=2, prec="tf32",
              prec_s="bf16x3", prec_ds="tf32", prec_inv="tf32", prec_rk="bf16x3", prec_rkv="split", prec_rs="bf16x3",
              inv="block", prefetch=1, g_resync=8)
_PRECS = ("prec", "prec_s", "prec_ds", "prec_inv", "prec_rk", "prec_rkv", "prec_rs")


def _settings(N, kernel, device, dtype):
    """Value block size and launch options of one kernel ("fwd", "out", "bwd", "dstate" or "grad") for inputs of
    `dtype`.
    The dot modes above are chosen against the bf16 floor of bf16 inputs; for float32 inputs, whose users expect
    float32 results, every mode short of float32 accuracy becomes "tf32x3". The interpreter computes every tl.dot
    in IEEE float32 whatever its mode ("split" then adds two exact parts)."""
    c = CONFIG
    bv = min(N, c.get(kernel + "_bv", N))
    precs = {key.upper(): c[key] for key in _PRECS if key != "prec_ds"}
    if kernel in ("bwd", "dstate", "grad"):
        precs["PREC_S"] = c["prec_ds"]
    extra = {}
    if kernel == "bwd":       # PTX prefetches: the interpreter has no use for them (nor a way to run them)
        extra["PREFETCH"] = c["prefetch"] if device.type == "cuda" and not _interpreting() else 0
        extra["RESYNC"] = c["g_resync"]
    if device.type != "cuda" or _interpreting():
        precs = {key: "split" if mode == "split" else "ieee" for key, mode in precs.items()}
        return bv, dict(num_warps=1, INV=c["inv"], **precs, **extra)
    if dtype == torch.float32:
        precs = {key: mode if mode in ("ieee", "tf32x3") else "tf32x3" for key, mode in precs.items()}
    return bv, dict(num_warps=c[kernel + "_warps"], num_stages=c[kernel + "_stages"], INV=c["inv"], **precs,
                    **extra)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _Layout:
    """Sequences in the flattened [B*T] token axis: B rows of T, or the documents of cu_seqlens; and their chunks.

    State slots: sequence n owns n_chunks(n) + 1 consecutive slots (each chunk's entering state, then the final
    one). With cu_seqlens every size is an upper bound computed on the device (no host sync): sum_d ceil(len_d / L)
    <= T / L + D, and the chunk-parallel grid has that many programs, the surplus ones exiting at once.
    """

    def __init__(self, B, T, cu_seqlens, device, L):
        self.is_varlen = cu_seqlens is not None
        self.T, self.L = T, L
        if self.is_varlen:
            self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
            self.n_seq = cu_seqlens.numel() - 1
            n_chunks = torch.div(self.cu_seqlens[1:] - self.cu_seqlens[:-1] + L - 1, L, rounding_mode="floor")
            chunk_ends = torch.cumsum(n_chunks, 0)
            self.chunk_offsets = chunk_ends - n_chunks
            self.n_chunk_programs = triton.cdiv(T, L) + self.n_seq
            # the document of each chunk-parallel program (n_seq past the last chunk)
            self.chunk_docs = torch.searchsorted(
                chunk_ends, torch.arange(self.n_chunk_programs, device=device), right=True)
            self.n_slots = self.n_chunk_programs + self.n_seq
        else:
            self.cu_seqlens = self.chunk_offsets = self.chunk_docs = None
            self.n_seq = B
            self.n_chunk_programs = triton.cdiv(T, L)
            self.n_slots = B * (self.n_chunk_programs + 1)

    def chunk_grid(self, H):
        """Grid of the chunk-parallel kernels (see _chunk_of_program)."""
        return (self.n_chunk_programs, H if self.is_varlen else self.n_seq * H)


def _tma(layout, device):
    """Whether the forward moves its tiles through tensor descriptors (CONFIG tma; Hopper's tensor memory
    accelerator, so on GPUs from sm_90 on, and the interpreter): only without cu_seqlens, where a chunk's rows past
    its sequence are past the end of the tensor's T axis, which a descriptor's bounds mask. (With documents packed
    in one row they are the next document's.)"""
    return (CONFIG["tma"] and not layout.is_varlen
            and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9))


def _descriptor(x, block):
    from triton.tools.tensor_descriptor import TensorDescriptor   # here: only CONFIG tma needs it
    return TensorDescriptor.from_tensor(x, block)


def _tiles(tma, L, xs, W):
    """[B, T, H, N] tensors as the forward takes them: descriptors of [1, L, 1, W] blocks with TMA."""
    return [_descriptor(x, [1, L, 1, W]) if tma else x for x in xs]


def _states(tma, states, BV):
    """A [slots, H, N, N] state buffer (or None) as the forward takes it: blocks of BV rows with TMA."""
    if tma and states is not None:
        return _descriptor(states, [1, 1, BV, states.shape[-1]])
    return states


def wkv7_fwd(r, w, k, v, a, b, initial_state, layout, store_states=True):
    """y, final states and (with store_states, for the backward) every chunk's entering state and, with CONFIG
    keep_mats, its matrices (else None)."""
    B, T, H, N = r.shape
    L = layout.L
    y = torch.empty_like(r)
    states = (torch.empty(layout.n_slots, H, N, N, device=r.device, dtype=torch.float32) if store_states
              else None)
    mats = (torch.empty(layout.n_slots, H, 4, L, L, device=r.device, dtype=torch.float32)
            if store_states and CONFIG["keep_mats"] else None)
    ht = torch.empty(layout.n_seq, H, N, N, device=r.device, dtype=torch.float32)
    split = store_states and CONFIG["fwd_split"]
    if CONFIG["fwd_gluon"] and not split and _gluon_applies(r, k, v, a, b, L=L):
        from .gluon_wkv7 import wkv7_fwd_gluon_kernel
        wkv7_fwd_gluon_kernel[(layout.n_seq * H,)](
            r, w, k, v, a, b, y, initial_state, states, mats, ht, layout.cu_seqlens, layout.chunk_offsets, layout.T,
            H, N=N, L=L, HAS_S0=initial_state is not None, STORE_STATES=store_states, STORE_MATS=mats is not None,
            IS_VARLEN=layout.is_varlen, num_warps=4)
        return y, ht, states, mats
    BV, opts = _settings(N, "fwd", r.device, r.dtype)
    tma = _tma(layout, r.device)
    tr, tw, tk, ta, tb = _tiles(tma, L, (r, w, k, a, b), N)
    tv, ty = _tiles(tma, L, (v, y), BV)
    _wkv7_fwd_kernel[(layout.n_seq * H, N // BV)](
        tr, tw, tk, tv, ta, tb, ty, initial_state, _states(tma, states, BV), mats, ht, layout.cu_seqlens,
        layout.chunk_offsets, layout.T, H, N=N, L=L, BV=BV, HAS_S0=initial_state is not None,
        STORE_STATES=store_states, STORE_MATS=mats is not None, STORE_Y=not split, IS_VARLEN=layout.is_varlen,
        TMA=tma, **opts)
    if split:
        _, opts = _settings(N, "out", r.device, r.dtype)
        _wkv7_fwd_out_kernel[layout.chunk_grid(H)](
            r, w, k, v, a, b, y, states, mats, layout.cu_seqlens, layout.chunk_offsets, layout.chunk_docs,
            layout.n_seq, layout.T, H, N=N, L=L, KEPT=mats is not None, IS_VARLEN=layout.is_varlen, **opts)
    return y, ht, states, mats


def _gluon_applies(*xs, L):
    """Whether gluon_wkv7's kernels take these inputs: bf16 (w, not among xs, any float), heads of 64, chunks of 16,
    on a GPU with mma.sync (sm_80 on), under a Triton whose Gluon they are written for (3.6 and 3.7, the tested
    ones: Gluon's API changes between releases, and another version falls back rather than fail to compile; 3.7's
    build, which no GPU machine here runs, checked bitwise against 3.6's with scripts/check_gluon_cubins.py). Else
    the Triton kernels run (CONFIG fwd_gluon, bwd_gluon)."""
    r = xs[0]
    return (r.is_cuda and not _interpreting() and L == 16 and r.shape[-1] == 64 and _GLUON_TRITON
            and all(x.dtype == torch.bfloat16 for x in xs) and torch.cuda.get_device_capability(r.device)[0] >= 8)


_GLUON_TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2]) in ((3, 6), (3, 7))


def wkv7_bwd(r, w, k, v, a, b, dy, states, mats, dht, need_ds0, layout):
    """Every input gradient (and dS_0 with need_ds0), reading the forward's chunk states and, when it kept them, the
    chunks' matrices: fused (one sequential pass) or split (a sequential dS pass, then all chunks in parallel), as
    CONFIG bwd says (see _fused_backward)."""
    B, T, H, N = r.shape
    ds0 = torch.empty(layout.n_seq, H, N, N, device=r.device, dtype=torch.float32) if need_ds0 else None
    dr, dw, dk, dv, da, db = (torch.empty_like(x) for x in (r, w, k, v, a, b))
    common = dict(N=N, L=layout.L, KEPT=mats is not None, IS_VARLEN=layout.is_varlen)
    gluon = _gluon_backward(r, k, v, a, b, dy, mats is not None, layout.L)
    if _fused_backward(layout.n_seq * H, r.device, gluon):
        if gluon:
            from .gluon_wkv7 import wkv7_bwd_gluon_kernel
            wkv7_bwd_gluon_kernel[(layout.n_seq * H,)](
                r, w, k, v, a, b, dy, states, mats, dht, ds0, dr, dw, dk, dv, da, db, layout.cu_seqlens,
                layout.chunk_offsets, layout.T, H, N=N, L=layout.L, HAS_DHT=dht is not None, STORE_DS0=need_ds0,
                IS_VARLEN=layout.is_varlen, num_warps=4)
            return dr, dw, dk, dv, da, db, ds0
        _, opts = _settings(N, "bwd", r.device, r.dtype)
        _wkv7_bwd_fused_kernel[(layout.n_seq * H,)](
            r, w, k, v, a, b, dy, states, mats, dht, ds0, dr, dw, dk, dv, da, db, layout.cu_seqlens,
            layout.chunk_offsets, layout.T, H, HAS_DHT=dht is not None, STORE_DS0=need_ds0, **common, **opts)
        return dr, dw, dk, dv, da, db, ds0
    dstates = torch.empty_like(states)
    BV, opts = _settings(N, "dstate", r.device, r.dtype)
    _wkv7_bwd_state_kernel[(layout.n_seq * H, N // BV)](
        r, w, k, a, b, dy, mats, dht, dstates, ds0, layout.cu_seqlens, layout.chunk_offsets, layout.T, H, BV=BV,
        HAS_DHT=dht is not None, STORE_DS0=need_ds0, **common, **opts)
    _, opts = _settings(N, "grad", r.device, r.dtype)
    _wkv7_bwd_chunk_kernel[layout.chunk_grid(H)](
        r, w, k, v, a, b, dy, states, mats, dstates, dr, dw, dk, dv, da, db, layout.cu_seqlens,
        layout.chunk_offsets, layout.chunk_docs, layout.n_seq, layout.T, H, **common, **opts)
    return dr, dw, dk, dv, da, db, ds0


# Shared memory a program of gluon_wkv7's backward asks for (bytes; the largest of its variants, float32 w: the CPU
# compile test holds the compiled figure to it). More than the 99 KB a block may have on sm_86 and sm_89 GPUs
# (consumer Ampere and Ada), which run the Triton backward instead; sm_80 allows 163 KB, sm_90 227 KB.
_GLUON_BWD_SHARED = 111104


def _gluon_backward(r, k, v, a, b, dy, kept, L):
    """Whether a fused backward of these inputs is gluon_wkv7's (CONFIG bwd_gluon; it reads the kept matrices and
    needs _GLUON_BWD_SHARED bytes of shared memory, against the limit Triton's launcher checks)."""
    if not (CONFIG["bwd_gluon"] and kept and _gluon_applies(r, k, v, a, b, dy, L=L)):
        return False
    from triton.compiler.compiler import max_shared_mem      # Triton 3.6 and 3.7, which _gluon_applies requires
    return max_shared_mem(r.device.index) >= _GLUON_BWD_SHARED


def _program_slots(device):
    """How many fused-backward programs the GPU runs at a time: two a multiprocessor (255 registers a thread)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _fused_backward(programs, device, gluon):
    """Whether the backward runs fused (CONFIG bwd "fused"), split ("split") or, with "auto", fused when its
    `programs` (sequences x heads) keep enough of the GPU busy: a fused pass takes as long as its waves of
    programs (_program_slots at a time). The Triton fused backward wins when every wave is at least 90% full, the
    Gluon one (`gluon`: it runs) from a fifth of a wave (docs/benchmarks.md, "Fused or split backward: the auto
    rule")."""
    mode = CONFIG["bwd"]
    if mode != "auto" or device.type != "cuda":
        return mode != "split"
    slots = _program_slots(device)
    if gluon:
        return programs >= 0.2 * slots
    waves = -(-programs // slots)
    return programs >= 0.9 * waves * slots


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state, cu_seqlens, training):
        B, T, H, N = r.shape
        layout = _Layout(B, T, cu_seqlens, r.device, CONFIG["chunk"])
        y, ht, states, mats = wkv7_fwd(r, w, k, v, a, b, initial_state, layout, store_states=training)
        ctx.save_for_backward(r, w, k, v, a, b, states, mats)
        ctx.layout = layout
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
    if CONFIG["chunk"] not in (16, 32, 64):
        raise ValueError(f"wkv7_triton: CONFIG['chunk'] must be 16, 32 or 64, not {CONFIG['chunk']}")
    r, w, k, v, a, b = (x.contiguous() for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    # Without autograd (inference) the forward skips writing the per-chunk states.
    training = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, w, k, v, a, b, initial_state))
    return _WKV7.apply(r, w, k, v, a, b, initial_state, cu_seqlens, training)
