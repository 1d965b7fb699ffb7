"""Training loss: cross-entropy plus L2Wrap, as in RWKV-LM.

`head_loss` is what training runs: the head's matmul fused with the loss, chunk by chunk over the B*T rows, so the
fp32 [B*T, V] logits never exist (at ctx 4096, B 8 and the World vocab they alone are 8 GiB). `lm_loss` is the
plain version on full logits, kept as the reference the tests compare `head_loss` against.
"""
from typing import Optional

import torch
import torch.nn.functional as F

L2WRAP = 1e-4            # RWKV-LM's L2Wrap factor, divided by the number of positions
CHUNK_BYTES = 256 << 20  # budget for one chunk's float32 [rows, V] logits


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds 1e-4/(B*T) * max_logit to each position's argmax logit gradient,
    which pulls the largest logits toward 0 and keeps them from drifting upward."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss.clone()   # a new tensor, not the input: ZeRO-3's hooks may modify the output in place

    @staticmethod
    def backward(ctx, grad_loss):
        (logits,) = ctx.saved_tensors
        factor = L2WRAP / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_loss, grad_logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over [B, T] with the L2Wrap gradient term (reference for head_loss)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return L2Wrap.apply(loss, logits)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (float64 stays float64). cuBLAS returns its float32 accumulator for bf16/fp16
    inputs; the CPU has no such product and rounds to the input dtype first."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _chunked(x, weight, targets, dtype, chunk_rows, grad_scale, want_x, want_w):
    """Walk the rows of x [N, C] in chunks: per-row losses [N] (float32, or float64 for float64 inputs), and,
    where asked, the gradients of `grad_scale * sum(losses)` + L2Wrap w.r.t. x (x's dtype) and weight (float32
    accumulator, float64 for float64)."""
    N = x.shape[0]
    w = weight.to(dtype)
    acc = torch.promote_types(dtype, torch.float32)
    losses = torch.empty(N, dtype=acc, device=x.device)
    grad_x = torch.empty_like(x) if want_x else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_w else None
    factor = L2WRAP / N
    for a in range(0, N, chunk_rows):
        xc, t = x[a:a + chunk_rows].to(dtype), targets[a:a + chunk_rows]
        z = (xc @ w.T).to(acc)                   # logits in the matmul's dtype (bf16 under autocast), then fp32
        maxx, ids = torch.max(z, dim=-1)         # L2Wrap's argmax, on the same values and ties as lm_loss
        target_logit = z.gather(1, t[:, None]).squeeze(1)
        z.sub_(maxx[:, None]).exp_()             # z is now exp(logits - max): softmax up to its row sum
        total = z.sum(dim=-1)
        losses[a:a + chunk_rows] = maxx + total.log() - target_logit
        if not (want_x or want_w):
            continue
        # d loss / d logits = grad_scale * (softmax - onehot(target)), + factor * max at the argmax (L2Wrap)
        rows = torch.arange(len(t), device=x.device)
        z.mul_((grad_scale / total)[:, None])
        z[rows, t] -= grad_scale
        z[rows, ids] += factor * maxx
        g = z.to(dtype)
        if want_x:
            grad_x[a:a + chunk_rows] = g @ w
        if want_w:
            grad_w += _matmul_fp32(g.T, xc)
    return losses, grad_x, grad_w


class FusedHeadLoss(torch.autograd.Function):
    """Cross-entropy + L2Wrap of logits = x @ weight.T, computed in chunks of rows. The forward also computes the
    gradients (each chunk's logits are dropped as soon as its gradients are made); backward scales them by
    grad_output."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk_rows, reduction):
        grad_scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0
        want_x, want_w = ctx.needs_input_grad[:2]
        losses, ctx.grad_x, ctx.grad_w = _chunked(x, weight, targets, dtype, chunk_rows, grad_scale, want_x, want_w)
        if ctx.grad_w is not None:
            ctx.grad_w = ctx.grad_w.to(weight.dtype)
        return losses.mean() if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (ctx.grad_x, ctx.grad_w)]
        return *scaled, None, None, None, None


def head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
              chunk_rows: Optional[int] = None) -> torch.Tensor:
    """The loss of the head `logits = x @ weight.T` for x [N, C], weight [V, C], targets [N], without the [N, V]
    logits: mean (training) or summed (validation) cross-entropy, with lm_loss's L2Wrap gradient
    (1e-4 / N * max_logit on each row's argmax logit).

    The matmul runs in the autocast dtype where autocast is on for x's device (as nn.Linear would), else in the
    inputs' common dtype; logsumexp and gradients in float32, the weight gradient accumulated in float32. Without
    grad mode (validation) it computes the loss alone. chunk_rows: rows per chunk; default: as many as keep one
    chunk's float32 logits within CHUNK_BYTES.

    Unlike lm_loss, every gradient, L2Wrap's included, scales with the loss's grad_output: under gradient
    accumulation over n micro-batches (loss / n) this equals one batch n times larger, where RWKV-LM's L2Wrap
    adds its term at full strength to each micro-batch."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    chunk_rows = chunk_rows or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    # Autocast off inside: the function casts each chunk itself, and takes the float32 x and weight as they are,
    # so that their gradients come back in float32 rather than through a bf16 copy.
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return FusedHeadLoss.apply(x, weight, targets, dtype, chunk_rows, reduction)
        losses = _chunked(x, weight, targets, dtype, chunk_rows, 0.0, False, False)[0]
    return losses.mean() if reduction == "mean" else losses.sum()
