"""Activation checkpointing recomputes each block in backward and changes no number."""
import torch

from random_model import random_model


def grads_and_block_calls(checkpointing: bool, cu_seqlens=None):
    model = random_model(0, scale=0.1, vocab_size=200, n_layer=3, n_embd=64, head_size=32)
    model.activation_checkpointing = checkpointing
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 200, (2, 40), generator=g), torch.randint(0, 200, (2, 40), generator=g)
    model(idx, cu_seqlens=cu_seqlens, targets=targets).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_same_gradients_with_each_block_run_twice():
    plain, plain_calls = grads_and_block_calls(False)
    recomputed, recomputed_calls = grads_and_block_calls(True)
    assert (plain_calls, recomputed_calls) == (1, 2)
    for name, g in plain.items():
        assert torch.allclose(recomputed[name], g, rtol=1e-5, atol=1e-7), name


def test_packed_documents_with_checkpointing():
    cu = torch.tensor([0, 9, 40, 41, 80])
    plain, _ = grads_and_block_calls(False, cu)
    recomputed, _ = grads_and_block_calls(True, cu)
    for name, g in plain.items():
        assert torch.allclose(recomputed[name], g, rtol=1e-5, atol=1e-7), name
