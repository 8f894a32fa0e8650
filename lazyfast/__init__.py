"""lazyfast: fast empirical NTKs, JVPs and lazy/linearized training for PyTorch.

See README.md. Public API:
  empirical_ntk, jvp, vjp, ntk_vp  — eNTK and its products (lazyfast.ntk)
  gram                              — compiled Gram of flattened Jacobians (lazyfast.ops)
  TwoLayer, MLP, vgg11, resnet18    — models (lazyfast.models)
  backend_info                      — what is compiled
"""
from lazyfast._ext import backend_info, cuda_version
from lazyfast.models import MLP, TwoLayer, resnet18, vgg11
from lazyfast.ntk import empirical_ntk, jvp, ntk_vp, vjp
from lazyfast.ops import gram
from lazyfast import reference

__version__ = "0.1.0"

__all__ = [
    "backend_info", "cuda_version", "empirical_ntk", "jvp", "vjp", "ntk_vp", "gram",
    "TwoLayer", "MLP", "vgg11", "resnet18", "reference", "__version__",
]

# Lazy / linearized training engine (issue 5).
# `lazyfast.train` stays the module (train loop: lazyfast.train.train); exporting the function
# under the same name would shadow it for `import lazyfast.train as t`.
from lazyfast import diagnostics, solvers, train  # noqa: E402
from lazyfast.lazy import FrozenPatternNet, LazyModel, Linearized, scaled_loss, square_loss  # noqa: E402
from lazyfast.solvers import KernelGradientFlow, kernel_gradient_flow, kernel_regression_cg  # noqa: E402
from lazyfast.train import CheckpointError, TrainConfig  # noqa: E402

__all__ += [
    "LazyModel", "Linearized", "FrozenPatternNet", "scaled_loss", "square_loss", "KernelGradientFlow",
    "kernel_gradient_flow", "kernel_regression_cg", "TrainConfig", "CheckpointError", "diagnostics", "solvers",
    "train",
]
