"""The Triton forward: one program per (sequence, head, block of BV value rows) walking its chunks in order.

Rows of S (value index i) evolve independently, so the state block [BV, N] stays in float32 registers while the
program walks the chunks (triton_chunk.py has their algebra); it writes every chunk's entering state, the final
state and, with keep_mats, the chunk's matrices, the buffers either backward reads. gluon_fwd.py computes the same
buffers faster for bf16 inputs and heads of 64.
"""
import triton
import triton.language as tl

from .launch import settings
from .triton_chunk import _chunk_prep, _chunk_u, _load_keys, _mats_at, _mm, _sequence_of_program


@triton.jit
def _store_mats(mats, slot, a_inv, m_ak, m_rb, m_rk, L: tl.constexpr):
    """Keeps a chunk's matrices where _chunk_prep reads them (see _mats_at)."""
    p = _mats_at(mats, slot, L)
    tl.store(p, a_inv)
    tl.store(p + L * L, m_ak)
    tl.store(p + 2 * L * L, m_rb)
    tl.store(p + 3 * L * L, m_rk)


@triton.jit
def _chunk_y(S_t, u, v_, rt, m_rb, m_rk, PREC: tl.constexpr, PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """Y = R~ S_0^T + M_rb U + M_rk V, given S_0^T (S_t)."""
    return _mm(m_rk, v_, PREC_RKV, _mm(m_rb, u, PREC, _mm(rt, S_t, PREC_RS)))


@triton.jit
def _wkv7_fwd_kernel(r, w, k, v, a, b, y, s0, states, mats, ht, cu_seqlens, chunk_offsets, T, H,
                     N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                     HAS_S0: tl.constexpr, STORE_STATES: tl.constexpr, STORE_MATS: tl.constexpr,
                     IS_VARLEN: tl.constexpr,
                     PREC: tl.constexpr, PREC_S: tl.constexpr, PREC_INV: tl.constexpr, PREC_RK: tl.constexpr,
                     PREC_RS: tl.constexpr, PREC_RKV: tl.constexpr):
    """Walks the chunks in order carrying S, writing y and (STORE_STATES, for the backward) every chunk's
    entering state; ht gets the final state."""
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
        r_, w_, k_, a_, b_ = _load_keys(r, w, k, a, b, p_k, m_t)
        v_ = tl.load(v + p_v, mask=m_t[:, None], other=0.0)

        slot = (slot0 + ic) * H + i_h
        c_last, e_c, e_cp, e_nc, at, rt, bh, kh, a_inv, m_ak, m_rb, m_rk = _chunk_prep(
            r_, w_, k_, a_, b_, mats, slot, L, PREC, PREC_INV, PREC_RK, False, True)

        if STORE_STATES:
            tl.store(states + slot * N * N + p_state, S)
        if STORE_MATS:
            if i_v == 0:                     # the same for every block of value rows: written once
                _store_mats(mats, slot, a_inv, m_ak, m_rb, m_rk, L)
        # PREC_S: the products that read or write the state; PREC: the chunk-internal ones; PREC_RS, PREC_RK and
        # PREC_RKV: the three that carry the output's largest terms (KernelConfig)
        u = _chunk_u(tl.trans(S), v_, at, m_ak, a_inv, PREC, PREC_S)                      # [L, BV]
        y_ = _chunk_y(tl.trans(S), u, v_, rt, m_rb, m_rk, PREC, PREC_RS, PREC_RKV)
        tl.store(y + p_v, y_.to(y.dtype.element_ty), mask=m_t[:, None])

        S = _mm(tl.trans(v_), kh, PREC_S, _mm(tl.trans(u), bh, PREC_S, S)) * tl.math.exp2(c_last)[None, :]

    if STORE_STATES:
        tl.store(states + ((slot0 + n_chunks) * H + i_h) * N * N + p_state, S)
    tl.store(ht + (i_n.to(tl.int64) * H + i_h) * N * N + p_state, S)


def wkv7_fwd_triton(r, w, k, v, a, b, initial_state, y, states, mats, ht, layout, config):
    """Fills y, ht and (when not None) states and mats with the Triton forward."""
    H, N = r.shape[2], r.shape[3]
    BV, opts = settings(N, "fwd", r.device, r.dtype, config)
    _wkv7_fwd_kernel[(layout.n_seq * H, N // BV)](
        r, w, k, v, a, b, y, initial_state, states, mats, ht, layout.cu_seqlens, layout.chunk_offsets, layout.T, H,
        N=N, L=layout.L, BV=BV, HAS_S0=initial_state is not None, STORE_STATES=states is not None,
        STORE_MATS=mats is not None, IS_VARLEN=layout.is_varlen, **opts)
