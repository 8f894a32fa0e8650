"""benchmarks/bench_nt.py's product floor: its FLOP formulas against torch's own FLOP counter on the
products they describe (no neural-tangents needed)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from lazyfast import zoo


def _count(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_mlp_floor_counts_the_forward_the_backward_and_the_symmetric_grams(script_module):
    b = script_module("benchmarks/bench_nt.py")
    dims, n = [5, 7, 6, 1], 4
    Ws = [torch.randn(dims[i + 1], dims[i]) for i in range(len(dims) - 1)]
    x = torch.randn(n, dims[0])
    hs = [x]

    def forward():
        h = x
        for W in Ws:
            h = h @ W.T
            hs.append(h)

    def backward():  # cotangents at every layer's output, from the last layer's down to the first's
        d = torch.ones(n, 1)
        for W in reversed(Ws[1:]):
            d = d @ W

    def grams():  # per layer the Gram of its input and of its output cotangent, n x n each
        for i in range(len(Ws)):
            torch.randn(n, dims[i]) @ torch.randn(dims[i], n)
            torch.randn(n, dims[i + 1]) @ torch.randn(dims[i + 1], n)

    full = _count(forward) + _count(backward) + _count(grams) * (n + 1) / (2 * n)  # symmetric: n(n+1)/2 pairs
    assert b.product_flops(("mlp", dims), n) == full


def test_two_layer_and_conv_floors_count_the_forward_as_torch_does(script_module):
    b = script_module("benchmarks/bench_nt.py")
    n, d, m = 6, 5, 9
    x, W = torch.randn(n, d), torch.randn(m, d)
    gram = lambda w: _count(lambda: torch.randn(n, w) @ torch.randn(w, n)) * (n + 1) / (2 * n)  # noqa: E731
    assert b.product_flops(("two_layer", [d, m]), n) == _count(lambda: x @ W.T) + gram(d) + 2 * gram(m)
    # the CNN: its forward convs are the formula's forward term (the head and the pooling aside)
    c, k = 4, 3
    net = zoo.conv3(c, k)
    xi = torch.randn(n, 3, 8, 8)
    convs = _count(lambda: net.conv3(net.conv2(net.conv1(xi))))
    total = b.product_flops(("conv3", [3, c, 64, k]), n)
    f1, f23 = 64 * 27 * c, 2 * 64 * 9 * c * c
    assert convs == 2 * n * (f1 + f23)
    params = sum(p.numel() for p in net.parameters())
    assert total == 2.0 * (n * (f1 + f23) + k * n * f23 + k * n * (f1 + f23) + n * (n + 1) / 2 * k * params)


def test_gemm_rate_is_positive_and_finite(script_module):
    r = script_module("benchmarks/bench_nt.py").gemm_rate(torch, reps=1)
    assert 0 < r < float("inf")
