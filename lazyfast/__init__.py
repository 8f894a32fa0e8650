"""lazyfast: fast empirical NTKs, JVPs and lazy/linearized training for PyTorch.

Public API (see README.md):
  empirical_ntk, jvp, vjp, ntk_vp   eNTK and its products, implementation="auto" picks the
                                    fused / structured / generic path (lazyfast.ntk)
  gram                              compiled Gram of flattened Jacobians (lazyfast.ops)
  TwoLayer, MLP, vgg11, resnet18    models (lazyfast.models)
  LazyModel, Linearized, FrozenPatternNet, scaled_loss, square_loss   lazy training (lazyfast.lazy)
  TrainConfig, CheckpointError      training loop with checkpoints (lazyfast.train.train)
  KernelGradientFlow, kernel_gradient_flow, kernel_regression_cg     (lazyfast.solvers)
  diagnostics, kernels, mlp, two_layer, distributed, reference       submodules
  structured, generic               the eNTK engine for any nn.Module and its generic path (docs/engine.md)
  precision                         matmul precision of the compiled ops (IEEE float32 default; opt-in TF32)
  backend_info, cuda_version        what is compiled
  checks                            NaN/inf input checks on/off (docs/contracts.md)
"""
from lazyfast._version import __version__
from lazyfast._ext import backend_info, cuda_version
from lazyfast._validation import checks
from lazyfast.models import MLP, TwoLayer, resnet18, vgg11
from lazyfast.ntk import empirical_ntk, jvp, ntk_vp, vjp
from lazyfast.ops import gram
from lazyfast import reference, kernels, mlp, two_layer, structured, generic, precision
# `lazyfast.train` stays the module (the loop is lazyfast.train.train): exporting the function
# under the same name would shadow the module for `import lazyfast.train`.
from lazyfast import diagnostics, distributed, solvers, train
from lazyfast.lazy import FrozenPatternNet, LazyModel, Linearized, scaled_loss, square_loss
from lazyfast.solvers import KernelGradientFlow, kernel_gradient_flow, kernel_regression_cg
from lazyfast.train import CheckpointError, TrainConfig
from lazyfast import selfcheck
from lazyfast.explain import Explanation, explain
from lazyfast.selfcheck import SelfCheckError
from lazyfast.rules import register_rule, registered_rules, unregister_rule


__all__ = [
    "backend_info", "cuda_version", "checks", "empirical_ntk", "jvp", "vjp", "ntk_vp", "gram",
    "TwoLayer", "MLP", "vgg11", "resnet18",
    "LazyModel", "Linearized", "FrozenPatternNet", "scaled_loss", "square_loss",
    "KernelGradientFlow", "kernel_gradient_flow", "kernel_regression_cg", "TrainConfig", "CheckpointError",
    "explain", "Explanation", "selfcheck", "SelfCheckError", "register_rule", "unregister_rule", "registered_rules",
    "reference", "kernels", "mlp", "two_layer", "structured", "generic", "precision", "diagnostics", "distributed", "solvers", "train", "__version__",
]
