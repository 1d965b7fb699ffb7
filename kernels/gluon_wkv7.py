"""WKV-7's forward and fused backward in Gluon (Triton's explicit-layout dialect) for bf16 inputs and N = 64.

The forward computes what triton_wkv7._wkv7_fwd_kernel computes (y, every chunk's entering state, the chunks' kept
matrices, the final state: the same buffers, which either backward reads), the backward what
triton_wkv7._wkv7_bwd_fused_kernel computes (wkv7_bwd_gluon_kernel's docstring). The forward writes the chunk
algebra of triton_wkv7's docstring with the state as the left operand of every product that reads or writes it
(i: value index, rows of S; j: key index; t, s: steps of the chunk):

    X^T = S A~^T + V^T M_ak^T,   U^T = X^T (I - M_ab)^{-T}            ([N, L]: row i of U^T is u_t's entry i)
    Y^T = S R~^T + U^T M_rb^T + V^T M_rk^T,   S_L = (S + U^T B^ + V^T K^) diag(e^{c_L})

Each of these products takes its left operand in the register layout its right-hand neighbour leaves it in (a
product's accumulator is, entry for entry, the left operand of the next one: Gluon checks that no data moves), so
the state's chain from one chunk to the next never goes through shared memory, and the state is stored from those
registers. The right operands (the decay-scaled tiles and the [L, L] matrices, which do not depend on the state)
go through shared memory once per chunk. Every product is a bf16 tensor-core product of float32 values split in
a bf16 high and low part (three products, "bf16x3"; two where one side is a bf16 input, exact as it is): float32-
accurate for the state's products, more accurate than triton_wkv7's tf32 for the chunk-internal ones.

The four [L, L] matrices come from one product, [K^; B^] [A~; R~]^T = [[M_ak^T, M_rk^T], [M_ab^T, M_rb^T]]
(masked to the steps each one keeps), one [16, 16] block per warp. The chunk's input tiles arrive through a ring
of two shared-memory slots filled by asynchronous copies (cp.async), the next chunk's issued before this one's
work, so that no chunk waits on memory and the copies hold no registers.

Gluon has no interpreter: the CPU path and the interpreter tests run triton_wkv7's Triton kernels, which compute
the same buffers and gradients (tests/test_wkv7_triton.py holds both to the float64 loop on the GPU).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

LOG2E = gl.constexpr(1.4426950408889634)

# Register layouts (4 warps). MS: products with the state's 64 rows (16 a warp), with AS, BS their left and right
# operands (k_width 2: a bf16 left operand is the accumulator's own register layout); MT: products of [2L, *]
# tiles, one 16-row, 16- or 32-column block a warp; PREP: the chunk's [L, N] input tiles, 4 steps x 2 keys a thread
# (sums over the steps within 4-thread groups); CP16, CP32: [L, N] bf16 and float32 tiles copied 16 bytes a thread.
MS = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8]))
AS = gl.constexpr(gl.DotOperandLayout(0, MS, 2))
BS = gl.constexpr(gl.DotOperandLayout(1, MS, 2))
MT = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8]))
AT = gl.constexpr(gl.DotOperandLayout(0, MT, 2))
BT = gl.constexpr(gl.DotOperandLayout(1, MT, 2))
PREP = gl.constexpr(gl.BlockedLayout([4, 2], [4, 8], [1, 4], [1, 0]))
CP16 = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))
CP32 = gl.constexpr(gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0]))
SH_N = gl.constexpr(gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))       # shared [*, N] bf16 tiles
SH_N32 = gl.constexpr(gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))     # shared [*, N] float32 tiles
SH_L = gl.constexpr(gl.SwizzledSharedLayout(8, 2, 4, [1, 0]))       # shared [*, L] and [*, 2L] bf16 tiles


@gluon.jit
def _add(x, y):
    return x + y


@gluon.jit
def _split(x):
    """float32 x as the sum of two bf16 numbers: x truncated to its top 8 mantissa bits (a mask, exact in bf16),
    then the rest (exact in float32) rounded to bf16."""
    hi = (x.to(gl.int32, bitcast=True) & -65536).to(gl.float32, bitcast=True)
    return hi.to(gl.bfloat16), (x - hi).to(gl.bfloat16)


@gluon.jit
def _left(x, layout: gl.constexpr):
    """A product's float32 accumulator as the bf16 high and low parts of the next product's left operand: the
    same registers (assert_trivial: Gluon refuses the conversion if any entry would move)."""
    hi, lo = _split(x)
    return gl.convert_layout(hi, layout, assert_trivial=True), gl.convert_layout(lo, layout, assert_trivial=True)


@gluon.jit
def _mm3(a_hi, a_lo, b_hi, b_lo, acc):
    """acc + a b for float32 a, b given as bf16 parts: the small terms first, lo lo dropped (bf16x3)."""
    return mma_v2(a_hi, b_hi, mma_v2(a_hi, b_lo, mma_v2(a_lo, b_hi, acc)))


@gluon.jit
def _mm3_wide(a_hi, a_lo, b_hi, b_lo, acc):
    """_mm3 for a long inner dimension: the three products in separate accumulators, added at the end, so that the
    tensor cores' chain of dependent steps is a third as long."""
    zero = gl.zeros_like(acc)
    return mma_v2(a_hi, b_hi, acc) + (mma_v2(a_hi, b_lo, zero) + mma_v2(a_lo, b_hi, zero))


@gluon.jit
def _mm3_pair(a_hi, a_lo, b_hi, b_lo, acc):
    """_mm3 in two chains: the large term in acc's, the two small ones in a second accumulator. The backward's
    long products take this one: fewer additions than _mm3_wide's make the backward faster, while the forward is
    slower with it (docs/benchmarks.md, "The Gluon backward's reductions")."""
    return mma_v2(a_hi, b_hi, acc) + mma_v2(a_hi, b_lo, mma_v2(a_lo, b_hi, gl.zeros_like(acc)))


@gluon.jit
def _mm2(a, b_hi, b_lo, acc):
    """acc + a b for a bf16 a (exact) and float32 b given as bf16 parts."""
    return mma_v2(a, b_hi, mma_v2(a, b_lo, acc))


@gluon.jit
def _store_parts(hi_buf, lo_buf, row0: gl.constexpr, rows: gl.constexpr, x):
    """Writes the bf16 parts of float32 x into rows row0.. of two shared-memory buffers."""
    hi, lo = _split(x)
    hi_buf.slice(row0, rows).store(hi)
    lo_buf.slice(row0, rows).store(lo)


@gluon.jit
def _scale_chunk(r_t, w_t, k_t, a_t, b_t, kb_hi, kb_lo, ar_hi, ar_lo, A_ROW: gl.constexpr, R_ROW: gl.constexpr,
                 L: gl.constexpr):
    """From a chunk's raw tiles in shared memory, writes the bf16 parts of its decay-scaled ones: K^ and B^ into
    rows 0 and L of kb_*, A~ and R~ into rows A_ROW and R_ROW of ar_*. Returns w and c in base 2 (exp2 is one
    instruction) and c_L."""
    w2 = w_t.load(PREP).to(gl.float32) * LOG2E
    c = gl.associative_scan(w2, 0, _add)
    e_nc = gl.exp2(-c)
    _store_parts(kb_hi, kb_lo, 0, L, k_t.load(PREP).to(gl.float32) * e_nc)
    _store_parts(kb_hi, kb_lo, L, L, b_t.load(PREP).to(gl.float32) * e_nc)
    if A_ROW == 0:                     # the rows in order (the order the kernels were timed with)
        _store_parts(ar_hi, ar_lo, A_ROW, L, a_t.load(PREP).to(gl.float32) * gl.exp2(c - w2))
        _store_parts(ar_hi, ar_lo, R_ROW, L, r_t.load(PREP).to(gl.float32) * gl.exp2(c))
    else:
        _store_parts(ar_hi, ar_lo, R_ROW, L, r_t.load(PREP).to(gl.float32) * gl.exp2(c))
        _store_parts(ar_hi, ar_lo, A_ROW, L, a_t.load(PREP).to(gl.float32) * gl.exp2(c - w2))
    return w2, c, gl.sum(w2, axis=0)


@gluon.jit
def _block(buf, row0: gl.constexpr, col0: gl.constexpr, L: gl.constexpr, layout: gl.constexpr):
    """The [L, L] block of a shared-memory [2L, 2L] matrix at (row0, col0), in `layout`."""
    return buf.slice(row0, L, 0).slice(col0, L, 1).load(layout)


@gluon.jit
def _inverse_t(nt_hi, nt_lo, L: gl.constexpr):
    """(I - M_ab)^{-T} = (I - Nt)^{-1} for the strictly upper triangular Nt = M_ab^T (given as bf16 parts in the
    right-operand layout BS), as a float32 [L, L] in the accumulator layout MS. The blocked inversion of
    triton_wkv7._inverse_blocked, transposed: Z = I + Z Nt (Z commutes with Nt) solved column by column inside the
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
def _sequence(cu_seqlens, chunk_offsets, T, H, L: gl.constexpr, IS_VARLEN: gl.constexpr):
    """program_id(0) = sequence * H + head: the sequence, the head, the sequence's first token in the flattened
    [B*T] axis, its length and its first state slot (triton_wkv7._seq_bounds)."""
    i_n = gl.program_id(0) // H
    if IS_VARLEN:
        bos = gl.load(cu_seqlens + i_n).to(gl.int64)
        seq_len = (gl.load(cu_seqlens + i_n + 1).to(gl.int64) - bos).to(gl.int32)
        slot0 = gl.load(chunk_offsets + i_n).to(gl.int64) + i_n
    else:
        bos = i_n.to(gl.int64) * T
        seq_len = T
        slot0 = i_n.to(gl.int64) * (gl.cdiv(T, L) + 1)
    return i_n, gl.program_id(0) % H, bos, seq_len, slot0


@gluon.jit
def _fetch(x, buf, t0, bos, seq_len, H, i_h, L: gl.constexpr, N: gl.constexpr):
    """Starts copying steps t0.. of one [B, T, H, N] input's head i_h into the shared-memory tile buf (cp.async,
    16 bytes a thread; steps outside the sequence, t0 < 0 included, are filled with zeros)."""
    if x.dtype.element_ty == gl.float32:
        layout: gl.constexpr = CP32
    else:
        layout: gl.constexpr = CP16
    o_t = gl.arange(0, L, layout=gl.SliceLayout(1, layout))
    o_k = gl.arange(0, N, layout=gl.SliceLayout(0, layout))
    p = (((bos + t0 + o_t) * H + i_h) * N)[:, None] + o_k[None, :]
    async_copy.async_copy_global_to_shared(buf, x + p, mask=((t0 + o_t >= 0) & (t0 + o_t < seq_len))[:, None])


@gluon.jit
def _alloc_tiles(dtype: gl.constexpr, shape: gl.constexpr):
    """Shared memory for [..., N] tiles of `dtype` (bf16 or float32)."""
    if dtype == gl.float32:
        return gl.allocate_shared_memory(dtype, shape, SH_N32)
    else:
        return gl.allocate_shared_memory(dtype, shape, SH_N)


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
def _fetch_bwd_chunk(r, w, k, a, b, v, dy, raw, vu, dyx, stage, t0, bos, seq_len, H, i_h, L: gl.constexpr,
                     N: gl.constexpr):
    """The backward's _fetch_chunk: r, w, k, a, b into their single slots (raw), v and dy into the first L rows of
    slot `stage` of their [2, 2L, N] tiles, as one commit group."""
    _fetch(r, raw[0], t0, bos, seq_len, H, i_h, L, N)
    _fetch(w, raw[1], t0, bos, seq_len, H, i_h, L, N)
    _fetch(k, raw[2], t0, bos, seq_len, H, i_h, L, N)
    _fetch(a, raw[3], t0, bos, seq_len, H, i_h, L, N)
    _fetch(b, raw[4], t0, bos, seq_len, H, i_h, L, N)
    _fetch(v, vu.index(stage).slice(0, L), t0, bos, seq_len, H, i_h, L, N)
    _fetch(dy, dyx.index(stage).slice(0, L), t0, bos, seq_len, H, i_h, L, N)
    async_copy.commit_group()


@gluon.jit
def wkv7_fwd_gluon_kernel(r, w, k, v, a, b, y, s0, states, mats, ht, cu_seqlens, chunk_offsets, T, H,
                          N: gl.constexpr, L: gl.constexpr, HAS_S0: gl.constexpr, STORE_STATES: gl.constexpr,
                          STORE_MATS: gl.constexpr, IS_VARLEN: gl.constexpr):
    """One program per (sequence, head), 4 warps, walking the chunks in order (see the module docstring); the
    arguments are those of triton_wkv7._wkv7_fwd_kernel (pointers only, BV = N)."""
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
    # where the kept matrices go (triton_wkv7._mats_at: (I - M_ab)^{-1}, M_ak, M_rb, M_rk): entry [s, t] of a block
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


@gluon.jit
def _prefetch_l2(p):
    """Asks the L2 cache for the lines at pointers p without waiting for them (PTX prefetch.global.L2)."""
    gl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [p], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def wkv7_bwd_gluon_kernel(r, w, k, v, a, b, dy, states, mats, dht, ds0, dr, dw, dk, dv, da, db, cu_seqlens,
                          chunk_offsets, T, H, N: gl.constexpr, L: gl.constexpr, HAS_DHT: gl.constexpr,
                          STORE_DS0: gl.constexpr, IS_VARLEN: gl.constexpr):
    """The fused backward of triton_wkv7 (its module docstring has the formulas), with the kept matrices: one
    program per (sequence, head), 4 warps, walking the chunks in reverse carrying dS [i, j] in registers. The
    products along dS's chain have i, the value index, as rows (the forward's orientation):

        U^T = (S_0 A~^T + V^T M_ak^T) (I - M_ab)^{-T},  dU^T = dY^T M_rb + dS' B^^T,  dX^T = dU^T (I - M_ab)^{-1}
        dV^T = dY^T M_rk + dS' K^^T + dX^T M_ak,        dS_0 = dS' + dY^T R~ + dX^T A~

    and the gradients of the decay-scaled tiles have t as rows, two [L, *] tiles stacked (a 16-row block a warp):

        [[dM_rk, dM_rb], [dM_ak, dM_ab]] = [dY; dX] [V^T, U^T]   (masked)
        [dR~; dA~] = [dY; dX] S_0 + dM [K^; B^],   [dK^; dB^] = dM^T [R~; A~] + [V; U] dS'

    d/dc_L = sum_i (S_L dS)_i is computed afresh in float32 at every chunk (S_0 and dS_0 are both at hand)."""
    gl.static_assert(N == 64, "the Gluon backward takes heads of 64")
    gl.static_assert(L == 16, "the Gluon backward takes chunks of 16 steps")
    MAT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])      # the [4L, L] kept matrices
    RED: gl.constexpr = gl.BlockedLayout([16, 1], [1, 32], [2, 2], [1, 0])    # [32, N] partial sums, by column

    i_n, i_h, bos, seq_len, slot0 = _sequence(cu_seqlens, chunk_offsets, T, H, L, IS_VARLEN)
    n_chunks = gl.cdiv(seq_len, L)
    o_i = gl.arange(0, N, layout=gl.SliceLayout(1, MS))
    o_j = gl.arange(0, N, layout=gl.SliceLayout(0, MS))
    o_ty = gl.arange(0, L, layout=gl.SliceLayout(0, MS))
    p_state = o_i[:, None] * N + o_j[None, :]
    o_tp = gl.arange(0, L, layout=gl.SliceLayout(1, PREP))
    o_kp = gl.arange(0, N, layout=gl.SliceLayout(0, PREP))
    p_mat = gl.arange(0, 4 * L, layout=gl.SliceLayout(1, MAT))[:, None] * L + \
        gl.arange(0, L, layout=gl.SliceLayout(0, MAT))[None, :]
    o_mr = gl.arange(0, 2 * L, layout=gl.SliceLayout(1, MT))
    o_mc = gl.arange(0, 2 * L, layout=gl.SliceLayout(0, MT))
    # dM_rk, dM_rb (rows of dY) keep s <= t, dM_ak, dM_ab (rows of dX) s < t
    dm_keep = ((o_mr % L)[:, None] > (o_mc % L)[None, :]) | \
        (((o_mr % L)[:, None] == (o_mc % L)[None, :]) & (o_mr < L)[:, None])

    # the chunk's r, w, k, a, b: one slot each, refilled for the next chunk once read; v and dy: rows 0..L-1 of
    # two-slot [2L, N] tiles whose rows L.. take U and dX (bf16 high parts; the low parts in *_lo, whose first
    # L rows, those of the bf16 inputs, stay zero)
    raw = (gl.allocate_shared_memory(gl.bfloat16, [L, N], SH_N),
           _alloc_tiles(w.dtype.element_ty, [L, N]),
           gl.allocate_shared_memory(gl.bfloat16, [L, N], SH_N),
           gl.allocate_shared_memory(gl.bfloat16, [L, N], SH_N),
           gl.allocate_shared_memory(gl.bfloat16, [L, N], SH_N))
    vu = gl.allocate_shared_memory(gl.bfloat16, [2, 2 * L, N], SH_N)          # [V; U]
    dyx = gl.allocate_shared_memory(gl.bfloat16, [2, 2 * L, N], SH_N)         # [dY; dX]
    vu_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)
    dyx_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)
    kb_hi = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)          # [K^; B^]
    kb_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)
    ra_hi = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)          # [R~; A~]
    ra_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, N], SH_N)
    mt_hi = gl.allocate_shared_memory(gl.bfloat16, [4 * L, L], SH_L)          # (I - M_ab)^{-1}, M_ak, M_rb, M_rk
    mt_lo = gl.allocate_shared_memory(gl.bfloat16, [4 * L, L], SH_L)
    s_hi = gl.allocate_shared_memory(gl.bfloat16, [N, N], SH_N)               # S_0
    s_lo = gl.allocate_shared_memory(gl.bfloat16, [N, N], SH_N)
    ds_hi = gl.allocate_shared_memory(gl.bfloat16, [N, N], SH_N)              # dS'
    ds_lo = gl.allocate_shared_memory(gl.bfloat16, [N, N], SH_N)
    dm_hi = gl.allocate_shared_memory(gl.bfloat16, [2 * L, 2 * L], SH_L)
    dm_lo = gl.allocate_shared_memory(gl.bfloat16, [2 * L, 2 * L], SH_L)
    grad = gl.allocate_shared_memory(gl.float32, [2 * L, N], SH_N32)
    red = gl.allocate_shared_memory(gl.float32, [4 * 8, N], SH_N32)
    zero_rows = gl.zeros([L, N], gl.bfloat16, PREP)
    vu_lo.slice(0, L).store(zero_rows)
    dyx_lo.slice(0, L).store(zero_rows)

    if HAS_DHT:
        dS = gl.load(dht + (i_n.to(gl.int64) * H + i_h) * N * N + p_state)
        g_end = gl.sum(gl.load(states + ((slot0 + n_chunks) * H + i_h) * N * N + p_state) * dS, axis=0)
    else:
        dS = gl.zeros([N, N], gl.float32, MS)
        g_end = gl.zeros([N], gl.float32, gl.SliceLayout(0, MS))
    g_end = gl.convert_layout(g_end, gl.SliceLayout(0, PREP))

    t_last = (n_chunks - 1) * L
    _fetch_bwd_chunk(r, w, k, a, b, v, dy, raw, vu, dyx, 0, t_last, bos, seq_len, H, i_h, L, N)

    for i in range(0, n_chunks):
        ic = n_chunks - 1 - i
        stage = i % 2
        t0 = ic * L
        slot = (slot0 + ic) * H + i_h
        s0 = gl.load(states + slot * N * N + p_state)                                       # S_0 [i, j]
        mt = gl.load(mats + slot * 4 * L * L + p_mat)
        slot_p = (slot0 + gl.maximum(ic - 1, 0)) * H + i_h           # the next chunk's, for the L2 cache
        _prefetch_l2(states + slot_p * N * N + gl.arange(0, N * N // 32, layout=gl.SliceLayout(0, PREP)) * 32)
        _prefetch_l2(mats + slot_p * 4 * L * L + gl.arange(0, 4 * L * L // 32, layout=gl.SliceLayout(0, PREP)) * 32)
        async_copy.wait_group(0)

        w2, c, c_last = _scale_chunk(raw[0], raw[1], raw[2], raw[3], raw[4], kb_hi, kb_lo, ra_hi, ra_lo, L, 0, L)
        mt_part_hi, mt_part_lo = _split(mt)
        mt_hi.store(mt_part_hi)
        mt_lo.store(mt_part_lo)
        t_next = t0 - L                                  # the next chunk (t_next < 0 after the first: all masked)
        _fetch_bwd_chunk(r, w, k, a, b, v, dy, raw, vu, dyx, 1 - stage, t_next, bos, seq_len, H, i_h, L, N)

        dsp = dS * gl.exp2(gl.convert_layout(c_last, gl.SliceLayout(0, MS)))[None, :]        # dS'
        dsp_hi, dsp_lo = _left(dsp, AS)
        ds_hi.store(dsp_hi)
        ds_lo.store(dsp_lo)
        s0_hi, s0_lo = _left(s0, AS)
        s_hi.store(s0_hi)
        s_lo.store(s0_lo)
        vt = vu.index(stage).slice(0, L).permute([1, 0]).load(AS)                           # V^T [N, L]
        dyt = dyx.index(stage).slice(0, L).permute([1, 0]).load(AS)                         # dY^T [N, L]
        zero_nl = gl.zeros([N, L], gl.float32, MS)

        x = _mm3_pair(s0_hi, s0_lo, ra_hi.slice(L, L).permute([1, 0]).load(BS),
                      ra_lo.slice(L, L).permute([1, 0]).load(BS), zero_nl)                   # S_0 A~^T
        x = _mm2(vt, mt_hi.slice(L, L).permute([1, 0]).load(BS), mt_lo.slice(L, L).permute([1, 0]).load(BS), x)
        x_hi, x_lo = _left(x, AS)
        ut = _mm3(x_hi, x_lo, mt_hi.slice(0, L).permute([1, 0]).load(BS),
                  mt_lo.slice(0, L).permute([1, 0]).load(BS), zero_nl)                      # U^T
        u_hi, u_lo = _split(ut)
        vu.index(stage).slice(L, L).permute([1, 0]).store(u_hi)
        vu_lo.slice(L, L).permute([1, 0]).store(u_lo)

        du = _mm2(dyt, mt_hi.slice(2 * L, L).load(BS), mt_lo.slice(2 * L, L).load(BS), zero_nl)    # dY^T M_rb
        du = _mm3_pair(dsp_hi, dsp_lo, kb_hi.slice(L, L).permute([1, 0]).load(BS),
                       kb_lo.slice(L, L).permute([1, 0]).load(BS), du)                     # + dS' B^^T
        du_hi, du_lo = _left(du, AS)
        dxt = _mm3(du_hi, du_lo, mt_hi.slice(0, L).load(BS), mt_lo.slice(0, L).load(BS), zero_nl)   # dX^T
        dx_hi, dx_lo = _left(dxt, AS)
        dyx.index(stage).slice(L, L).permute([1, 0]).store(dx_hi)
        dyx_lo.slice(L, L).permute([1, 0]).store(dx_lo)

        dvt = _mm2(dyt, mt_hi.slice(3 * L, L).load(BS), mt_lo.slice(3 * L, L).load(BS), zero_nl)   # dY^T M_rk
        dvt = _mm3_pair(dsp_hi, dsp_lo, kb_hi.slice(0, L).permute([1, 0]).load(BS),
                        kb_lo.slice(0, L).permute([1, 0]).load(BS), dvt)                   # + dS' K^^T
        dvt = _mm3(dx_hi, dx_lo, mt_hi.slice(L, L).load(BS), mt_lo.slice(L, L).load(BS), dvt)      # + dX^T M_ak
        p_v = (((bos + t0 + o_ty) * H + i_h) * N)[None, :] + o_i[:, None]
        gl.store(dv + p_v, dvt.to(dv.dtype.element_ty), mask=((t0 + o_ty) < seq_len)[None, :])

        dS = _mm2(dyt, ra_hi.slice(0, L).load(BS), ra_lo.slice(0, L).load(BS), dsp)          # dS' + dY^T R~
        dS = _mm3(dx_hi, dx_lo, ra_hi.slice(L, L).load(BS), ra_lo.slice(L, L).load(BS), dS)  # + dX^T A~
        # d/dc_L of the previous chunk, sum_i S_L dS at its exit: rows i and i + 8 added in each thread (MS holds
        # both), then the 32 partial rows through shared memory, a column a thread. gl.sum of the [N, N] product
        # shuffles all 16 columns a thread across the 8 lanes of a column first: 150 more instructions a chunk.
        red.store(gl.reshape(gl.sum(gl.reshape(s0 * dS, [4, 2, 8, N]), axis=1), [4 * 8, N]))
        g_next = gl.sum(red.load(RED), axis=0)

        dm = _mm3_pair(dyx.index(stage).load(AT), dyx_lo.load(AT), vu.index(stage).permute([1, 0]).load(BT),
                       vu_lo.permute([1, 0]).load(BT), gl.zeros([2 * L, 2 * L], gl.float32, MT))
        dm_part_hi, dm_part_lo = _split(gl.where(dm_keep, dm, 0.0))
        dm_hi.store(dm_part_hi)
        dm_lo.store(dm_part_lo)
        zero_tn = gl.zeros([2 * L, N], gl.float32, MT)
        g_ra = _mm3_pair(dyx.index(stage).load(AT), dyx_lo.load(AT), s_hi.load(BT), s_lo.load(BT), zero_tn)
        g_ra = _mm3(dm_hi.load(AT), dm_lo.load(AT), kb_hi.load(BT), kb_lo.load(BT), g_ra)      # [dR~; dA~]
        grad.store(g_ra)
        d_rt = grad.slice(0, L).load(PREP)
        d_at = grad.slice(L, L).load(PREP)
        g_kb = _mm3(dm_hi.permute([1, 0]).load(AT), dm_lo.permute([1, 0]).load(AT), ra_hi.load(BT), ra_lo.load(BT),
                    zero_tn)
        g_kb = _mm3_pair(vu.index(stage).load(AT), vu_lo.load(AT), ds_hi.load(BT), ds_lo.load(BT), g_kb)  # [dK^; dB^]
        grad.store(g_kb)
        d_kh = grad.slice(0, L).load(PREP)
        d_bh = grad.slice(L, L).load(PREP)

        # the raw tiles' gradients: dx = dX~ e^{+-c}; the decay's, dw_t = sum_{s>=t} g_s - (da a)_t + d/dc_L
        e_c = gl.exp2(c)
        e_cp = gl.exp2(c - w2)
        e_nc = gl.exp2(-c)
        da_a = d_at * (ra_hi.slice(L, L).load(PREP).to(gl.float32) + ra_lo.slice(L, L).load(PREP).to(gl.float32))
        g = (d_rt * (ra_hi.slice(0, L).load(PREP).to(gl.float32) + ra_lo.slice(0, L).load(PREP).to(gl.float32))
             + da_a
             - d_bh * (kb_hi.slice(L, L).load(PREP).to(gl.float32) + kb_lo.slice(L, L).load(PREP).to(gl.float32))
             - d_kh * (kb_hi.slice(0, L).load(PREP).to(gl.float32) + kb_lo.slice(0, L).load(PREP).to(gl.float32)))
        # sum_{s>=t} g_s as the chunk's sum less the steps before t: a reverse scan reverses the tile across the
        # lanes before and after (80 shuffles a chunk)
        dw_ = (gl.sum(g, axis=0) + g_end)[None, :] - gl.associative_scan(g, 0, _add) + g - da_a
        p_k = (((bos + t0 + o_tp) * H + i_h) * N)[:, None] + o_kp[None, :]
        m_k = ((t0 + o_tp) < seq_len)[:, None]
        gl.store(dr + p_k, (d_rt * e_c).to(dr.dtype.element_ty), mask=m_k)
        gl.store(da + p_k, (d_at * e_cp).to(da.dtype.element_ty), mask=m_k)
        gl.store(db + p_k, (d_bh * e_nc).to(db.dtype.element_ty), mask=m_k)
        gl.store(dk + p_k, (d_kh * e_nc).to(dk.dtype.element_ty), mask=m_k)
        gl.store(dw + p_k, dw_.to(dw.dtype.element_ty), mask=m_k)
        g_end = gl.convert_layout(g_next, gl.SliceLayout(0, PREP))

    if STORE_DS0:
        gl.store(ds0 + (i_n.to(gl.int64) * H + i_h) * N * N + p_state, dS)
