"""Models of the paper: the two-layer network, MLPs, and BN-free VGG-11 / ResNet-18.

All weights are drawn from N(0, 1) (times ``init_scale``) for the NTK-parametrized
models, as in the authors' two-layer experiments; the CNNs use Xavier-normal
weights and zero biases, as in the authors' CNN code.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lazyfast._validation import check_bool, check_device, check_float, check_int

ACTIVATIONS = ("identity", "relu", "tanh", "gelu", "softplus")
# Integer codes shared with csrc/include/lazyfast/activations.h.
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


def check_activation(name: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def activation_fn(name: str):
    """The torch function for an activation name (gelu is the exact erf form)."""
    check_activation(name)
    return {
        "identity": lambda z: z,
        "relu": torch.relu,
        "tanh": torch.tanh,
        "gelu": lambda z: F.gelu(z, approximate="none"),
        "softplus": F.softplus,
    }[name]


def _check_pos_int(v, name):
    return check_int(v, name, minimum=1)


def _check_dtype(dtype):
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    return dtype


class TwoLayer(nn.Module):
    r"""Two-layer network :math:`f(x) = s\,B\,\sigma(Ax + c)`, the paper's main model.

    Args:
        d: input dimension.
        m: width (number of hidden neurons).
        k: number of outputs.
        activation: ``relu`` | ``tanh`` | ``gelu`` | ``softplus`` | ``identity``.
        bias: hidden bias ``c`` (the output layer has none).
        scale: output scale ``s``: ``"ntk"`` (1/√m), ``"mean_field"`` (1/m) or a float.
        symmetric: the paper's symmetrized init: neurons ``m/2..m-1`` copy ``0..m/2-1``
            with opposite output weights, so ``f(w0, x) = 0`` exactly (``m`` even).
        init_scale: τ, multiplies every initial weight (for the ReLU net, α = τ²).

    Parameters: ``hidden.weight`` A (m, d), ``hidden.bias`` c (m,), ``output.weight`` B (k, m),
    all initialized N(0, 1)·τ. Input (n, d) → output (n, k).
    """

    def __init__(self, d: int, m: int, k: int = 1, *, activation: str = "relu", bias: bool = False,
                 scale: Union[str, float] = "ntk", symmetric: bool = False, init_scale: float = 1.0,
                 dtype=None, device=None):
        super().__init__()
        self.in_features = _check_pos_int(d, "d")
        self.width = _check_pos_int(m, "m")
        self.out_features = _check_pos_int(k, "k")
        self.activation = check_activation(activation)
        bias = check_bool(bias, "bias")
        check_device(device)
        symmetric = check_bool(symmetric, "symmetric")
        _check_dtype(dtype)
        if isinstance(scale, str):
            if scale == "ntk":
                s = 1.0 / math.sqrt(m)
            elif scale == "mean_field":
                s = 1.0 / m
            else:
                raise ValueError(f"scale must be 'ntk', 'mean_field' or a float, got {scale!r}")
        else:
            s = check_float(scale, "scale")
            if s == 0:
                raise ValueError(f"scale must be finite and non-zero, got {scale!r}")
        self.scale = s
        if symmetric and m % 2:
            raise ValueError(f"symmetric=True needs an even width m, got m={m}")
        self.symmetric = symmetric
        self.init_scale = check_float(init_scale, "init_scale", positive=True)
        self.hidden = nn.Linear(d, m, bias=bias, dtype=dtype, device=device)
        self.output = nn.Linear(m, k, bias=False, dtype=dtype, device=device)
        self.reset_parameters()

    @property
    def d(self) -> int:
        return self.in_features

    @property
    def m(self) -> int:
        return self.width

    @property
    def k(self) -> int:
        return self.out_features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        tau = self.init_scale
        for p in self.parameters():
            p.normal_().mul_(tau)
        if self.symmetric:
            h = self.width // 2
            self.hidden.weight[h:] = self.hidden.weight[:h]
            if self.hidden.bias is not None:
                self.hidden.bias[h:] = self.hidden.bias[:h]
            self.output.weight[:, h:] = -self.output.weight[:, :h]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """σ(Ax + c): (n, d) → (n, m)."""
        return activation_fn(self.activation)(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            # Evaluate the two halves with identical GEMM shapes, so that at the
            # symmetrized init they are exact negatives and f(w0, x) == 0 bit for bit
            # (one GEMM over all m neurons would sum in an order that leaves ~1e-16).
            h = self.width // 2
            A, c, B = self.hidden.weight, self.hidden.bias, self.output.weight
            act = activation_fn(self.activation)
            lo = F.linear(act(F.linear(x, A[:h], None if c is None else c[:h])), B[:, :h])
            hi = F.linear(act(F.linear(x, A[h:], None if c is None else c[h:])), B[:, h:])
            return self.scale * (lo + hi)
        return self.scale * self.output(self.features(x))

    def extra_repr(self) -> str:
        return (f"d={self.d}, m={self.m}, k={self.k}, activation={self.activation!r}, "
                f"scale={self.scale:.4g}, symmetric={self.symmetric}, init_scale={self.init_scale:g}")


class _Dense(nn.Module):
    """Linear layer with NTK (W ~ N(0,1), output scaled by 1/√fan_in) or standard
    (W ~ N(0, 1/fan_in)) parametrization. Biases start at zero."""

    def __init__(self, fan_in, fan_out, bias, parametrization, dtype=None, device=None):
        super().__init__()
        self.fan_in, self.fan_out = fan_in, fan_out
        self.parametrization = parametrization
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(fan_out, dtype=dtype, device=device)) if bias else None
        self.weight_multiplier = 1.0 / math.sqrt(fan_in) if parametrization == "ntk" else 1.0
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0 if parametrization == "ntk" else 1.0 / math.sqrt(fan_in))

    def forward(self, h):
        out = F.linear(h, self.weight) * self.weight_multiplier
        return out if self.bias is None else out + self.bias


class MLP(nn.Module):
    r"""Fully connected network ``d → widths[0] → … → widths[-1] → k``.

    Hidden layers apply ``activation``; the last layer is linear. With
    ``parametrization="ntk"`` each layer computes ``W h / √fan_in + b`` with
    ``W ~ N(0, 1)``; with ``"standard"``, ``W h + b`` with ``W ~ N(0, 1/fan_in)``.
    Biases start at 0. Layers are in ``self.layers`` (each has ``weight``,
    ``bias``, ``weight_multiplier``). Input (n, d) → output (n, k).
    """

    def __init__(self, d: int, widths: Sequence[int], k: int = 1, *, activation: str = "relu", bias: bool = True,
                 parametrization: str = "ntk", dtype=None, device=None):
        super().__init__()
        self.in_features = _check_pos_int(d, "d")
        if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple, range)):
            raise TypeError(f"widths must be a list or tuple of hidden widths (e.g. [512, 512]), got "
                            f"{type(widths).__name__} {widths!r}")
        widths = list(widths)
        for i, w in enumerate(widths):
            _check_pos_int(w, f"widths[{i}]")
        bias = check_bool(bias, "bias")
        check_device(device)
        _check_dtype(dtype)
        self.widths = widths
        self.out_features = _check_pos_int(k, "k")
        self.activation = check_activation(activation)
        if parametrization not in ("ntk", "standard"):
            raise ValueError(f"parametrization must be 'ntk' or 'standard', got {parametrization!r}")
        self.parametrization = parametrization
        dims = [d] + widths + [k]
        self.layers = nn.ModuleList(
            _Dense(dims[i], dims[i + 1], bias, parametrization, dtype=dtype, device=device) for i in range(len(dims) - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = activation_fn(self.activation)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = act(h)
        return h


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _xavier_init(module: nn.Module, gain: float) -> None:
    for mod in module.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(mod.weight, gain=gain)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class VGG11(nn.Module):
    """BN-free VGG-11 for 32×32 inputs: the standard five-pool feature stack (conv3×3
    with bias + ReLU), then ``classifier = Linear(512·width, num_classes)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 1, gain: float = 1.0):
        super().__init__()
        _check_pos_int(num_classes, "num_classes")
        _check_pos_int(in_channels, "in_channels")
        _check_pos_int(width, "width")
        check_float(gain, "gain", positive=True)
        layers, c = [], in_channels
        for v in VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v * width, 3, padding=1, bias=True), nn.ReLU()]
                c = v * width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        _xavier_init(self, gain)

    def forward(self, x):
        if x.dim() != 4 or x.shape[-2:] != (32, 32):
            raise ValueError(f"VGG11 expects inputs of shape (n, C, 32, 32), got {tuple(x.shape)}")
        return self.classifier(self.features(x).flatten(1))


def vgg11(num_classes: int = 10, in_channels: int = 3, width: int = 1, gain: float = 1.0) -> VGG11:
    """BN-free five-pool VGG-11 (Xavier-normal weights with ``gain``, zero biases)."""
    return VGG11(num_classes, in_channels, width, gain)


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """BN-free ResNet-18 for 32×32 inputs (BasicBlocks, [2, 2, 2, 2], average pool 4).

    The first stage has ``64 * width // divisor`` channels and each later stage doubles it;
    ``divisor`` (default 1) narrows every layer and must divide ``64 * width``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 1, gain: float = 1.0, *,
                 divisor: int = 1):
        super().__init__()
        _check_pos_int(num_classes, "num_classes")
        _check_pos_int(in_channels, "in_channels")
        _check_pos_int(width, "width")
        _check_pos_int(divisor, "divisor")
        check_float(gain, "gain", positive=True)
        if (64 * width) % divisor:
            raise ValueError(f"divisor must divide 64 * width = {64 * width}, got {divisor!r}")
        w = 64 * width // divisor
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                blocks.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)
        _xavier_init(self, gain)

    def forward(self, x):
        if x.dim() != 4 or x.shape[-2:] != (32, 32):
            raise ValueError(f"ResNet18 expects inputs of shape (n, C, 32, 32), got {tuple(x.shape)}")
        out = self.blocks(torch.relu(self.conv1(x)))
        out = F.avg_pool2d(out, 4).flatten(1)
        return self.classifier(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 1, gain: float = 1.0, *,
             divisor: int = 1) -> ResNet18:
    """BN-free ResNet-18 (as in the authors' code); ``divisor`` > 1 divides every width by it."""
    return ResNet18(num_classes, in_channels, width, gain, divisor=divisor)
