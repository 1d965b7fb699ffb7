"""The forward in Gluon for bf16 inputs and heads of 64: the same buffers as triton_fwd.py, faster.

One program per (sequence, head), 4 warps, walking the chunks in order. It writes the chunk algebra of
triton_chunk.py with the state as the left operand of every product that reads or writes it (i: value index, rows
of S; j: key index; t, s: steps of the chunk):

    X^T = S A~^T + V^T M_ak^T,   U^T = X^T (I - M_ab)^{-T}            ([N, L]: row i of U^T is u_t's entry i)
    Y^T = S R~^T + U^T M_rb^T + V^T M_rk^T,   S_L = (S + U^T B^ + V^T K^) diag(e^{c_L})

Each product takes its left operand in the register layout its right-hand neighbour leaves it in, so the state's
chain from one chunk to the next never goes through shared memory, and the state is stored from those registers.
The right operands (the decay-scaled tiles and the [L, L] matrices, which do not depend on the state) go through
shared memory once per chunk. The four [L, L] matrices come from one product, [K^; B^] [A~; R~]^T = [[M_ak^T,
M_rk^T], [M_ab^T, M_rb^T]] (masked to the steps each one keeps), one [16, 16] block per warp. The chunk's input
tiles arrive through a ring of two shared-memory slots filled by asynchronous copies (cp.async), the next chunk's
issued before this one's work, so that no chunk waits on memory and the copies hold no registers.

Gluon has no interpreter: the CPU tests run the Triton kernels, which compute the same buffers (the GPU tests
hold both to the float64 loop).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .gluon_parts import AS, AT, BS, BT, MS, MT, SH_L, SH_N, _alloc_tiles, _block, _fetch, _left, _mm2, _mm3, \
    _mm3_wide, _scale_chunk, _sequence, _split


@gluon.jit
def _inverse_t(nt_hi, nt_lo, L: gl.constexpr):
    """(I - M_ab)^{-T} = (I - Nt)^{-1} for the strictly upper triangular Nt = M_ab^T (given as bf16 parts in the
    right-operand layout BS), as a float32 [L, L] in the accumulator layout MS. The blocked inversion of
    triton_chunk._inverse_blocked, transposed: Z = I + Z Nt (Z commutes with Nt) solved column by column inside the
    4x4 diagonal blocks, then merges doubling the block size, Z <- Z + (Z E) Z, E the entries of Nt in the same
    2s-block but not the same s-block; every intermediate is a block of the inverse itself."""
    o_s = gl.arange(0, L, layout=gl.SliceLayout(1, BS))
    o_t = gl.arange(0, L, layout=gl.SliceLayout(0, BS))
    o_r = gl.arange(0, L, layout=gl.SliceLayout(1, MS))
    o_c = gl.arange(0, L, layout=gl.SliceLayout(0, MS))
    zero = gl.zeros([L, L], gl.float32, MS)
    blk4 = (o_s[:, None] // 4) == (o_t[None, :] // 4)
    n4_hi = gl.where(blk4, nt_hi, 0.0)
    n4_lo = gl.where(blk4, nt_lo, 0.0)
    z = gl.where(o_r[:, None] == o_c[None, :], 1.0, 0.0)
    for i in gl.static_range(1, 4):
        z_hi, z_lo = _left(z, AS)
        z = z + gl.where((o_c % 4 == i)[None, :], _mm3(z_hi, z_lo, n4_hi, n4_lo, zero), 0.0)
    gl.static_assert(L == 16, "the Gluon forward takes chunks of 16 steps")
    for level in gl.static_range(2, 4):                                      # block sizes 4, 8
        inside = (o_s[:, None] >> (level + 1)) == (o_t[None, :] >> (level + 1))
        same = (o_s[:, None] >> level) == (o_t[None, :] >> level)
        e = inside & ~same
        z_hi, z_lo = _left(z, AS)
        p_hi, p_lo = _left(_mm3(z_hi, z_lo, gl.where(e, nt_hi, 0.0), gl.where(e, nt_lo, 0.0), zero), AS)
        zr_hi, zr_lo = _split(z)
        z = _mm3(p_hi, p_lo, gl.convert_layout(zr_hi, BS), gl.convert_layout(zr_lo, BS), z)
    return z



@gluon.jit
def _fetch_chunk(r, w, k, v, a, b, raw, stage, t0, bos, seq_len, H, i_h, L: gl.constexpr, N: gl.constexpr):
    """Starts copying one chunk's six input tiles into slot `stage` of their rings (raw: r, w, k, v, a, b, one
    allocation each: writes to different allocations need no barrier between them), as one commit group."""
    _fetch(r, raw[0].index(stage), t0, bos, seq_len, H, i_h, L, N)
    _fetch(w, raw[1].index(stage), t0, bos, seq_len, H, i_h, L, N)
    _fetch(k, raw[2].index(stage), t0, bos, seq_len, H, i_h, L, N)
    _fetch(v, raw[3].index(stage), t0, bos, seq_len, H, i_h, L, N)
    _fetch(a, raw[4].index(stage), t0, bos, seq_len, H, i_h, L, N)
    _fetch(b, raw[5].index(stage), t0, bos, seq_len, H, i_h, L, N)
    async_copy.commit_group()



@gluon.jit
def wkv7_fwd_gluon_kernel(r, w, k, v, a, b, y, s0, states, mats, ht, cu_seqlens, chunk_offsets, T, H,
                          N: gl.constexpr, L: gl.constexpr, HAS_S0: gl.constexpr, STORE_STATES: gl.constexpr,
                          STORE_MATS: gl.constexpr, IS_VARLEN: gl.constexpr):
    """One program per (sequence, head), 4 warps, walking the chunks in order (see the module docstring); the
    arguments are those of triton_fwd._wkv7_fwd_kernel (pointers only, BV = N)."""
    gl.static_assert(N == 64, "the Gluon forward takes heads of 64")
    i_n, i_h, bos, seq_len, slot0 = _sequence(cu_seqlens, chunk_offsets, T, H, L, IS_VARLEN)
    n_chunks = gl.cdiv(seq_len, L)

    o_i = gl.arange(0, N, layout=gl.SliceLayout(1, MS))           # rows of S, U^T, Y^T: value index
    o_j = gl.arange(0, N, layout=gl.SliceLayout(0, MS))           # columns of S: key index
    o_ty = gl.arange(0, L, layout=gl.SliceLayout(0, MS))          # columns of U^T, Y^T: steps
    p_state = o_i[:, None] * N + o_j[None, :]
    if HAS_S0:
        S = gl.load(s0 + (i_n.to(gl.int64) * H + i_h) * N * N + p_state)
    else:
        S = gl.zeros([N, N], gl.float32, MS)
    o_gr = gl.arange(0, 2 * L, layout=gl.SliceLayout(1, MT))
    o_gc = gl.arange(0, 2 * L, layout=gl.SliceLayout(0, MT))
    g_s = (o_gr % L)[:, None]
    g_t = (o_gc % L)[None, :]
    # M_ak^T and M_ab^T (left column: A~) keep s < t, M_rk^T and M_rb^T (right: R~) s <= t
    g_keep = (g_s < g_t) | ((g_s == g_t) & (o_gc[None, :] >= L))
    # where the kept matrices go (triton_chunk._mats_at: (I - M_ab)^{-1}, M_ak, M_rb, M_rk): entry [s, t] of a block
    # is entry [t, s] of its matrix; M_ab^T (lower left) is not kept
    g_mat = gl.where(o_gr[:, None] < L, gl.where(o_gc[None, :] < L, 1, 3), 2)
    g_off = g_mat * L * L + g_t * L + g_s
    g_store = (o_gr[:, None] < L) | (o_gc[None, :] >= L)
    z_off = o_ty[None, :] * L + gl.arange(0, L, layout=gl.SliceLayout(1, MS))[:, None]

    # the chunk's input tiles: a ring of two slots in shared memory, the next chunk's copied in during this one
    raw = (gl.allocate_shared_memory(gl.bfloat16, [2, L, N], SH_N),
           _alloc_tiles(w.dtype.element_ty, [2, L, N]),
           gl.allocate_shared_memory(gl.bfloat16, [2, L, N], SH_N),
           gl.allocate_shared_memory(gl.bfloat16, [2, L, N], SH_N),
           gl.allocate_shared_memory(gl.bfloat16, [2, L, N], SH_N),
           gl.allocate_shared_memory(gl.bfloat16, [2, L, N], SH_N))
    kb_hi = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)      # rows: K^, then B^
    kb_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)
    ar_hi = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)      # rows: A~, then R~
    ar_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)
    g_hi = gl.allocate_shared_memory(gl.bfloat16, [2 * L, 2 * L], SH_L)
    g_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, 2 * L], SH_L)

    _fetch_chunk(r, w, k, v, a, b, raw, 0, 0, bos, seq_len, H, i_h, L, N)
    for ic in range(0, n_chunks):
        stage = ic % 2
        _fetch_chunk(r, w, k, v, a, b, raw, 1 - stage, (ic + 1) * L, bos, seq_len, H, i_h, L, N)
        async_copy.wait_group(1)                 # this chunk's group is in (the next one's may still be in flight)
        w2, c, c_last = _scale_chunk(raw[0].index(stage), raw[1].index(stage), raw[2].index(stage),
                                     raw[4].index(stage), raw[5].index(stage), kb_hi, kb_lo, ar_hi, ar_lo, 0, L, L)
        v_sm = raw[3].index(stage)

        slot = (slot0 + ic) * H + i_h
        g = _mm3_wide(kb_hi.load(AT), kb_lo.load(AT), ar_hi.permute([1, 0]).load(BT), ar_lo.permute([1, 0]).load(BT),
                      gl.zeros([2 * L, 2 * L], gl.float32, MT))
        g = gl.where(g_keep, g, 0.0)
        if STORE_MATS:
            gl.store(mats + slot * 4 * L * L + g_off, g, mask=g_store)
        g_part_hi, g_part_lo = _split(g)
        g_hi.store(g_part_hi)
        g_lo.store(g_part_lo)

        z = _inverse_t(_block(g_hi, L, 0, L, BS), _block(g_lo, L, 0, L, BS), L)
        if STORE_MATS:
            gl.store(mats + slot * 4 * L * L + z_off, z)
        z_hi, z_lo = _split(z)
        z_hi = gl.convert_layout(z_hi, BS)
        z_lo = gl.convert_layout(z_lo, BS)

        if STORE_STATES:
            gl.store(states + slot * N * N + p_state, S)
        s_hi, s_lo = _left(S, AS)
        vt = v_sm.permute([1, 0]).load(AS)                                           # V^T [N, L]
        x = _mm3_wide(s_hi, s_lo, ar_hi.slice(0, L).permute([1, 0]).load(BS),
                 ar_lo.slice(0, L).permute([1, 0]).load(BS), gl.zeros([N, L], gl.float32, MS))   # S A~^T
        x = _mm2(vt, _block(g_hi, 0, 0, L, BS), _block(g_lo, 0, 0, L, BS), x)           # + V^T M_ak^T
        x_hi, x_lo = _left(x, AS)
        u_hi, u_lo = _left(_mm3(x_hi, x_lo, z_hi, z_lo, gl.zeros([N, L], gl.float32, MS)), AS)   # U^T
        yt = _mm3_wide(s_hi, s_lo, ar_hi.slice(L, L).permute([1, 0]).load(BS),
                  ar_lo.slice(L, L).permute([1, 0]).load(BS), gl.zeros([N, L], gl.float32, MS))  # S R~^T
        yt = _mm3(u_hi, u_lo, _block(g_hi, L, L, L, BS), _block(g_lo, L, L, L, BS), yt)     # + U^T M_rb^T
        yt = _mm2(vt, _block(g_hi, 0, L, L, BS), _block(g_lo, 0, L, L, BS), yt)            # + V^T M_rk^T
        p_y = (((bos + ic * L + o_ty) * H + i_h) * N)[None, :] + o_i[:, None]
        gl.store(y + p_y, yt.to(y.dtype.element_ty), mask=((ic * L + o_ty) < seq_len)[None, :])
        S = _mm3(u_hi, u_lo, kb_hi.slice(L, L).load(BS), kb_lo.slice(L, L).load(BS), S)     # + U^T B^
        S = _mm2(vt, kb_hi.slice(0, L).load(BS), kb_lo.slice(0, L).load(BS), S)             # + V^T K^
        S = S * gl.exp2(gl.convert_layout(c_last, gl.SliceLayout(0, MS)))[None, :]

    if STORE_STATES:
        gl.store(states + ((slot0 + n_chunks) * H + i_h) * N * N + p_state, S)
    gl.store(ht + (i_n.to(gl.int64) * H + i_h) * N * N + p_state, S)



def wkv7_fwd_gluon(r, w, k, v, a, b, initial_state, y, states, mats, ht, layout):
    """Fills y, ht and (when not None) states and mats, as triton_fwd.wkv7_fwd_triton does."""
    H, N = r.shape[2], r.shape[3]
    wkv7_fwd_gluon_kernel[(layout.n_seq * H,)](
        r, w, k, v, a, b, y, initial_state, states, mats, ht, layout.cu_seqlens, layout.chunk_offsets, layout.T, H,
        N=N, L=layout.L, HAS_S0=initial_state is not None, STORE_STATES=states is not None,
        STORE_MATS=mats is not None, IS_VARLEN=layout.is_varlen, num_warps=4)
