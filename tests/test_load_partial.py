"""`load_partial` grows a model from a smaller official checkpoint: the source in each tensor's leading slice, the
official init everywhere else."""
import pytest
import torch

from random_model import random_model
from rwkv7_train import RWKV7, RWKV7Config
from rwkv7_train.errors import UserError
from rwkv7_train.official import load_into, load_partial

SOURCE = dict(vocab_size=100, n_layer=2, n_embd=64, head_size=32)


def source_state(**cfg):
    """An official (bf16) state_dict of a random model, SOURCE with `cfg` changed."""
    return {k: v.to(torch.bfloat16) for k, v in random_model(1, **{**SOURCE, **cfg}).state_dict().items()}


def fresh(seed, **cfg) -> RWKV7:
    torch.manual_seed(seed)
    return RWKV7(RWKV7Config(**cfg))


def expected_growth(sd: dict, init: dict) -> dict:
    """What growing `init` from `sd` must give: each source tensor in its leading slice, the init elsewhere."""
    out = {k: v.clone() for k, v in init.items()}
    for k, t in sd.items():
        out[k][tuple(slice(0, n) for n in t.shape)] = t.float()
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def grow(seed, **target):
    """Grow a model (built with `seed`) from the random SOURCE one; check it holds the expected growth and runs.
    Returns (source state_dict, grown state_dict, the same model's fresh init, summary)."""
    sd = source_state()
    model = fresh(seed, **target)
    summary = load_partial(model, sd, source="small.pth")
    init = fresh(seed, **target).state_dict()
    got = model.state_dict()
    assert_same(got, expected_growth(sd, init))
    with torch.no_grad():
        logits = model(torch.randint(0, target["vocab_size"], (2, 16)))
    assert logits.shape == (2, 16, target["vocab_size"]) and logits.isfinite().all()
    return sd, got, init, summary


def test_wider_and_deeper_model_takes_the_source_in_leading_slices():
    # dim_g: a wider LoRA too
    sd, got, init, summary = grow(5, vocab_size=100, n_layer=3, n_embd=96, head_size=32, dim_g=64)
    for k in got:
        if k.startswith("blocks.2."):  # the new layer is the official init
            assert torch.equal(got[k], init[k]), k
    # Every source tensor has C (or H) in it, so all grow; the new layer's tensors are new.
    assert summary == (f"init_from small.pth: 0 tensors copied, {len(sd)} grown into larger ones, "
                       f"{len(got) - len(sd)} new at the official init")


def test_same_width_copies_and_grows_only_the_vocab():
    sd, got, _, summary = grow(6, **dict(SOURCE, vocab_size=120, n_layer=3))
    for k, t in sd.items():
        if k not in ("emb.weight", "head.weight"):
            assert torch.equal(got[k], t.float()), k
    new = [k for k in got if k not in sd]
    assert new and all(k.startswith("blocks.2.") for k in new)
    assert summary == (f"init_from small.pth: {len(sd) - 2} tensors copied, 2 grown into larger ones, "
                       f"{len(new)} new at the official init")


def test_exact_fit_is_the_same_as_load_into():
    sd = source_state()
    partial, exact = fresh(7, **SOURCE), fresh(7, **SOURCE)
    summary = load_partial(partial, sd, source="m.pth")
    load_into(exact, sd, source="m.pth")
    assert_same(partial.state_dict(), exact.state_dict())
    assert summary == f"init_from m.pth: {len(sd)} tensors copied, 0 grown into larger ones, 0 new at the official init"


def test_source_wider_than_the_model_is_refused_naming_the_tensor():
    model = fresh(8, **SOURCE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"emb\.weight has shape \(100, 96\), larger than the model's \(100, 64\)"):
        load_partial(model, source_state(n_embd=96), source="wide.pth")
    assert_same(model.state_dict(), before)  # refused before anything was copied


def test_source_with_more_layers_is_refused_naming_the_tensor():
    with pytest.raises(UserError, match=r"has blocks\.2\.\S+ .*the model has no blocks\.2\."):
        load_partial(fresh(8, **SOURCE), source_state(n_layer=3), source="deep.pth")


def test_other_head_size_is_refused_naming_r_k():
    with pytest.raises(UserError, match=r"blocks\.0\.att\.r_k has shape \(4, 16\), the model's \(2, 32\).*"
                                        r"model\.head_size=16"):
        load_partial(fresh(8, **SOURCE), source_state(head_size=16), source="h16.pth")
