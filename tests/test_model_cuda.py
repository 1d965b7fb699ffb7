"""The model on CUDA (Triton WKV-7 backend) agrees with the CPU path, which the reference tests pin down."""
import pytest
import torch

from random_model import random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.fixture(scope="module")
def model():
    return random_model(0, scale=0.1, vocab_size=1000, n_layer=3, n_embd=256, head_size=64)


def test_cuda_fp32_logits_match_cpu(model):
    idx = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(idx)
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu = model.cuda()(idx.cuda())
        model.cpu()
    assert rel(gpu, cpu) < 1e-4


def test_cuda_bf16_autocast_is_close_and_gradients_flow(model):
    idx = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(2))
    m = model.cuda()
    with torch.no_grad():
        ref = m(idx.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(idx.cuda())
    assert rel(out.detach(), ref) < 5e-2
    out.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m.zero_grad(set_to_none=True)
    model.cpu()


def test_cuda_rnn_mode_continues_a_parallel_pass(model):
    idx = torch.randint(0, 1000, (1, 70), generator=torch.Generator().manual_seed(3)).cuda()
    m = model.cuda()
    with torch.no_grad():
        full = m(idx)
        a, state = m(idx[:, :33], return_state=True)
        b, state = m(idx[:, 33:34], state=state, return_state=True)
        c, _ = m(idx[:, 34:], state=state, return_state=True)
    assert rel(torch.cat([a, b, c], dim=1), full) < 1e-4
    model.cpu()
