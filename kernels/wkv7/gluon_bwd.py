"""The fused backward in Gluon for bf16 inputs and heads of 64: what triton_bwd.py's fused kernel computes, with
the kept matrices, faster (wkv7_bwd_gluon_kernel's docstring has its products)."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .gluon_parts import AS, AT, BS, BT, MS, MT, PREP, SH_L, SH_N, SH_N32, _add, _alloc_tiles, _fetch, _left, \
    _mm2, _mm3, _mm3_pair, _scale_chunk, _sequence, _split


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
def _prefetch_l2(p):
    """Asks the L2 cache for the lines at pointers p without waiting for them (PTX prefetch.global.L2)."""
    gl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [p], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def wkv7_bwd_gluon_kernel(r, w, k, v, a, b, dy, states, mats, dht, ds0, dr, dw, dk, dv, da, db, cu_seqlens,
                          chunk_offsets, T, H, N: gl.constexpr, L: gl.constexpr, HAS_DHT: gl.constexpr,
                          STORE_DS0: gl.constexpr, IS_VARLEN: gl.constexpr):
    """The fused backward of triton_bwd.py (its module docstring has the formulas), with the kept matrices: one
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


def wkv7_bwd_gluon(r, w, k, v, a, b, dy, states, mats, dht, ds0, grads, layout):
    """Fills grads (dr, dw, dk, dv, da, db) and ds0 (when not None), as triton_bwd.wkv7_bwd_fused does; needs the
    kept matrices."""
    H, N = r.shape[2], r.shape[3]
    wkv7_bwd_gluon_kernel[(layout.n_seq * H,)](
        r, w, k, v, a, b, dy, states, mats, dht, ds0, *grads, layout.cu_seqlens, layout.chunk_offsets, layout.T, H,
        N=N, L=layout.L, HAS_DHT=dht is not None, STORE_DS0=ds0 is not None, IS_VARLEN=layout.is_varlen,
        num_warps=4)
