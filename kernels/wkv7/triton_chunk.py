"""The chunk algebra in Triton: device functions that the Triton forward and backward share.

Within a chunk of L steps, with c_t = sum_{s<=t} w_s (per key channel, from the chunk start) and the state S_0
entering it (chunked_torch.py derives it; docs/kernels.md explains it):

    A~ = a e^{c_{t-1}},  R~ = r e^{c_t},  B^ = b e^{-c_t},  K^ = k e^{-c_t}                       ([L, N] each)
    M_ab = strict(A~ B^T), M_ak = strict(A~ K^T), M_rb = incl(R~ B^T), M_rk = incl(R~ K^T)       ([L, L])
    U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V)        (row t: u_t = S_{t-1} a_t)
    Y = R~ S_0^T + M_rb U + M_rk V
    S_L = (S_0 + U^T B^ + V^T K^) diag(e^{c_L})

Every product goes through _mm in a dot mode of KernelConfig; tiles are float32 in registers.
"""
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
    forward keeps tl.cumsum: it spilled more this way)."""
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
def _chunk_prep(r_, w_, k_, a_, b_, mats, slot, L: tl.constexpr, PREC: tl.constexpr, PREC_INV: tl.constexpr,
                PREC_RK: tl.constexpr, KEPT: tl.constexpr, SCAN: tl.constexpr):
    """Decay-scaled chunk inputs, the four [L, L] interaction matrices and (I - M_ab)^{-1}; with KEPT the
    matrices are read from `mats` at `slot`, where the forward wrote them (KernelConfig keep_mats), not computed.
    c_last is log2 of the chunk's decay product (e^{c_L} = 2^{c_last}). c by tl.cumsum with SCAN, else see
    _step_sums."""
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
        a_inv = _inverse_blocked(tl.where(strict, _mm(at, tl.trans(bh), PREC), 0.0), L, PREC_INV)
    return c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk


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
def _chunk_u(S_t, v_, at, m_ak, a_inv, PREC: tl.constexpr, PREC_S: tl.constexpr):
    """U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V), given S_0^T (S_t); row t is u_t = S_{t-1} a_t."""
    return _mm(a_inv, _mm(m_ak, v_, PREC, _mm(at, S_t, PREC_S)), PREC)


@triton.jit
def _seq_bounds(cu_seqlens, chunk_offsets, i_n, T, L: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Token range of sequence i_n in the flattened [B*T] axis, its chunk count and its first state slot (see
    launch.Layout)."""
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
def _load_keys(r, w, k, a, b, p_k, m_t):
    """The key-side inputs of one chunk as float32 [L, N] tiles at offsets p_k (steps past the sequence, m_t
    false: zeros, i.e. no decay and no input)."""
    m = m_t[:, None]
    return (tl.load(r + p_k, mask=m, other=0.0).to(tl.float32), tl.load(w + p_k, mask=m, other=0.0).to(tl.float32),
            tl.load(k + p_k, mask=m, other=0.0).to(tl.float32), tl.load(a + p_k, mask=m, other=0.0).to(tl.float32),
            tl.load(b + p_k, mask=m, other=0.0).to(tl.float32))
