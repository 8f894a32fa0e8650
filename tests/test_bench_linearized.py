"""benchmarks/bench_linearized_models.py's product count, the floor its table reports: a linearized
step does W0·a, W0·t and δW·a forward and two products backward, against one forward and two
backward for a standard step, and the counter must count every kernel those products run on
(grouped convolutions and the CPU attention kernel included)."""
import importlib.util
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_linearized_models",
                                               ROOT / "benchmarks" / "bench_linearized_models.py")
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def _count(fn, *args):
    counter = FlopCounterMode(display=False, custom_mapping=B._flop_mapping())
    with counter:
        fn(*args)
    return counter.get_total_flops()


def test_a_linearized_mlp_step_does_five_products_per_layer_where_a_standard_step_does_three():
    torch.manual_seed(0)
    n, w = 8, 16
    model = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w))
    x, y = torch.randn(n, w), torch.randn(n, w)
    one = 2 * n * w * w  # one product of a layer
    counts = {}
    for m in ("standard", "lazyfast", "torch_func"):
        step = B.make_method(m, model)
        step(x.clone(), y)  # warm; every step a new batch tensor, as in the benchmark (no cache serves it)
        counts[m] = _count(step, x.clone(), y)
    # standard: 3 forward + 3 weight gradients + 2 input gradients (x needs none)
    assert counts["standard"] == 8 * one
    # linearized: W0·a (3) + W0·t (2: the first layer's input has no tangent) + δW·a (3), then
    # δW's gradients (3) + t's (2)
    assert counts["lazyfast"] == 13 * one
    # torch's forward-mode formula multiplies the first layer's missing input tangent (zeros) by W0
    assert counts["torch_func"] == 14 * one


def test_a_grouped_convolution_backward_is_counted_per_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    fwd = 2 * 2 * 6 * 6 * 8 * 1 * 9  # n · H · W · C_out · (C_in / groups) · 3 · 3 multiply-adds, ×2
    assert _count(lambda: conv(x)) == fwd
    assert _count(lambda: conv(x).sum().backward()) == 3 * fwd  # grad-input and grad-weight: one each


def test_attention_counts_its_two_products_forward_and_four_backward():
    torch.manual_seed(0)
    b, h, L, e = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, L, e, requires_grad=True) for _ in range(3))
    fwd = 2 * (2 * b * h * L * L * e)
    assert _count(lambda: F.scaled_dot_product_attention(q, k, v)) == fwd
    assert _count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 3 * fwd
