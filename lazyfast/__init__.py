"""lazyfast: fast empirical NTKs, JVPs and lazy/linearized training for PyTorch.

Public API (README.md, "API tour"; every name here is documented there, details in docs/guide.md):
  empirical_ntk, jvp, vjp, ntk_vp   the eNTK and its products; implementation="auto" picks the fused,
                                    structured or generic backend (lazyfast.ntk)
  explain, Explanation              which backend and per-parameter path a call would take, and why
  register_rule, unregister_rule, registered_rules   the open registry of layer rules (docs/engine.md)
  gram                              compiled Gram of flattened Jacobians
  TwoLayer, MLP, vgg11, resnet18    models of the paper (lazyfast.models)
  LazyModel, Linearized, FrozenPatternNet, scaled_loss, square_loss   lazy training (lazyfast.lazy)
  TrainConfig, CheckpointError      the training loop lazyfast.train.train, with checkpoints
  KernelGradientFlow, kernel_gradient_flow, kernel_regression_cg     kernel solvers (lazyfast.solvers)
  selfcheck, SelfCheckError         the randomized self-check of a kernel
  diagnostics, distributed, kernels, precision, reference, solvers, train   public submodules
  backend_info, cuda_version, checks   what is compiled; NaN/inf input checks on/off (docs/contracts.md)

Internals live in underscore packages (lazyfast._engine: the backends; lazyfast._ops: the compiled
ops' wrappers). The 0.1 submodules structured, generic, mlp, two_layer, ops and rules still resolve
for one release, with a FutureWarning (lazyfast._deprecated).
"""
import importlib as _importlib

from lazyfast._version import __version__
from lazyfast._ext import backend_info, cuda_version
from lazyfast._validation import checks
from lazyfast.models import MLP, TwoLayer, resnet18, vgg11
from lazyfast.ntk import empirical_ntk, jvp, ntk_vp, vjp
from lazyfast._ops.gram import gram
from lazyfast._engine.structured.rules import register_rule, registered_rules, unregister_rule
from lazyfast import reference, kernels, precision
# `lazyfast.train` stays the module (the loop is lazyfast.train.train): exporting the function
# under the same name would shadow the module for `import lazyfast.train`.
from lazyfast import diagnostics, distributed, solvers, train
from lazyfast.lazy import FrozenPatternNet, LazyModel, Linearized, scaled_loss, square_loss
from lazyfast.solvers import KernelGradientFlow, kernel_gradient_flow, kernel_regression_cg
from lazyfast.train import CheckpointError, TrainConfig
from lazyfast import selfcheck
from lazyfast.explain import Explanation, explain
from lazyfast.selfcheck import SelfCheckError
from lazyfast._deprecated import MOVED_MODULES as _MOVED


__all__ = [
    "backend_info", "cuda_version", "checks", "empirical_ntk", "jvp", "vjp", "ntk_vp", "gram",
    "TwoLayer", "MLP", "vgg11", "resnet18",
    "LazyModel", "Linearized", "FrozenPatternNet", "scaled_loss", "square_loss",
    "KernelGradientFlow", "kernel_gradient_flow", "kernel_regression_cg", "TrainConfig", "CheckpointError",
    "explain", "Explanation", "selfcheck", "SelfCheckError", "register_rule", "unregister_rule", "registered_rules",
    "reference", "kernels", "precision", "diagnostics", "distributed", "solvers", "train", "__version__",
]


def __getattr__(name: str):
    """``lazyfast.structured`` and the other 0.1 submodules: the deprecated alias module."""
    if name in _MOVED:
        return _importlib.import_module(f"lazyfast.{name}")
    raise AttributeError(f"module 'lazyfast' has no attribute {name!r}")
