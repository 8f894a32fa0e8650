"""Kernel gradient flow (closed form) and matrix-free kernel regression.

Loss normalization (used everywhere in lazyfast): R(f) = (1/2n) Σ_i ‖f(x_i) − y_i‖².
Full-batch gradient descent with step η on a model that is linear in its parameters,
f(w) = f_0 + J(w − w0), moves the training predictions by f ← f − (η/n)·K(f − y) with
K = J Jᵀ the (nk × nk) tangent kernel. Hence, on the training set,

* gradient flow (time t = η·steps):  f_t = y + exp(−η t K/n)(f_0 − y);
* gradient descent (``steps`` steps):  f_s = y + (I − ηK/n)^s (f_0 − y);

and at test points (DESIGN §1.4)

    f_t(x) = f_0(x) + K(x, X) K⁻¹ (I − exp(−ηtK/n)) (y − f_0(X)),

where K⁻¹(I − exp(−ηtK/n)) is evaluated on the eigendecomposition of K, restricted to
its range (eigenvalues ≤ ``eig_rtol``·λ_max count as zero: those directions never move a
prediction), so it stays finite for singular K and becomes the pseudo-inverse at t = ∞:
the minimum-norm kernel interpolant.

Kernels are either (n1, n2) — the same kernel for each of the k outputs, e.g.
``empirical_ntk(mode="trace")`` of a model whose outputs share it — or full
(n1, n2, k, k) from ``mode="full"``; targets are (n, k).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from lazyfast import ntk as _ntk
from lazyfast._validation import (check_bool, check_chunk_size, check_finite, check_float, check_input, check_int,
                                  check_module, check_positive_finite)

__all__ = ["KernelGradientFlow", "kernel_gradient_flow", "CGResult", "kernel_regression_cg", "chunked_ntk_vp",
           "kernel_predict"]


# ----------------------------------------------------------------------------- helpers
def _check_tensor(t, name, dims=None, like=None, like_name="K"):
    """Floating tensor with ``dims`` dimensions, finite, and (with ``like``) on its device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    check_finite(**{name: t})
    return t


def _as_2d_targets(y, name, n, k=None, like=None, like_name="K"):
    """(n, k) targets from (n, k) or (n,) (k = 1); ``k`` checks the number of columns."""
    _check_tensor(y, name, (1, 2), like, like_name)
    y = y.unsqueeze(1) if y.dim() == 1 else y
    if y.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (one per point), got shape {tuple(y.shape)}")
    if k is not None and y.shape[1] != k:
        raise ValueError(f"{name} must have shape ({n}, {k}) (or ({n},) when k = 1), got {tuple(y.shape)}")
    return y


def _flatten_kernel(K: torch.Tensor, name: str) -> torch.Tensor:
    """(n1, n2, k, k) → (n1·k, n2·k) with row index i·k + a (matching y.reshape(-1))."""
    n1, n2, k, k2 = K.shape
    if k != k2:
        raise ValueError(f"{name} must have shape (n1, n2, k, k), got {tuple(K.shape)}")
    return K.permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)


def _check_time(t, name="t") -> float:
    v = check_float(t, name, finite=False)  # math.inf allowed; strings and bools refused
    if v < 0:
        raise ValueError(f"{name} must be >= 0 (math.inf allowed), got {t!r}")
    return v


# ----------------------------------------------------------------------------- closed form
class KernelGradientFlow:
    r"""Closed-form gradient flow / descent of the square loss with a fixed kernel.

    Args:
        K: training kernel, (n, n) shared by the k outputs, or full (n, n, k, k).
        y: training targets, (n, k) or (n,).
        f0: predictions at t = 0 on the training set (n, k); None means zero (h(w0) = 0).
        lr: step size η of the gradient descent being modelled (time t = η·steps).
        eig_rtol: eigenvalues ≤ ``eig_rtol·λ_max`` count as zero (default n·k·machine-eps).

    The eigendecomposition K = UΛUᵀ is computed once (O(n³) or O((nk)³)).
    """

    def __init__(self, K: torch.Tensor, y: torch.Tensor, f0: Optional[torch.Tensor] = None, *, lr: float = 1.0,
                 eig_rtol: Optional[float] = None):
        _check_tensor(K, "K", (2, 4))
        n = K.shape[0]
        if K.shape[1] != n:
            raise ValueError(f"K must be square over training points, got shape {tuple(K.shape)}")
        self.n = n
        self.lr = check_positive_finite(lr, "lr")
        self.y = _as_2d_targets(y, "y", n, like=K).to(K.dtype)
        self.k = self.y.shape[1]
        self.full = K.dim() == 4
        if self.full and (K.shape[2] != self.k or K.shape[3] != self.k):
            raise ValueError(f"K has shape {tuple(K.shape)}: a full kernel must be (n, n, k, k) with k = "
                             f"{self.k} (the columns of y)")
        self.f0 = torch.zeros_like(self.y) if f0 is None else _as_2d_targets(f0, "f0", n, self.k, K).to(K.dtype)
        if eig_rtol is not None:
            eig_rtol = check_float(eig_rtol, "eig_rtol", nonnegative=True, below=1.0)
        Kmat = _flatten_kernel(K, "K") if self.full else K
        # K must be symmetric up to round-off: a non-symmetric matrix is not a kernel (a K_test
        # passed as K, or a full kernel with its axes permuted), and symmetrizing it would
        # silently solve another problem.
        eps = torch.finfo(K.dtype).eps
        scale = float(Kmat.abs().max()) if Kmat.numel() else 0.0
        asym = float((Kmat - Kmat.T).abs().max()) if Kmat.numel() else 0.0
        if asym > math.sqrt(eps) * scale:
            raise ValueError(f"K is not symmetric: max |K - K^T| = {asym:.3g} vs max |K| = {scale:.3g} "
                             f"(tolerance {math.sqrt(eps):.1e} relative); a tangent kernel K(X, X) is symmetric")
        Kmat = 0.5 * (Kmat + Kmat.T)  # symmetrize round-off before eigh
        self.eigvals, self.eigvecs = torch.linalg.eigh(Kmat)
        lam_max = float(self.eigvals.max()) if self.eigvals.numel() else 0.0
        rtol = eig_rtol if eig_rtol is not None else Kmat.shape[0] * eps
        # K must be positive semi-definite up to round-off: a negative eigenvalue makes the flow
        # exp(−ηtλ/n) grow without bound (predictions like −7e10), not converge.
        lam_min = float(self.eigvals.min()) if self.eigvals.numel() else 0.0
        psd_tol = max(100.0 * Kmat.shape[0] * eps, rtol) * max(lam_max, 0.0)
        if self.eigvals.numel() and (lam_max <= 0.0 and scale > 0.0 or lam_min < -psd_tol):
            raise ValueError(f"K is not positive semi-definite: eigenvalues range over [{lam_min:.3g}, {lam_max:.3g}]; "
                             "a tangent kernel J Jᵀ has none below round-off")
        self._zero = self.eigvals <= rtol * lam_max

    def _to_vec(self, r: torch.Tensor) -> torch.Tensor:
        # full kernel: one vector (n·k,); shared kernel: k columns (n, k)
        return r.reshape(-1) if self.full else r

    def _from_vec(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(self.n, self.k)

    def _decay(self, t: float, steps: Optional[int]) -> torch.Tensor:
        """Spectral factor of the residual: exp(−ηtλ/n) (flow) or (1 − ηλ/n)^steps (GD);
        1 on the numerical null space."""
        lam = torch.where(self._zero, torch.zeros_like(self.eigvals), self.eigvals)
        if steps is not None:
            return (1.0 - self.lr * lam / self.n) ** steps
        if math.isinf(t):
            return torch.where(self._zero, torch.ones_like(lam), torch.zeros_like(lam))
        return torch.exp(-self.lr * t * lam / self.n)

    def _gain(self, t: float, steps: Optional[int]) -> torch.Tensor:
        """Spectral factor of K⁻¹(I − decay) on the range of K.

        On eigenvalues ≤ eig_rtol·λ_max it is 0 for every t: in exact arithmetic such a
        direction u has K u = 0 and K(x, X) u = 0, so it never changes a prediction, and
        with round-off eigenvalues the formula's ηt/n (its λ → 0 limit) would only amplify
        noise. So the coefficients are the minimum-norm ones, and t = ∞ is the pseudo-inverse.
        """
        lam = self.eigvals
        decay = self._decay(t, steps)
        safe = torch.where(self._zero, torch.ones_like(lam), lam)
        return torch.where(self._zero, torch.zeros_like(lam), (1.0 - decay) / safe)

    def _apply(self, spec: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        U = self.eigvecs
        if v.dim() == 1:
            return U @ (spec * (U.T @ v))
        return U @ (spec[:, None] * (U.T @ v))

    def _time(self, t, steps):
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"steps must be a non-negative int, got {steps!r}")
            return 0.0, steps
        return _check_time(t), None

    def train_predictions(self, t: float = math.inf, *, steps: Optional[int] = None) -> torch.Tensor:
        """Training-set predictions f_t (n, k) at flow time ``t`` (math.inf allowed), or after
        ``steps`` gradient-descent steps of size ``lr`` when ``steps`` is given."""
        t, steps = self._time(t, steps)
        r0 = self._to_vec(self.f0 - self.y)
        return self.y + self._from_vec(self._apply(self._decay(t, steps), r0))

    def coefficients(self, t: float = math.inf, *, steps: Optional[int] = None) -> torch.Tensor:
        """c_t = K⁻¹(I − decay_t)(y − f_0) so that f_t(x) = f_0(x) + K(x, X)·c_t: (n, k)."""
        t, steps = self._time(t, steps)
        return self._from_vec(self._apply(self._gain(t, steps), self._to_vec(self.y - self.f0)))

    def test_predictions(self, K_test: torch.Tensor, f0_test: Optional[torch.Tensor] = None, t: float = math.inf, *,
                         steps: Optional[int] = None) -> torch.Tensor:
        """Predictions at test points, (n_test, k).

        Args:
            K_test: K(x_test, X): (n_test, n), or (n_test, n, k, k) for a full kernel.
            f0_test: f_0 at the test points (n_test, k); None means zero.
            t, steps: as in :meth:`train_predictions`.
        """
        _check_tensor(K_test, "K_test", (4,) if self.full else (2,), self.eigvecs)
        if K_test.shape[1] != self.n:
            raise ValueError(f"K_test must have {self.n} columns (training points), got shape {tuple(K_test.shape)}")
        if self.full and tuple(K_test.shape[2:]) != (self.k, self.k):
            raise ValueError(f"K_test must have shape (n_test, {self.n}, {self.k}, {self.k}), got {tuple(K_test.shape)}")
        if K_test.dtype != self.eigvecs.dtype:
            raise TypeError(f"K_test has dtype {K_test.dtype} but K has dtype {self.eigvecs.dtype}")
        m = K_test.shape[0]
        c = self.coefficients(t, steps=steps)
        if self.full:
            out = (_flatten_kernel(K_test, "K_test") @ c.reshape(-1)).reshape(m, self.k)
        else:
            out = K_test @ c
        if f0_test is not None:
            out = out + _as_2d_targets(f0_test, "f0_test", m, self.k, K_test, "K_test").to(out.dtype)
        return out


def kernel_gradient_flow(K: torch.Tensor, y: torch.Tensor, t: float = math.inf, *, f0: Optional[torch.Tensor] = None,
                         K_test: Optional[torch.Tensor] = None, f0_test: Optional[torch.Tensor] = None,
                         lr: float = 1.0, steps: Optional[int] = None):
    """One-shot closed form: returns training predictions (n, k), and test predictions
    (n_test, k) as a second value when ``K_test`` is given. See :class:`KernelGradientFlow`."""
    flow = KernelGradientFlow(K, y, f0, lr=lr)
    train = flow.train_predictions(t, steps=steps)
    if K_test is None:
        return train
    return train, flow.test_predictions(K_test, f0_test, t, steps=steps)


# ----------------------------------------------------------------------------- matrix-free
def chunked_ntk_vp(model: nn.Module, x1: torch.Tensor, v: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Θ(x1, x2)·v with bounded memory: Σ_chunks VJP over x2, then one JVP per chunk of x1.

    Θv = J1 (J2ᵀ v): the parameter-space vector J2ᵀv is accumulated over chunks of x2
    (:func:`lazyfast.ntk.vjp`), then pushed through chunks of x1 (:func:`lazyfast.ntk.jvp`,
    one tangent). With ``chunk_size=None`` this is :func:`lazyfast.ntk.ntk_vp`.

    Args:
        x1: (n1, ...), v: (n2, k), x2: (n2, ...) or None for x1.
        chunk_size: samples per VJP/JVP call; peak memory is that of one call on a chunk.

    Returns:
        (n1, k).
    """
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None:
        return _ntk.ntk_vp(model, x1, v, x2)
    check_module(model)
    check_input(x1, "x1", model)
    if x2 is not None:
        check_input(x2, "x2", model, like=x1)
    x2 = x1 if x2 is None else x2
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 2 or v.shape[0] != x2.shape[0]:
        raise ValueError(f"v must have shape ({x2.shape[0]}, k), got {tuple(v.shape)}")
    if x1.shape[0] <= chunk_size and x2.shape[0] <= chunk_size:
        return _ntk.ntk_vp(model, x1, v, x2)
    g = None
    for s in range(0, x2.shape[0], chunk_size):
        gi = _ntk.vjp(model, x2[s:s + chunk_size], v[s:s + chunk_size])
        g = gi if g is None else {k: g[k] + gi[k] for k in g}
    tangents = {k: t.unsqueeze(0) for k, t in g.items()}
    outs = [_ntk.jvp(model, x1[s:s + chunk_size], tangents)[0] for s in range(0, x1.shape[0], chunk_size)]
    return torch.cat(outs) if outs else v.new_zeros((0, v.shape[1]))


@dataclass
class CGResult:
    """Result of :func:`kernel_regression_cg`.

    Attributes:
        coef: c (n, k) with (Θ + ridge·I) c ≈ b.
        iterations: CG iterations run (one Θ·v each).
        residual: final relative residual ‖b − (Θ + ridge·I)c‖_F / ‖b‖_F (recomputed
            exactly at the end, not the recursive estimate).
        converged: residual ≤ tol.
        history: relative residual estimate after each iteration.
        seconds: wall-clock time of the solve.
    """

    coef: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    history: List[float] = field(default_factory=list)
    seconds: float = 0.0


def kernel_regression_cg(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0,
                         tol: float = 1e-6, max_iter: Optional[int] = None, f0: Optional[torch.Tensor] = None,
                         chunk_size: Optional[int] = None, x0: Optional[torch.Tensor] = None,
                         progress: bool = False) -> CGResult:
    r"""Matrix-free kernel regression with the eNTK: solves (Θ + ridge·I) c = y − f0 by
    conjugate gradients, never forming the (nk × nk) kernel.

    Each iteration costs one Θ·v = J(Jᵀv): one VJP and one JVP over the training set
    (:func:`chunked_ntk_vp`, so fused kernels are used where compiled), O(n·P) time and the
    memory of one chunk. Predict with :func:`kernel_predict`: f(x*) = f0(x*) + Θ(x*, X)c.
    ``ridge = 0`` gives kernel interpolation (t = ∞ of the kernel gradient flow) when Θ is
    non-singular; when n·k exceeds the number of parameters Θ is singular and a ridge > 0 is
    needed for a well-posed system.

    Stopping rule: the relative residual ‖b − (Θ + ridge·I)c‖_F / ‖b‖_F ≤ ``tol``, or
    ``max_iter`` iterations (default 2·n·k). The reported residual is recomputed exactly.

    Args:
        model: the network (its current parameters define Θ).
        x: (n, ...) training inputs. y: (n, k) or (n,) targets.
        ridge: λ ≥ 0 added to the diagonal of Θ.
        tol: relative-residual tolerance (> 0).
        max_iter: iteration cap.
        f0: (n, k) offset subtracted from y (the model's output at init); None = 0.
        chunk_size: samples per VJP/JVP call (bounded memory for large n).
        x0: initial guess for c, (n, k).
        progress: print the residual every 10 iterations.
    """
    check_module(model)
    check_input(x, "x", model)
    n = x.shape[0]
    b = _as_2d_targets(y, "y", n, like=x, like_name="x")
    if b.dtype != x.dtype:
        raise TypeError(f"y has dtype {b.dtype} but x has dtype {x.dtype}")
    k_model = getattr(model, "out_features", None)
    if k_model is not None and b.shape[1] != k_model:
        raise ValueError(f"y must have shape ({n}, {k_model}) for this model (k = {k_model} outputs), "
                         f"got {tuple(b.shape)}")
    if f0 is not None:
        f0 = _as_2d_targets(f0, "f0", n, b.shape[1], x, "x")
        if f0.dtype != x.dtype:
            raise TypeError(f"f0 has dtype {f0.dtype} but x has dtype {x.dtype}")
        b = b - f0
    ridge = check_float(ridge, "ridge", nonnegative=True)
    tol = check_positive_finite(tol, "tol")
    chunk_size = check_chunk_size(chunk_size)
    progress = check_bool(progress, "progress")
    if max_iter is None:
        max_iter = 2 * b.numel()  # n·k in exact arithmetic; round-off costs extra iterations
    max_iter = check_int(max_iter, "max_iter", minimum=0)
    if x0 is not None:
        x0 = _as_2d_targets(x0, "x0", n, b.shape[1], x, "x")
        if x0.dtype != x.dtype:
            raise TypeError(f"x0 has dtype {x0.dtype} but x has dtype {x.dtype}")

    def A(v):
        out = chunked_ntk_vp(model, x, v, chunk_size=chunk_size)
        return out + ridge * v if ridge else out

    start = time.perf_counter()
    with torch.no_grad():
        bnorm = float(torch.linalg.vector_norm(b))
        c = torch.zeros_like(b) if x0 is None else x0.clone()
        if bnorm == 0.0:
            return CGResult(torch.zeros_like(b), 0, 0.0, True, [], time.perf_counter() - start)
        r = b - A(c) if x0 is not None else b.clone()
        p = r.clone()
        rr = float((r * r).sum())
        history: List[float] = []
        it = 0
        while it < max_iter and math.sqrt(rr) / bnorm > tol:
            Ap = A(p)
            pAp = float((p * Ap).sum())
            if pAp <= 0:  # Θ is PSD; pAp <= 0 means p is in its null space (ridge = 0)
                break
            step = rr / pAp
            c.add_(p, alpha=step)
            r.sub_(Ap, alpha=step)
            rr_new = float((r * r).sum())
            p.mul_(rr_new / rr).add_(r)
            rr = rr_new
            it += 1
            history.append(math.sqrt(rr) / bnorm)
            if progress and it % 10 == 0:
                print(f"cg iter {it}: relative residual {history[-1]:.3e}", flush=True)
        res = float(torch.linalg.vector_norm(b - A(c))) / bnorm
    return CGResult(c, it, res, res <= tol, history, time.perf_counter() - start)


def kernel_predict(model: nn.Module, x_test: torch.Tensor, x_train: torch.Tensor, coef: torch.Tensor, *,
                   f0_test: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """f(x*) = f0(x*) + Θ(x*, X)·c without forming Θ: (n_test, ...) → (n_test, k)."""
    check_module(model)
    check_input(x_test, "x_test", model)
    check_input(x_train, "x_train", model, like=x_test, like_name="x_test")
    _as_2d_targets(coef, "coef", x_train.shape[0], like=x_train, like_name="x_train")
    with torch.no_grad():
        out = chunked_ntk_vp(model, x_test, coef, x_train, chunk_size=chunk_size)
    if f0_test is not None:
        out = out + _as_2d_targets(f0_test, "f0_test", x_test.shape[0], out.shape[1], x_test, "x_test").to(out.dtype)
    return out
