"""Fused kernels of the two-layer network f(x) = s·B σ(A x + c) (docs/design.md §1.1).

Thin wrappers over ``torch.ops.lazyfast.two_layer_*`` with their fake kernels (for
``torch.compile``) and autograd formulas; :mod:`lazyfast._engine.two_layer` applies them to a
:class:`lazyfast.models.TwoLayer`. Where no compiled kernel serves
the inputs' device (or dtype), the wrappers warn once and use the dense GEMM
formulas of :mod:`lazyfast._ops.dense`.

Differentiability: ``two_layer_jvp`` is linear in its tangents (its backward is a
VJP), ``two_layer_vjp`` is linear in its cotangent (its backward is a JVP) and
``two_layer_ntk_vp`` is linear in ``v`` (its backward is Θ(x2, x1)·g), so a
linearized two-layer model trains by autograd through the fused ops. Gradients
with respect to inputs or weights (x, A, c, B) are not supported and raise.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from lazyfast import _ext
from lazyfast._ops import dense
from lazyfast._validation import check_finite
from lazyfast.models import ACTIVATION_CODES, check_activation

_KERNEL_DTYPES = (torch.float32, torch.float64)
_PARAM_NAMES = ("hidden.weight", "hidden.bias", "output.weight")


# ----------------------------------------------------------------------------- checks
def _tensor(t, name, dim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _like(t, ref, name, shape):
    _tensor(t, name, len(shape))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but A has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but A is on {ref.device}")
    return t


def _check_weights(A, c, B, scale, activation):
    _tensor(A, "A", 2)
    m, _ = A.shape
    _tensor(B, "B", 2)
    if B.shape[1] != m or B.shape[0] < 1:
        raise ValueError(f"B must have shape (k, m) with k >= 1 and m = A.shape[0] = {m}, got {tuple(B.shape)}")
    _like(B, A, "B", B.shape)
    if c is not None:
        _like(c, A, "c", (m,))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite float, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    check_activation(activation)
    return float(scale), ACTIVATION_CODES[activation]


def _check_x(x, A, name):
    _tensor(x, name, 2)
    if x.shape[1] != A.shape[1]:
        raise ValueError(f"{name} must have shape (n, {A.shape[1]}) to match A (m, d), got {tuple(x.shape)}")
    if x.dtype != A.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but A has dtype {A.dtype}")
    if x.device != A.device:
        raise ValueError(f"{name} is on {x.device} but A is on {A.device}")


def _no_grad_wanted(op, **tensors):
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{op}: gradients with respect to {name} are not supported by the fused two-layer "
                               f"kernels; pass {name}.detach(), or use lazyfast.reference for higher derivatives")


def _use_kernels(t):
    # kernels_for warns once (and says why) when no compiled kernel serves the device.
    return t.dtype in _KERNEL_DTYPES and _ext.kernels_for(t.device) and _ext._C is not None


# ----------------------------------------------------------------------------- public ops
def two_layer_ntk(x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, A: torch.Tensor, B: torch.Tensor,
                  c: Optional[torch.Tensor] = None, scale: float, activation: str = "relu",
                  mode: str = "trace") -> torch.Tensor:
    """Empirical NTK of the two-layer network, without materializing (n, m) features.

    Θ_ab(X1, X2) = s² [δ_ab σ(Z1)σ(Z2)ᵀ + (X1X2ᵀ + 1_bias) ⊙ (σ'(Z1) diag(B_a ⊙ B_b) σ'(Z2)ᵀ)].

    Args:
        x1: (n1, d) inputs.
        x2: (n2, d) inputs, or None for x1 (then only half the tiles are multiplied).
        A: (m, d) hidden weight; B: (k, m) output weight; c: (m,) hidden bias or None.
        scale: output scale s (1/√m for the NTK scaling).
        activation: ``relu`` | ``tanh`` | ``gelu`` | ``softplus`` | ``identity``.
        mode: ``"trace"`` → (n1, n2) = (1/k)·Σ_a Θ_aa; ``"full"`` → (n1, n2, k, k).

    Returns:
        The kernel, in the inputs' dtype and device. Not differentiable.
    """
    s, code = _check_weights(A, c, B, scale, activation)
    _check_x(x1, A, "x1")
    if x2 is not None:
        _check_x(x2, A, "x2")
    if mode not in ("trace", "full"):
        raise ValueError(f"mode must be 'trace' or 'full', got {mode!r}")
    _no_grad_wanted("two_layer_ntk", x1=x1, x2=x2, A=A, c=c, B=B)
    # one fused NaN/inf check of inputs AND weights (the ReLU kernels would hide NaN weights:
    # σ'(NaN) = 0 drops them, while the model's own output is NaN)
    check_finite(x1=x1, x2=x2, A=A, c=c, B=B)
    if _use_kernels(x1):
        return torch.ops.lazyfast.two_layer_ntk(x1, x2, A, c, B, s, code, mode == "full")
    return dense.two_layer_ntk_dense(x1, x2, A, c, B, s, activation, mode)


def two_layer_jvp(x: torch.Tensor, *, A: torch.Tensor, B: torch.Tensor, c: Optional[torch.Tensor] = None,
                  scale: float, activation: str = "relu", dA: Optional[torch.Tensor] = None,
                  dc: Optional[torch.Tensor] = None, dB: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batched JVP J(w, x)·V of the two-layer network for T tangents at once.

    out[t, i, a] = s Σ_j [dB_taj σ(z_ij) + B_aj σ'(z_ij)(dA_tj·x_i + dc_tj)].

    Args:
        x: (n, d) inputs. A (m, d), B (k, m), c (m,) or None: the weights w.
        dA: (T, m, d), dc: (T, m), dB: (T, k, m) tangents; None counts as zero, at least one is needed.

    Returns:
        (T, n, k). Differentiable in dA, dc, dB (the backward is a VJP).
    """
    s, code = _check_weights(A, c, B, scale, activation)
    _check_x(x, A, "x")
    m, d = A.shape
    k = B.shape[0]
    given = [t for t in (dA, dc, dB) if t is not None]
    if not given:
        raise ValueError("two_layer_jvp needs at least one tangent: dA, dc or dB")
    first = _tensor(given[0], "dA" if dA is not None else "dc" if dc is not None else "dB")
    if first.dim() == 0:
        raise ValueError("tangents need a leading tangent dimension T")
    T = first.shape[0]
    if dA is not None:
        _like(dA, A, "dA", (T, m, d))
    if dc is not None:
        _like(dc, A, "dc", (T, m))
    if dB is not None:
        _like(dB, A, "dB", (T, k, m))
    _no_grad_wanted("two_layer_jvp", x=x, A=A, c=c, B=B)
    check_finite(x=x, A=A, c=c, B=B, dA=dA, dc=dc, dB=dB)
    if _use_kernels(x):
        return torch.ops.lazyfast.two_layer_jvp(x, A, c, B, s, code, dA, dc, dB)
    return dense.two_layer_jvp_dense(x, A, c, B, s, activation, dA, dc, dB)


def two_layer_vjp(x: torch.Tensor, r: torch.Tensor, *, A: torch.Tensor, B: torch.Tensor,
                  c: Optional[torch.Tensor] = None, scale: float,
                  activation: str = "relu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VJP J(w, x)ᵀ·r of the two-layer network.

    Args:
        x: (n, d) inputs; r: (n, k) cotangent. A (m, d), B (k, m), c (m,) or None.

    Returns:
        (dA (m, d), dc (m,), dB (k, m)): dA = s Hᵀ X, dc = s 1ᵀH, dB = s rᵀσ(Z) with
        H = (r B) ⊙ σ'(Z). ``dc`` is returned even without a bias (the gradient a bias
        at zero would get). Differentiable in r (the backward is a JVP).
    """
    s, code = _check_weights(A, c, B, scale, activation)
    _check_x(x, A, "x")
    _like(r, A, "r", (x.shape[0], B.shape[0]))
    _no_grad_wanted("two_layer_vjp", x=x, A=A, c=c, B=B)
    check_finite(x=x, r=r, A=A, c=c, B=B)
    if _use_kernels(x):
        return tuple(torch.ops.lazyfast.two_layer_vjp(x, A, c, B, s, code, r))
    return dense.two_layer_vjp_dense(x, A, c, B, s, activation, r)


def two_layer_ntk_vp(x1: torch.Tensor, v: torch.Tensor, x2: Optional[torch.Tensor] = None, *, A: torch.Tensor,
                     B: torch.Tensor, c: Optional[torch.Tensor] = None, scale: float,
                     activation: str = "relu") -> torch.Tensor:
    """Kernel-vector product Θ(x1, x2)·v without forming Θ (one VJP over x2, one JVP over x1,
    fused per chunk of neurons: O(n·m·d) work, O(chunk) memory).

    Args:
        x1: (n1, d); v: (n2, k); x2: (n2, d) or None for x1. A (m, d), B (k, m), c (m,) or None.

    Returns:
        (n1, k) with out[i, a] = Σ_{j,b} Θ(x1_i, x2_j)_ab v[j, b]. Differentiable in v.
    """
    s, code = _check_weights(A, c, B, scale, activation)
    _check_x(x1, A, "x1")
    if x2 is not None:
        _check_x(x2, A, "x2")
    n2 = (x1 if x2 is None else x2).shape[0]
    _like(v, A, "v", (n2, B.shape[0]))
    _no_grad_wanted("two_layer_ntk_vp", x1=x1, x2=x2, A=A, c=c, B=B)
    check_finite(x1=x1, x2=x2, v=v, A=A, c=c, B=B)
    if _use_kernels(x1):
        return torch.ops.lazyfast.two_layer_ntk_vp(x1, x2, A, c, B, s, code, v)
    return dense.two_layer_ntk_vp_dense(x1, x2, A, c, B, s, activation, v)


# ----------------------------------------------------------------------------- fake kernels + autograd
if _ext._C is not None:

    def _fake_weights(op, x, A, c, B, x_name="x"):
        """Shape checks of the fake kernels (torch.compile / meta tensors): the same
        contract the compiled ops enforce with TORCH_CHECK (devices, dtypes and layouts:
        :func:`lazyfast._ext.check_op_tensors`, called first by each fake kernel)."""
        torch._check(A.dim() == 2, lambda: f"{op}: A must be 2-D (m, d), got {tuple(A.shape)}")
        torch._check(B.dim() == 2 and B.shape[1] == A.shape[0],
                     lambda: f"{op}: B must be (k, m) with m = A.shape[0], got {tuple(B.shape)}")
        torch._check(c is None or (c.dim() == 1 and c.shape[0] == A.shape[0]),
                     lambda: f"{op}: c must be (m,) with m = A.shape[0]")
        torch._check(x.dim() == 2 and x.shape[1] == A.shape[1],
                     lambda: f"{op}: {x_name} must be (n, d) with d = A.shape[1] = {A.shape[1]}, got {tuple(x.shape)}")
        for name, t in (("B", B), ("c", c), (x_name, x)):
            torch._check(t is None or t.dtype == A.dtype, lambda: f"{op}: {name} must have A's dtype {A.dtype}")

    @torch.library.register_fake("lazyfast::two_layer_ntk")
    def _ntk_fake(x1, x2, A, c, B, scale, activation, full):
        _ext.check_op_tensors("two_layer_ntk", ("x1", x1), ("x2", x2), ("A", A), ("c", c), ("B", B))
        _fake_weights("two_layer_ntk", x1, A, c, B, "x1")
        if x2 is not None:
            _fake_weights("two_layer_ntk", x2, A, c, B, "x2")
        n2 = x1.shape[0] if x2 is None else x2.shape[0]
        k = B.shape[0]
        return x1.new_empty((x1.shape[0], n2, k, k) if full else (x1.shape[0], n2))

    @torch.library.register_fake("lazyfast::two_layer_jvp")
    def _jvp_fake(x, A, c, B, scale, activation, dA, dc, dB):
        _ext.check_op_tensors("two_layer_jvp", ("x", x), ("A", A), ("c", c), ("B", B), ("dA", dA), ("dc", dc),
                              ("dB", dB))
        _fake_weights("two_layer_jvp", x, A, c, B)
        given = [t for t in (dA, dc, dB) if t is not None]
        torch._check(len(given) > 0, lambda: "two_layer_jvp: needs at least one tangent: dA, dc or dB")
        T = given[0].shape[0]
        m, d = A.shape
        for name, t, shape in (("dA", dA, (T, m, d)), ("dc", dc, (T, m)), ("dB", dB, (T, B.shape[0], m))):
            torch._check(t is None or tuple(t.shape) == shape,
                         lambda: f"two_layer_jvp: {name} must have shape {shape}, got {tuple(t.shape)}")
        return x.new_empty((T, x.shape[0], B.shape[0]))

    @torch.library.register_fake("lazyfast::two_layer_vjp")
    def _vjp_fake(x, A, c, B, scale, activation, r):
        _ext.check_op_tensors("two_layer_vjp", ("x", x), ("A", A), ("c", c), ("B", B), ("r", r))
        _fake_weights("two_layer_vjp", x, A, c, B)
        torch._check(r.dim() == 2 and r.shape[0] == x.shape[0] and r.shape[1] == B.shape[0],
                     lambda: f"two_layer_vjp: r must be (n, k) = ({x.shape[0]}, {B.shape[0]}), got {tuple(r.shape)}")
        return A.new_empty(A.shape), A.new_empty((A.shape[0],)), B.new_empty(B.shape)

    @torch.library.register_fake("lazyfast::two_layer_ntk_vp")
    def _ntk_vp_fake(x1, x2, A, c, B, scale, activation, v):
        _ext.check_op_tensors("two_layer_ntk_vp", ("x1", x1), ("x2", x2), ("A", A), ("c", c), ("B", B), ("v", v))
        _fake_weights("two_layer_ntk_vp", x1, A, c, B, "x1")
        if x2 is not None:
            _fake_weights("two_layer_ntk_vp", x2, A, c, B, "x2")
        n2 = x1.shape[0] if x2 is None else x2.shape[0]
        torch._check(v.dim() == 2 and v.shape[0] == n2 and v.shape[1] == B.shape[0],
                     lambda: f"two_layer_ntk_vp: v must be (n2, k) = ({n2}, {B.shape[0]}), got {tuple(v.shape)}")
        return x1.new_empty((x1.shape[0], B.shape[0]))

    def _refuse(op, ctx, n_weights):
        # Inputs 0..n_weights-1 (x's and weights) are constants of the fused ops.
        if any(ctx.needs_input_grad[:n_weights]):
            raise RuntimeError(f"{op}: gradients with respect to the inputs or weights (x, A, c, B) are not "
                               "supported by the fused two-layer kernels")

    def _weights_setup(ctx, inputs, output):
        x, A, c, B, scale, act = inputs[:6]
        ctx.has_c = c is not None
        ctx.consts = (scale, act)
        ctx.save_for_backward(x, A, B, c if c is not None else A.new_empty(0))

    def _saved_weights(ctx):
        x, A, B, c = ctx.saved_tensors
        return x, A, c if ctx.has_c else None, B, ctx.consts[0], ctx.consts[1]

    # --- JVP: linear in (dA, dc, dB); d<G, J V>/dV = J^T G, one VJP per tangent.
    def _jvp_backward(ctx, grad):
        _refuse("two_layer_jvp", ctx, 4)
        x, A, c, B, scale, act = _saved_weights(ctx)
        gA = gc = gB = None
        need_A, need_c, need_B = ctx.needs_input_grad[6:9]
        if need_A or need_c or need_B:
            parts = [torch.ops.lazyfast.two_layer_vjp(x, A, c, B, scale, act, grad[t].contiguous())
                     for t in range(grad.shape[0])]
            if not parts:
                parts = [(A.new_zeros((0,) + A.shape), A.new_zeros((0, A.shape[0])), B.new_zeros((0,) + B.shape))]
                gA, gc, gB = parts[0]
            else:
                gA, gc, gB = (torch.stack(p) for p in zip(*parts))
        return (None, None, None, None, None, None, gA if need_A else None, gc if need_c else None,
                gB if need_B else None)

    torch.library.register_autograd("lazyfast::two_layer_jvp", _jvp_backward, setup_context=_weights_setup)

    # --- VJP: linear in r; d<(GA, Gc, GB), J^T r>/dr = J (GA, Gc, GB), one JVP.
    def _vjp_backward(ctx, gA, gc, gB):
        _refuse("two_layer_vjp", ctx, 4)
        x, A, c, B, scale, act = _saved_weights(ctx)
        gr = None
        if ctx.needs_input_grad[6]:
            tang = [None if g is None else g.unsqueeze(0).contiguous() for g in (gA, gc, gB)]
            if all(t is None for t in tang):
                gr = x.new_zeros((x.shape[0], B.shape[0]))
            else:
                gr = torch.ops.lazyfast.two_layer_jvp(x, A, c, B, scale, act, *tang)[0]
        return None, None, None, None, None, None, gr

    torch.library.register_autograd("lazyfast::two_layer_vjp", _vjp_backward, setup_context=_weights_setup)

    # --- NTK·v: linear in v; the adjoint of Θ(x1, x2) is Θ(x2, x1).
    def _ntk_vp_setup(ctx, inputs, output):
        x1, x2, A, c, B, scale, act = inputs[:7]
        ctx.has_x2, ctx.has_c, ctx.consts = x2 is not None, c is not None, (scale, act)
        empty = A.new_empty(0)
        ctx.save_for_backward(x1, x2 if x2 is not None else empty, A, c if c is not None else empty, B)

    def _ntk_vp_backward(ctx, grad):
        _refuse("two_layer_ntk_vp", ctx, 5)
        x1, x2, A, c, B = ctx.saved_tensors
        x2 = x2 if ctx.has_x2 else None
        c = c if ctx.has_c else None
        scale, act = ctx.consts
        gv = None
        if ctx.needs_input_grad[7]:
            if x2 is None:
                gv = torch.ops.lazyfast.two_layer_ntk_vp(x1, None, A, c, B, scale, act, grad.contiguous())
            else:
                gv = torch.ops.lazyfast.two_layer_ntk_vp(x2, x1, A, c, B, scale, act, grad.contiguous())
        return None, None, None, None, None, None, None, gv

    torch.library.register_autograd("lazyfast::two_layer_ntk_vp", _ntk_vp_backward, setup_context=_ntk_vp_setup)

    # --- Gram: not differentiable; say so instead of returning a silent zero.
    def _ntk_setup(ctx, inputs, output):
        pass

    def _ntk_backward(ctx, grad):
        raise RuntimeError("two_layer_ntk is not differentiable (gradients of the eNTK with respect to inputs or "
                           "weights are not implemented); use lazyfast.dense.ntk_jacobian under autograd")

    torch.library.register_autograd("lazyfast::two_layer_ntk", _ntk_backward, setup_context=_ntk_setup)
