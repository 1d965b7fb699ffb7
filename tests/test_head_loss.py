"""The fused, chunked head + cross-entropy + L2Wrap (loss.head_loss) against the unfused reference: lm_loss on
the full logits x @ W.T, through autograd."""
import pytest
import torch
import torch.nn.functional as F

from random_model import random_model
from rwkv7_train.loss import head_loss, lm_loss


def inputs(B, T, C, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * T, C, generator=g, dtype=dtype)
    w = (torch.randn(V, C, generator=g, dtype=dtype) * 2 / C ** 0.5)
    return x.requires_grad_(), w.requires_grad_(), torch.randint(0, V, (B * T,), generator=g)


def reference(x, w, targets, B, T):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = lm_loss((x @ w.T).view(B, T, -1), targets.view(B, T))
    loss.backward()
    return loss.detach(), x.grad, w.grad


def fused(x, w, targets, chunk_rows):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = head_loss(x, w, targets, chunk_rows=chunk_rows)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("B, T, C, V, chunk_rows", [
    (2, 5, 8, 11, 3),         # chunks that do not divide the rows
    (2, 5, 8, 11, None),      # one chunk
    (1, 6, 16, 65536, 4),     # the World vocab
])
def test_loss_and_gradients_equal_the_unfused_reference(dtype, tol, B, T, C, V, chunk_rows):
    x, w, targets = inputs(B, T, C, V, dtype)
    loss, gx, gw = fused(x, w, targets, chunk_rows)
    ref_loss, ref_gx, ref_gw = reference(x, w, targets, B, T)
    assert loss.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert abs(loss - ref_loss) / ref_loss < tol
    assert max_rel(gx, ref_gx) < tol
    assert max_rel(gw, ref_gw) < tol


def test_l2wrap_goes_to_the_argmax_torch_max_picks_among_ties():
    B, T, C, V = 2, 4, 8, 13
    x, w, targets = inputs(B, T, C, V, torch.float64)
    x = x.detach().abs().requires_grad_()
    with torch.no_grad():      # rows 3 and 9 equal and far above the rest: every position's maximum is a tie
        w[3] = w[9] = 5.0
    assert torch.equal((x @ w.T)[:, 3], (x @ w.T)[:, 9])
    loss, gx, gw = fused(x, w, targets, chunk_rows=3)
    _, ref_gx, ref_gw = reference(x, w, targets, B, T)
    assert max_rel(gx, ref_gx) < 1e-13 and max_rel(gw, ref_gw) < 1e-13
    plain = x.detach().clone().requires_grad_()
    w_plain = w.detach().clone().requires_grad_()
    F.cross_entropy(plain @ w_plain.T, targets).backward()
    l2wrap = gw - w_plain.grad
    assert l2wrap[3].abs().sum() > 0 and l2wrap[9].abs().max() < 1e-15   # the first of the tied indices


def test_gradients_scale_with_grad_output():
    x, w, targets = inputs(2, 3, 8, 11, torch.float64)
    _, gx, gw = fused(x, w, targets, chunk_rows=2)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * head_loss(x2, w2, targets, chunk_rows=2)).backward()
    assert torch.allclose(x2.grad, 3 * gx, rtol=1e-14) and torch.allclose(w2.grad, 3 * gw, rtol=1e-14)


def test_without_grad_mode_it_gives_the_summed_cross_entropy_and_no_graph():
    x, w, targets = inputs(3, 4, 8, 11, torch.float32)
    with torch.no_grad():
        total = head_loss(x, w, targets, reduction="sum", chunk_rows=5)
        expected = F.cross_entropy(x @ w.T, targets, reduction="sum")
    assert total.grad_fn is None
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_under_bf16_autocast_the_matmul_runs_in_bf16_like_nn_linear():
    B, T, C, V = 2, 8, 64, 97
    x, w, targets = inputs(B, T, C, V, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gx, gw = fused(x, w, targets, chunk_rows=5)
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ref = lm_loss(F.linear(xr, wr).float().view(B, T, V), targets.view(B, T))   # the model's old head path
        ref.backward()
    fp32_loss = fused(x, w, targets, chunk_rows=5)[0]
    assert gx.dtype == gw.dtype == torch.float32   # gradients of the float32 inputs, not of bf16 copies
    assert abs(loss - ref) < 1e-6 < abs(loss - fp32_loss)   # the bf16 logits, not the float32 ones
    assert max_rel(gx, xr.grad) < 1e-2 and max_rel(gw, wr.grad) < 1e-2


def test_model_with_targets_equals_lm_loss_on_its_logits():
    cu = torch.tensor([0, 7, 20, 33, 40])
    for cu_seqlens in (None, cu):
        losses, grads = [], []
        for fused_path in (True, False):
            model = random_model(0, scale=0.1, vocab_size=200, n_layer=2, n_embd=64, head_size=32)
            g = torch.Generator().manual_seed(1)
            idx, targets = torch.randint(0, 200, (2, 20), generator=g), torch.randint(0, 200, (2, 20), generator=g)
            if fused_path:
                loss = model(idx, cu_seqlens=cu_seqlens, targets=targets)
            else:
                loss = lm_loss(model(idx, cu_seqlens=cu_seqlens), targets)
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        for name, g in grads[1].items():
            assert max_rel(grads[0][name], g) < 1e-5, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_under_bf16_autocast_equals_the_old_head_path():
    B, T, C, V = 2, 1024, 256, 65536
    x, w, targets = (t.detach().cuda() for t in inputs(B, T, C, V, torch.float32))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, gx, gw = fused(x, w, targets, chunk_rows=512)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = lm_loss(F.linear(xr, wr).float().view(B, T, V), targets.view(B, T))
        ref.backward()
    assert abs(loss - ref) / ref < 1e-5
    assert max_rel(gx, xr.grad) < 1e-2 and max_rel(gw, wr.grad) < 1e-2
