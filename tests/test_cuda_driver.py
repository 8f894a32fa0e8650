"""CUDA checks of the shared tile drivers (docs/gpu.md): streams, devices, precision, grid sizes.
Skipped without a GPU and lazyfast's CUDA kernels; run by scripts/gpu_check.sh."""
from __future__ import annotations

import pytest
import torch

import lazyfast
import lazyfast.precision as P
from lazyfast._ops import two_layer as TL
from lazyfast.testing import assert_close_rel, rel_err
from two_layer_cases import inputs, make_model, weights

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and lazyfast._ext.HAS_CUDA_KERNELS),
                       reason="needs a CUDA device and lazyfast's CUDA kernels"),
]
ops = torch.ops.lazyfast


def _hadamard_factors(k, n, ws, vs, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = [torch.randn(k, n, w, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for w in ws]
    h = [torch.randn(n, v, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for v in vs]
    return d, h


def _all_ops(device, dtype):
    """Every Gram op on `device` (float64 CPU-generated data): name -> result."""
    model = make_model(6, 300, 3, "gelu", bias=True)
    A, c, B = (t.to(device=device, dtype=dtype) for t in weights(model))
    x1 = inputs(150, 6).to(device=device, dtype=dtype)
    x2 = inputs(70, 6, seed=4).to(device=device, dtype=dtype)
    out = {}
    for mode in ("trace", "full"):
        for name, xx2 in (("same", None), ("x2", x2)):
            out[f"ntk-{mode}-{name}"] = ops.two_layer_ntk(x1, xx2, A, c, B, 0.3, 3, mode == "full")
    d1, h1 = _hadamard_factors(2, 90, [5, 7], [4, 3], dtype, device)
    d2, h2 = _hadamard_factors(2, 40, [5, 7], [4, 3], dtype, device, seed=1)
    for full in (False, True):
        out[f"hadamard-{full}-sym"] = ops.hadamard_gram_sum(d1, h1, [], [], [1.5, 0.5], [1.0, 0.0], full)
        out[f"hadamard-{full}"] = ops.hadamard_gram_sum(d1, h1, d2, h2, [1.5, 0.5], [1.0, 0.0], full)
    j1, j2 = x1.repeat(1, 40), x2.repeat(1, 40)
    out["gram"] = ops.gram(j1, j2, False)
    out["gram-sym"] = ops.gram(j1, j1, False)
    out["jvp"] = ops.two_layer_jvp(x1, A, c, B, 0.3, 3, A[None] * 0.1, None, B[None])
    out["ntk_vp"] = ops.two_layer_ntk_vp(x1, x2, A, c, B, 0.3, 3, x2[:, :3].contiguous())
    return out


def test_cuda_float64_equals_cpu():
    cpu = _all_ops("cpu", torch.float64)
    gpu = _all_ops("cuda", torch.float64)
    for key, want in cpu.items():
        got = gpu[key]
        assert got.device.type == "cuda" and got.shape == want.shape, key
        assert rel_err(got.cpu(), want) < 1e-12, (key, rel_err(got.cpu(), want))


def test_cuda_non_default_stream():
    torch.cuda.synchronize()
    ref = _all_ops("cuda", torch.float64)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        # Work queued behind a long kernel on s: an op that used the default stream would race.
        big = torch.randn(4096, 4096, device="cuda", dtype=torch.float64)
        for _ in range(3):
            big = big @ big * 1e-3
        got = _all_ops("cuda", torch.float64)
    s.synchronize()
    for key, want in ref.items():
        assert torch.equal(got[key], want), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    with torch.cuda.device(0):
        got = _all_ops("cuda:1", torch.float64)
    cpu = _all_ops("cpu", torch.float64)
    for key, want in cpu.items():
        assert got[key].device == torch.device("cuda:1"), key
        assert rel_err(got[key].cpu(), want) < 1e-12, key


def _tf32_case():
    # Large d and m: plain TF32 products (10-bit mantissa) give ~1e-4..1e-3 relative error here.
    model = make_model(512, 4096, 1, "tanh", bias=True)
    A, c, B = (t.cuda().float() for t in weights(model))
    x = inputs(1024, 512).cuda().float()
    ref = TL.two_layer_ntk(x.double(), A=A.double(), B=B.double(), c=c.double(), scale=model.scale,
                           activation="tanh")
    return (x, A, c, B, model.scale), ref


def test_cuda_tf32_off_by_default_even_if_torch_allows_it():
    (x, A, c, B, s), ref = _tf32_case()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # the user's global setting
        assert P.get_matmul_precision() == "highest"
        out = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=s, activation="tanh")
        assert torch.backends.cuda.matmul.allow_tf32 is True, "the op must restore torch's setting"
        g = ops.gram(x, x, False)
        assert_close_rel(g, (x.double() @ x.double().T), torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)  # TF32 would land near 3e-4


def test_cuda_tf32_mode_reaches_cublas_and_restores():
    (x, A, c, B, s), ref = _tf32_case()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        e_hi = rel_err(TL.two_layer_ntk(x, A=A, B=B, c=c, scale=s, activation="tanh"), ref)
        with P.matmul_precision("tf32"):
            e_tf = rel_err(TL.two_layer_ntk(x, A=A, B=B, c=c, scale=s, activation="tanh"), ref)
        assert P.get_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert e_hi < 1e-5
    assert e_tf > 4 * e_hi, (e_tf, e_hi)  # the fast mode really uses TF32 (if not, it is no faster)


def test_cuda_precision_restored_when_op_throws():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError):
            ops.gram(torch.randn(3, 4, device="cuda"), torch.randn(3, 5, device="cuda"), False)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_cuda_large_grid_shapes():
    # Few rows with very many neurons (the old Gram grid failed for n1 < 16 with huge m).
    model = make_model(4, 300_000, 2, "relu", bias=True)
    A, c, B = (t.cuda() for t in weights(model))
    x = inputs(3, 4).cuda()
    for mode in ("trace", "full"):
        got = TL.two_layer_ntk(x, A=A, B=B, c=c, scale=model.scale, mode=mode)
        want = TL.two_layer_ntk(x.cpu(), A=A.cpu(), B=B.cpu(), c=c.cpu(), scale=model.scale, mode=mode)
        assert rel_err(got.cpu(), want) < 1e-12, mode
    # An output of 6000 x 6000 x 2 x 2 = 144 M entries: more than one grid of the 1-D kernels
    # (65535 * 8 blocks x 256 threads = 134 M), so the mirror's grid-stride loop is exercised.
    d1, h1 = _hadamard_factors(2, 6000, [3], [2], torch.float64, "cuda")
    got = ops.hadamard_gram_sum(d1, h1, [], [], [1.0], [0.5], True)
    gd = torch.einsum("aiw,bjw->ijab", d1[0], d1[0])
    want = gd * (h1[0] @ h1[0].T + 0.5)[:, :, None, None]
    assert rel_err(got, want) < 1e-12
    assert torch.equal(got, got.permute(1, 0, 3, 2))
