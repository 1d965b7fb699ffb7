"""Gluon (Triton's explicit-layout dialect) building blocks of gluon_fwd.py and gluon_bwd.py: register and
shared-memory layouts for 4 warps, bf16x3 products, the chunk's decay scaling and its input copies.

Every product is a bf16 tensor-core product (mma_v2) of float32 values split in a bf16 high and low part (three
products, "bf16x3"; two where one side is a bf16 input, exact as it is): float32-accurate for the state's
products, more accurate than the Triton kernels' tf32 for the chunk-internal ones. A product's accumulator is,
entry for entry, the left operand of the next one in the layouts below (_left: Gluon checks that no data moves).
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
def _sequence(cu_seqlens, chunk_offsets, T, H, L: gl.constexpr, IS_VARLEN: gl.constexpr):
    """program_id(0) = sequence * H + head: the sequence, the head, the sequence's first token in the flattened
    [B*T] axis, its length and its first state slot (triton_chunk._seq_bounds)."""
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

