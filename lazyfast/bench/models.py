"""The ``models`` workload of ``lazyfast bench``: eNTKs of the models users bring (tiny sizes).

lazyfast's ``empirical_ntk`` (``implementation="auto"``) against the torch.func tutorial's
method (``reference.ntk_jacobian``: vmap(jacrev) over the whole batch, J built once since
x2 = x1), on small versions of issue 14's models from :mod:`lazyfast.zoo`: an nn.Sequential
MLP (trace), a 3-output MLP (full), one Linear applied twice (weight sharing), a 3-output CNN
(full) and a 1-layer TransformerEncoder (trace). Each call returns every model's kernel
divided by the max |Θ| of that model's tutorial kernel (computed once, on first use), so the bench's agreement check (max abs difference / max abs reference) sees a 1 %
error on any one model as a 1e-2 disagreement, whatever the kernels' scales. The full-size
table is benchmarks/bench_models.py.
"""
from __future__ import annotations


import lazyfast
from lazyfast import reference, zoo
from lazyfast.bench.protocol import Case

# (zoo model, n, mode): samples follow the mlp preset's n // 16 (quick: 32, full: 64)
MODELS = (("tiny_mlp", "trace"), ("tiny_mlp_k3", "full"), ("tiny_shared", "trace"), ("tiny_cnn", "full"),
          ("tiny_transformer", "trace"), ("tiny_tokens", "trace"))


def case(p, dtype, device, func_max_bytes):
    """The case builder of workload ``models`` (:data:`lazyfast.bench.WORKLOADS`)."""
    n = max(8, p["n"] // 16)
    problems = []
    for name, mode in MODELS:
        model = zoo.build(name, dtype=dtype).to(device)
        x = zoo.inputs(name, n, dtype=dtype).to(device)
        problems.append((model, x, mode))
    scales = []

    def scale():  # max |Θ| of each model's tutorial kernel, computed once, on first use
        if not scales:
            scales.extend(float(reference.ntk_jacobian(m, x, None, mode=mode).abs().max().clamp_min(1e-300))
                          for m, x, mode in problems)
        return scales

    def each(fn):
        return lambda: tuple(fn(m, x, mode) / s for (m, x, mode), s in zip(problems, scale()))

    impls = {
        "torch.func tutorial (J once)": each(lambda m, x, mode: reference.ntk_jacobian(m, x, None, mode=mode)),
        "lazyfast": each(lambda m, x, mode: lazyfast.empirical_ntk(m, x, None, mode=mode)),
    }
    return Case(impls, note=f"{len(MODELS)} tiny models ({', '.join(f'{a} {b}' for a, b in MODELS)}), n={n}, "
                            "x2=None; each kernel scaled by its reference max")
