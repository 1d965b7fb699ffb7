"""The chunked PyTorch WKV-7 (the CPU path) against the float64 step-by-step recurrence."""
import pytest
import torch

from rwkv7_kernels import wkv7, wkv7_chunked_torch, wkv7_naive
from wkv_inputs import wkv_inputs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T", [1, 15, 16, 17, 64, 200])
@pytest.mark.parametrize("H", [1, 3])
def test_output_and_final_state_match_fp64_loop(T, H):
    x = wkv_inputs(2, T, H, 32, seed=T * 10 + H)
    s0 = torch.randn(2, H, 32, 32, dtype=torch.float64)
    y_ref, s_ref = wkv7_naive(*x, initial_state=s0)
    y, s = wkv7_chunked_torch(*(t.float() for t in x), initial_state=s0.float())
    assert y.dtype == torch.float32
    assert rel(y, y_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("decay", ["fast", "slow"])
def test_extreme_decays(decay):
    x = wkv_inputs(1, 100, 2, 64, decay=decay, seed=1)
    y_ref, s_ref = wkv7_naive(*x)
    y, s = wkv7_chunked_torch(*(t.float() for t in x))
    assert rel(y, y_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("T", [17, 40])
def test_gradients_match_fp64_loop(T):
    x = wkv_inputs(1, T, 2, 16, seed=7)
    s0 = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    dy = torch.randn(1, T, 2, 16, dtype=torch.float64)
    ds = torch.randn(1, 2, 16, 16, dtype=torch.float64)

    def grads(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in x + [s0]]
        y, s = fn(*inputs[:6], initial_state=inputs[6])
        ((y * dy.to(dtype)).sum() + (s * ds.to(dtype)).sum()).backward()
        return [t.grad for t in inputs]

    for g, g_ref in zip(grads(wkv7_chunked_torch, torch.float32), grads(wkv7_naive, torch.float64)):
        assert rel(g, g_ref) < 1e-5


def test_bf16_inputs_give_bf16_output_with_fp32_state():
    x = wkv_inputs(1, 20, 2, 32, seed=3)
    y, s = wkv7(*(t.to(torch.bfloat16) for t in x[:1]), x[1].float(), *(t.to(torch.bfloat16) for t in x[2:]),
                output_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, _ = wkv7_naive(*(t.to(torch.bfloat16).double() for t in x))
    assert rel(y, y_ref) < 1e-2


def test_cu_seqlens_restarts_state_at_each_document():
    lengths = [5, 0, 1, 20]
    x = wkv_inputs(1, sum(lengths), 2, 16, seed=4)
    s0 = torch.randn(len(lengths), 2, 16, 16, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 6, 26])
    y, s = wkv7(*(t.float() for t in x), initial_state=s0.float(), output_final_state=True, cu_seqlens=cu)
    for d, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_ref, s_ref = wkv7_naive(*(t[:, lo:hi] for t in x), initial_state=s0[d:d + 1])
        if hi > lo:
            assert rel(y[:, lo:hi], y_ref) < 1e-5
        assert rel(s[d:d + 1], s_ref) < 1e-5   # an empty document passes its initial state through
