"""Step-by-step WKV-7 recurrence: the definition every faster path is tested against.

Run it in float64 for a reference. One time step per iteration, so keep T small.
"""
import torch


def wkv7_naive(r, w, k, v, a, b, initial_state=None):
    """Same contract as `rwkv7_kernels.wkv7` (see its docstring); returns (y, final_state), both in r's dtype."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(r.dtype).clone()
    decay = torch.exp(w.to(r.dtype))
    y = torch.empty_like(r)
    for t in range(T):
        # S_ij <- S_ij w_j + (sum_j' S_ij' a_j') b_j + v_i k_j ;  y_i = sum_j S_ij r_j
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t].to(r.dtype))
        S = (S * decay[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :].to(r.dtype)
             + v[:, t, :, :, None].to(r.dtype) * k[:, t, :, None, :].to(r.dtype))
        y[:, t] = torch.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S
