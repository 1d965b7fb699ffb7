"""Training loss: cross-entropy plus L2Wrap, as in RWKV-LM."""
import torch
import torch.nn.functional as F


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
        factor = 1e-4 / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(logits).scatter_(-1, ids, maxx * factor)
        return grad_loss, grad_logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over [B, T] with the L2Wrap gradient term."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return L2Wrap.apply(loss, logits)
