"""Chunked WKV-7 in plain PyTorch: the CPU training path and the reference for the Triton kernels.

Within a chunk of L steps, with cumulative log decay c_t = sum_{s<=t} w_s (per key channel) and the state
S_0 entering the chunk, the recurrence S_t = S_{t-1} (diag(e^{w_t}) + a_t b_t^T) + v_t k_t^T unrolls to
(rows are time steps, decay ratios taken relative to the chunk start):

    u_t = S_{t-1} a_t                     = S_0 a~_t + sum_{s<t} u_s (b^_s . a~_t) + v_s (k^_s . a~_t)
    y_t = S_t r_t                         = S_0 r~_t + sum_{s<=t} u_s (b^_s . r~_t) + v_s (k^_s . r~_t)
    S_L = S_0 diag(e^{c_L}) + sum_s (u_s b^_s^T + v_s k^_s^T) diag(e^{c_L})

with a~_t = a_t e^{c_{t-1}}, r~_t = r_t e^{c_t}, b^_s = b_s e^{-c_s}, k^_s = k_s e^{-c_s}. The first line is a unit
lower-triangular system for U = [u_t], solved once per chunk for all chunks at once; only the state hand-over
between chunks is sequential. Everything runs in float32 (or float64 when given float64); autograd gives the
backward pass. With w >= -exp(-0.5) and L = 16, e^{-c} stays below 2e4, far inside float32's range.
"""
import torch
import torch.nn.functional as F

CHUNK = 16


def wkv7_chunked_torch(r, w, k, v, a, b, initial_state=None, chunk_size=CHUNK):
    """Same contract as `rwkv7_kernels.wkv7`; returns (y in r's dtype, final state in float32/float64)."""
    B, T, H, N = r.shape
    out_dtype = r.dtype
    cdtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    if T == 0:  # nothing to do: the state passes through
        s0 = r.new_zeros(B, H, N, N, dtype=cdtype) if initial_state is None else initial_state.to(cdtype)
        return r.new_empty(B, 0, H, N), s0
    L = chunk_size
    pad = (-T) % L
    # Padding steps have decay 1 (w = 0) and zero inputs, so they leave the state untouched.
    r, w, k, v, a, b = (F.pad(x.to(cdtype), (0, 0, 0, 0, 0, pad)) for x in (r, w, k, v, a, b))
    n = (T + pad) // L

    def chunks(x):  # [B, T, H, N] -> [B, H, n, L, N]
        return x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4)

    r, w, k, v, a, b = map(chunks, (r, w, k, v, a, b))
    c = torch.cumsum(w, dim=3)                       # c_t, inclusive
    c_prev = c - w                                   # c_{t-1}
    a_t = a * torch.exp(c_prev)
    r_t = r * torch.exp(c)
    inv = torch.exp(-c)
    b_h = b * inv
    k_h = k * inv

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    m_ab = (a_t @ b_h.transpose(-1, -2)).masked_fill(~strict, 0)   # [B,H,n,L,L]
    m_ak = (a_t @ k_h.transpose(-1, -2)).masked_fill(~strict, 0)
    m_rb = (r_t @ b_h.transpose(-1, -2)).masked_fill(~incl, 0)
    m_rk = (r_t @ k_h.transpose(-1, -2)).masked_fill(~incl, 0)

    eye = torch.eye(L, dtype=cdtype, device=r.device)
    lower = eye - m_ab
    # U = lower^{-1} (A~ S_0^T + M_ak V): split into a state-free part and a part linear in S_0.
    u_free = torch.linalg.solve_triangular(lower, m_ak @ v, upper=False, unitriangular=True)
    a_solved = torch.linalg.solve_triangular(lower, a_t, upper=False, unitriangular=True)
    y_free = m_rb @ u_free + m_rk @ v                 # output that does not depend on S_0
    r_eff = r_t + m_rb @ a_solved                     # y_t = y_free_t + S_0 r_eff_t

    decay_end = torch.exp(c[:, :, :, -1:, :])         # e^{c_L}, [B,H,n,1,N]
    b_end = b_h * decay_end
    k_end = k_h * decay_end

    S = (torch.zeros(B, H, N, N, dtype=cdtype, device=r.device) if initial_state is None
         else initial_state.to(cdtype))
    ys = []
    for i in range(n):
        st = S.transpose(-1, -2)                      # S_0^T: [B,H,N(key),N(value)]
        ys.append(y_free[:, :, i] + r_eff[:, :, i] @ st)
        u = u_free[:, :, i] + a_solved[:, :, i] @ st  # [B,H,L,N(value)]
        S = (S * decay_end[:, :, i]
             + u.transpose(-1, -2) @ b_end[:, :, i]
             + v[:, :, i].transpose(-1, -2) @ k_end[:, :, i])
    y = torch.stack(ys, dim=2)                        # [B,H,n,L,N]
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]
    return y.to(out_dtype), S
