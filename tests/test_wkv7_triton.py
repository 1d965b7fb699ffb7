"""The Triton WKV-7 kernels against the float64 step-by-step loop: output, final state and every gradient.

The float32 checks (small shapes) run in Triton's interpreter without CUDA (TRITON_INTERPRET=1, set by conftest.py
before anything imports triton) and on the GPU with CUDA, there with IEEE float32 products instead of tf32; either way
the error stays near 1e-7. With CUDA, bf16 checks at larger shapes hold the kernels to the bf16 floor with their
production settings.
"""
import json
import math
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from rwkv7_kernels import KernelConfig, wkv7, wkv7_naive
from rwkv7_kernels.wkv7 import dispatch, launch, triton_op
from rwkv7_kernels.wkv7.triton_op import wkv7_triton

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"
W_MIN = -math.exp(-0.5)   # log decay bound: decay exp(w) in (0.545, 1)
CPU_TOL = 2e-5            # relative L2 error, float32 kernels vs the float64 loop


@pytest.fixture
def exact_fp32():
    """IEEE float32 products on the GPU, so float32 inputs can be held to float32 accuracy."""
    return KernelConfig(**{f.name: "ieee" for f in fields(KernelConfig) if f.name.startswith("prec")})


def make_inputs(B, T, H, N, decay="random", seed=0, device=DEVICE):
    """RWKV-7-like inputs (a = -kk, b = kk * iclr, unit-normal r, v, 0.3-scaled k), float64."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (B, T, H, N)
    r, k, v = randn(*shape), 0.3 * randn(*shape), randn(*shape)
    if decay == "random":
        w = W_MIN * torch.sigmoid(2 * randn(*shape))
    elif decay == "near_0.545":
        w = torch.full(shape, W_MIN * (1 - 1e-6), dtype=torch.float64)
    elif decay == "near_1":
        w = torch.full(shape, -1e-6, dtype=torch.float64)
    kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
    iclr = torch.sigmoid(randn(*shape))
    return [x.to(device) for x in (r, w, k, v, -kk, kk * iclr)]


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def run_and_grad(fn, xs, s0, gy, gs, **kw):
    """y, final state and the gradients of <y, gy> + <s, gs> w.r.t. r, w, k, v, a, b and s0."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    s0 = None if s0 is None else s0.detach().clone().requires_grad_()
    y, s = fn(*xs, s0, **kw)
    loss = (y.double() * gy).sum() + ((s.double() * gs).sum() if gs is not None else 0)
    loss.backward()
    grads = [x.grad for x in xs] + ([s0.grad] if s0 is not None else [])
    return y.detach(), s.detach(), grads


def check_against_loop(config, B, T, H, N, decay="random", with_state=True, seed=0, bf16_values=False):
    xs = make_inputs(B, T, H, N, decay, seed)
    if bf16_values:   # r, k, v, a, b as the model passes them: values that bf16 (and so tf32) holds exactly
        xs = [x if i == 1 else x.to(torch.bfloat16).double() for i, x in enumerate(xs)]
    g = torch.Generator().manual_seed(seed + 1)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=g, dtype=torch.float64).to(DEVICE) if with_state else None
    gy = torch.randn(B, T, H, N, generator=g, dtype=torch.float64).to(DEVICE)
    gs = torch.randn(B, H, N, N, generator=g, dtype=torch.float64).to(DEVICE) if with_state else None
    y_ref, s_ref, g_ref = run_and_grad(wkv7_naive, xs, s0, gy, gs)
    y, s, grads = run_and_grad(wkv7_triton, [x.float() for x in xs], None if s0 is None else s0.float(), gy, gs,
                               config=config)
    assert y.dtype == torch.float32 and s.dtype == torch.float32 and s.shape == (B, H, N, N)
    assert rel_err(y, y_ref) < CPU_TOL
    assert rel_err(s, s_ref) < CPU_TOL
    for name, gr, gr_ref in zip(["r", "w", "k", "v", "a", "b", "initial_state"], grads, g_ref):
        assert torch.isfinite(gr).all(), name
        assert rel_err(gr, gr_ref) < CPU_TOL, f"d{name}: {rel_err(gr, gr_ref):.2e}"


# N = 16 keeps the interpreter fast; on the GPU the value blocks of KernelConfig split N = 64 states.
@pytest.mark.parametrize("T,H", [(1, 1), (15, 2), (16, 1), (17, 3), (64, 2), (200, 1)])
def test_output_state_and_gradients_match_fp64_loop_for_any_length(exact_fp32, T, H):
    check_against_loop(exact_fp32, B=2, T=T, H=H, N=64 if CUDA else 16)


def test_head_size_64_with_several_heads(exact_fp32):
    check_against_loop(exact_fp32, B=1, T=40, H=2, N=64)


def test_head_size_128_in_two_value_blocks(exact_fp32):
    check_against_loop(exact_fp32, B=1, T=20, H=1, N=128)   # the forward splits S into 64-row blocks (fwd_bv)


@pytest.mark.parametrize("decay", ["near_0.545", "near_1"])
def test_decays_pinned_at_the_bounds_stay_exact(exact_fp32, decay):
    check_against_loop(exact_fp32, B=1, T=64, H=2, N=32, decay=decay)


def test_blocked_triangular_inverse_is_exact(exact_fp32):
    check_against_loop(exact_fp32, B=1, T=40, H=2, N=16, decay="near_1")


@pytest.mark.parametrize("chunk", [32, 64])
def test_longer_chunks_are_exact(exact_fp32, chunk):
    config = replace(exact_fp32, chunk=chunk)
    check_against_loop(config, B=1, T=chunk + 9, H=2, N=16, decay="near_0.545")   # two chunks, the second partial


@pytest.mark.parametrize("keep_mats", [False, True])
def test_state_split_into_blocks_of_value_rows(exact_fp32, keep_mats):
    # kept: written once, by the first block; the split backward, as the fused one keeps whole rows
    config = replace(exact_fp32, keep_mats=keep_mats, bwd="split", fwd_bv=16, dstate_bv=16)
    check_against_loop(config, B=1, T=20, H=2, N=32)


@pytest.mark.parametrize("fwd_bv", [16, 32])
def test_forward_value_blocks_with_a_partial_last_chunk(exact_fp32, fwd_bv):
    check_against_loop(replace(exact_fp32, fwd_bv=fwd_bv), B=2, T=37, H=2, N=32)   # the masks zero the last chunk


def test_split_products_are_float32_accurate_on_bf16_values(exact_fp32):
    check_against_loop(replace(exact_fp32, prec_rkv="split"), B=1, T=40, H=2, N=16, bf16_values=True)


def test_float32_inputs_get_float32_accurate_products_on_the_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the launch options a GPU would get; none is needed
    gpu = torch.device("cuda")
    defaults = KernelConfig()
    modes = {key: value for key, value in launch.settings(64, "fwd", gpu, torch.float32, defaults)[1].items()
             if key.startswith("PREC")}
    assert set(modes.values()) == {"tf32x3"}                  # the bf16-floor choices (tf32, bf16x3, split) raised
    assert launch.settings(64, "fwd", gpu, torch.bfloat16, defaults)[1]["PREC_S"] == defaults.prec_s
    exact = replace(defaults, prec="ieee")                    # and an exact mode is kept
    assert launch.settings(64, "fwd", gpu, torch.float32, exact)[1]["PREC"] == "ieee"


@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_backward_reads_the_chunk_matrices_the_forward_kept(exact_fp32, bwd):
    check_against_loop(replace(exact_fp32, keep_mats=True, bwd=bwd), B=2, T=37, H=2, N=16)


@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_backward_depends_on_the_kept_matrices_and_not_only_on_the_inputs(exact_fp32, bwd):
    config = replace(exact_fp32, keep_mats=True, bwd=bwd)
    r, w, k, v, a, b = (x.float() for x in make_inputs(1, 37, 2, 16, seed=9))
    layout = launch.Layout(1, 37, None, r.device, config.chunk)
    y, ht, states, mats = triton_op.wkv7_fwd(r, w, k, v, a, b, None, layout, config)
    assert mats is not None and mats.shape == (layout.n_slots, 2, 4, 16, 16)
    dy = torch.randn_like(y)

    def grads(m):
        return triton_op.wkv7_bwd(r, w, k, v, a, b, dy, states, m, None, False, layout, config)[:6]

    recomputed, kept, altered = grads(None), grads(mats), grads(mats * 1.01)
    for x, y_, z in zip(recomputed, kept, altered):
        assert rel_err(y_, x) < CPU_TOL         # the kept matrices are the ones the backward would compute
    assert max(rel_err(z, x) for x, z in zip(recomputed, altered)) > 1e-3   # and the backward reads them


@pytest.mark.parametrize("bwd", ["fused", "split"])
def test_fused_and_split_backward_are_exact(exact_fp32, bwd):
    check_against_loop(replace(exact_fp32, bwd=bwd), B=2, T=37, H=2, N=16, decay="near_1")


@pytest.mark.parametrize("g_resync", [1, 2])
def test_fused_backward_is_exact_where_it_computes_the_decay_product_gradient_afresh(exact_fp32, g_resync):
    config = replace(exact_fp32, bwd="fused", g_resync=g_resync)       # 3 chunks: afresh at all, or one of them
    check_against_loop(config, B=2, T=37, H=2, N=16, decay="near_1")


@pytest.mark.skipif(not CUDA, reason="the rule reads the GPU's multiprocessor count")
def test_auto_backward_is_fused_only_when_its_programs_fill_the_gpu():
    auto = KernelConfig(bwd="auto")
    slots = 2 * torch.cuda.get_device_properties(0).multi_processor_count    # two programs per multiprocessor
    gpu = torch.device("cuda")

    def fused(programs, gluon):
        return dispatch._fused_backward(programs, gpu, gluon, auto)

    assert fused(slots, False) and fused(2 * slots, False)
    assert not fused(slots // 3, False)       # most multiprocessors idle
    assert not fused(slots + 8, False)        # a second wave of 8
    # the Gluon fused backward: from a fifth of a wave on
    assert fused(slots // 3, True) and fused(slots + 8, True)
    assert not fused(slots // 8, True)


def test_without_initial_state_or_final_state_gradient(exact_fp32):
    check_against_loop(exact_fp32, B=2, T=33, H=2, N=16, with_state=False)


@pytest.mark.parametrize("chunk,keep_mats,bwd", [
    (16, False, "fused"), (16, False, "split"), (32, False, "fused"), (16, True, "fused"), (16, True, "split")])
def test_cu_seqlens_restarts_the_state_at_every_document(exact_fp32, chunk, keep_mats, bwd):
    config = replace(exact_fp32, bwd=bwd, chunk=chunk, keep_mats=keep_mats)
    lens = [5, 1, 0, 23, 16]   # a one-token and an empty document among them
    cu = torch.tensor([0] + lens).cumsum(0).to(DEVICE)
    D, T, H, N = len(lens), sum(lens), 2, 16
    xs = make_inputs(1, T, H, N, seed=3)
    g = torch.Generator().manual_seed(4)
    s0 = 0.5 * torch.randn(D, H, N, N, generator=g, dtype=torch.float64).to(DEVICE)
    gy = torch.randn(1, T, H, N, generator=g, dtype=torch.float64).to(DEVICE)
    gs = torch.randn(D, H, N, N, generator=g, dtype=torch.float64).to(DEVICE)

    def loop_per_document(r, w, k, v, a, b, s0):
        ys, ss = [], []
        for d in range(D):
            lo, hi = cu[d].item(), cu[d + 1].item()
            y, s = wkv7_naive(*(x[:, lo:hi] for x in (r, w, k, v, a, b)), s0[d:d + 1])
            ys.append(y)
            ss.append(s)
        return torch.cat(ys, 1), torch.cat(ss)

    y_ref, s_ref, g_ref = run_and_grad(loop_per_document, xs, s0, gy, gs)
    y, s, grads = run_and_grad(wkv7_triton, [x.float() for x in xs], s0.float(), gy, gs, cu_seqlens=cu,
                               config=config)
    assert s.shape == (D, H, N, N)
    assert rel_err(y, y_ref) < CPU_TOL and rel_err(s, s_ref) < CPU_TOL
    assert torch.equal(s[2], s0[2].float())   # the empty document hands its initial state straight through
    for name, gr, gr_ref in zip(["r", "w", "k", "v", "a", "b", "initial_state"], grads, g_ref):
        assert rel_err(gr, gr_ref) < CPU_TOL, f"d{name}: {rel_err(gr, gr_ref):.2e}"


def test_public_wkv7_sends_cu_seqlens_to_the_triton_kernel_when_it_is_the_backend(exact_fp32, monkeypatch):
    monkeypatch.setattr(dispatch, "_backend", lambda x: "triton")
    cu = torch.tensor([0, 1, 20], device=DEVICE)
    xs = [x.float() for x in make_inputs(1, 20, 2, 16, seed=5)]
    y, s = wkv7(*xs, output_final_state=True, cu_seqlens=cu, config=exact_fp32)
    y_ref = torch.cat([wkv7_naive(*(x[:, 0:1] for x in xs))[0], wkv7_naive(*(x[:, 1:20] for x in xs))[0]], 1)
    assert s.shape == (2, 2, 16, 16)
    assert rel_err(y, y_ref) < CPU_TOL


def test_backend_is_triton_on_cuda_and_torch_on_cpu():
    assert dispatch._backend(torch.zeros(1, 1, 1, 64)) == "torch"
    if CUDA:
        assert dispatch._backend(torch.zeros(1, 1, 1, 64, device="cuda")) == "triton"


# ---- GPU: bf16 inputs (w in float32, as the model passes it), against the float64 loop on the upcast inputs ----

def check_bf16_against_loop(B, T, H, N, decay="random", cu_seqlens=None, initial_state=True, config=None):
    xs = make_inputs(B, T, H, N, decay, seed=7, device="cuda")
    xs = [x.float() if i == 1 else x.bfloat16() for i, x in enumerate(xs)]   # i == 1: w stays float32
    D = B if cu_seqlens is None else cu_seqlens.numel() - 1
    s0 = (0.5 if initial_state else 0.0) * torch.randn(D, H, N, N, device="cuda", dtype=torch.float64)
    gy = torch.randn(B, T, H, N, device="cuda", dtype=torch.float64)
    gs = torch.randn(D, H, N, N, device="cuda", dtype=torch.float64)
    if cu_seqlens is None:
        ref_fn = wkv7_naive
    else:
        bounds = cu_seqlens.tolist()

        def ref_fn(*args):
            ys, ss = [], []
            for d, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                y, s = wkv7_naive(*(x[:, lo:hi] for x in args[:6]), args[6][d:d + 1])
                ys.append(y)
                ss.append(s)
            return torch.cat(ys, 1), torch.cat(ss)
    y_ref, s_ref, g_ref = run_and_grad(ref_fn, [x.double() for x in xs], s0, gy, gs)
    kw = {"config": config} if cu_seqlens is None else {"cu_seqlens": cu_seqlens, "config": config}
    y, s, grads = run_and_grad(wkv7_triton, xs, s0.float() if initial_state else None, gy, gs, **kw)
    floor = rel_err(y_ref.bfloat16(), y_ref)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) <= 1.2 * floor, (rel_err(y, y_ref), floor)
    assert rel_err(s, s_ref) < 1e-3
    for name, gr, gr_ref in zip(["r", "w", "k", "v", "a", "b", "initial_state"], grads, g_ref):
        assert rel_err(gr, gr_ref) < 5e-3, f"d{name}: {rel_err(gr, gr_ref):.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,H,decay", [(1, 1, "random"), (16, 1, "random"), (17, 3, "random"),
                                       (200, 4, "near_0.545"), (200, 4, "near_1"), (1000, 4, "random")])
@pytest.mark.parametrize("fwd_gluon", [True, False])
def test_bf16_on_gpu_within_the_bf16_floor(T, H, decay, fwd_gluon):
    """Both forwards: the Gluon one (bf16, N = 64) and the Triton one (every other case) write the same buffers."""
    check_bf16_against_loop(B=2, T=T, H=H, N=64, decay=decay, config=KernelConfig(fwd_gluon=fwd_gluon))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_on_gpu_without_initial_state():
    check_bf16_against_loop(B=2, T=300, H=3, N=64, initial_state=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,H,decay", [(200, 4, "near_1"), (1000, 4, "random"), (4096, 2, "random")])
@pytest.mark.parametrize("bwd_gluon", [True, False])
def test_bf16_fused_backward_on_gpu_within_the_bf16_floor(T, H, decay, bwd_gluon):
    """T = 4096: 256 chunks, where a rounding error carried from chunk to chunk adds up (dw's did, at 6.1e-3).
    Both fused backwards: the Gluon one (bf16, N = 64) and the Triton one."""
    config = KernelConfig(bwd="fused", bwd_gluon=bwd_gluon)    # at these sizes the automatic choice is split
    check_bf16_against_loop(B=2, T=T, H=H, N=64, decay=decay, config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gluon_backward_runs_where_a_block_may_have_its_shared_memory():
    """The Gluon fused backward asks for GLUON_BWD_SHARED bytes of shared memory a program: it runs on the H100
    and H200 (227 KB a block) and the A100 (163 KB); GPUs that give a block 99 KB (sm_86, sm_89) run the Triton
    backward instead of failing to launch."""
    room = {(8, 0): True, (9, 0): True, (8, 6): False, (8, 9): False}.get(torch.cuda.get_device_capability())
    if room is None:
        pytest.skip("a GPU whose shared memory per block this test does not list")
    x = torch.zeros(1, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    defaults = KernelConfig()
    assert dispatch._gluon_backward(x, x, x, x, x, x, True, defaults) == (dispatch._gluon_triton() and room)
    assert not dispatch._gluon_backward(x, x, x, x, x, x, False, defaults)        # it reads the kept matrices


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bwd", ["auto", "fused"])
def test_bf16_cu_seqlens_on_gpu(bwd):
    cu = torch.tensor([0, 1, 300, 301, 517], device="cuda", dtype=torch.int32)
    check_bf16_against_loop(B=1, T=517, H=2, N=64, cu_seqlens=cu, config=KernelConfig(bwd=bwd))


def test_every_kernel_compiles_for_hopper_with_the_installed_triton(tmp_path):
    """The GPU kernels build for an H100 (sm_90) with the Triton this project installs, no GPU needed (through
    scripts/kernel_registers.py, outside the interpreter): on a machine without CUDA only the interpreter runs the
    Triton kernels, and nothing at all runs the Gluon ones, written in an experimental Triton API that has changed
    between releases. With --cubins it also writes the Gluon kernels' machine code and launch parameters, which
    scripts/check_gluon_cubins.py runs on a GPU whose Triton is another version."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "scripts" / "kernel_registers.py"
    out = subprocess.run([sys.executable, str(script), "--cubins", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:-1]}
    assert set(rows) == {"wkv7_fwd_gluon_kernel", "wkv7_bwd_gluon_kernel", "_wkv7_fwd_kernel",
                         "_wkv7_bwd_fused_kernel", "_wkv7_bwd_state_kernel", "_wkv7_bwd_chunk_kernel"}
    assert all(int(row[6]) > 0 for row in rows.values())         # tensor-core instructions in every kernel
    assert int(rows["wkv7_bwd_gluon_kernel"][4]) == dispatch.GLUON_BWD_SHARED    # what _gluon_backward checks
    from rwkv7_kernels.wkv7 import gluon_bwd, gluon_fwd
    launches = json.loads((tmp_path / "launch.json").read_text())
    assert set(launches) == {"wkv7_fwd_gluon_kernel", "wkv7_bwd_gluon_kernel"}
    for name, info in launches.items():
        assert (tmp_path / info["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert info["shared"] == int(rows[name][4]) and info["extra_pointer_params"] >= 0
        kernel = getattr(gluon_fwd if "fwd" in name else gluon_bwd, name)   # its arguments less the constexprs
        assert info["args"] == [p.name for p in kernel.params if not p.is_constexpr]


@pytest.mark.parametrize("setting,name", [(dict(chunk=20), "kernel.chunk"), (dict(bwd="both"), "kernel.bwd"),
                                          (dict(prec_s="fp16"), "kernel.prec_s"), (dict(fwd_bv=48), "kernel.fwd_bv"),
                                          (dict(g_resync=0), "kernel.g_resync")])
def test_kernel_config_rejects_a_setting_the_kernels_do_not_take(setting, name):
    with pytest.raises(ValueError, match=name):
        KernelConfig(**setting)
