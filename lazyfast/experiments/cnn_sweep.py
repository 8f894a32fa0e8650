"""The paper's CNN claim with error bars: VGG-11 and ResNet-18 (BN-free) trained at scale α, several
seeds, η0 chosen on a held-out validation split, and the lazy limit computed three ways.

Protocol (the authors' ``cnn/train.py`` unless said): the network is centred,
h(w) = f(w, x) − f(w0, x) with a frozen copy of the initial network (:class:`lazyfast.LazyModel`),
trained on MSE(α·h, onehot)/α² (PyTorch's mean over batch × classes, no ½) by SGD with momentum
0.9, batch 128, η_e = η0/(1 + β·e) per epoch (β = 1/3), Xavier-normal weights, zero biases. Ours:

* **validation split.** ``n_val`` images held out of the *training* set; per (architecture, α) the
  η0 with the best mean final validation accuracy over the seeds is selected, and its test accuracy
  (mean ± std over seeds) is what is reported. The test set is used for nothing else.
* **seeds.** Each seed draws its own w0 and its own batch order (shared by every α and η0 of that
  seed: the runs of one seed differ only in α and η0). The data split is fixed (``data_seed``).
* **the lazy limit three ways**: the network at large α; the true linearized model
  h̄(w) = J(w0)(w − w0) (:class:`lazyfast.Linearized`) trained with the same protocol (with the
  scaled objective its predictor dynamics do not depend on α, so one run per (seed, η0) serves every
  α); and the authors' frozen-pattern surrogate (ReLU and max-pool patterns of the initial network
  with the current weights; :class:`lazyfast.FrozenPatternNet` for VGG, the same construction for the
  ResNet here), evaluated at the end of every network run.
* **precision.** ``dtype`` for every run, except the network runs with α ≥ ``float64_from_alpha``,
  which use float64: the centred output α·(f(w) − f(w0)) cancels two O(1) numbers whose difference is
  O(1/α), so float32 loses about log10(α) of its 7 digits (measured: ``scripts/size_cnn_cpu.py``).
* **divergence.** A run whose loss becomes non-finite stops at once and is marked ``diverged``
  (never selected while a finite η0 exists).

The criterion of the claim is fixed in :func:`verdict` *before* any run; it is computed from the
results, never typed. One run = one (architecture, seed, α, η0), or the linearized model for one
(architecture, seed, η0); finished runs are kept in the resumable run store, so a killed sweep
loses at most the runs in progress. ``python -m lazyfast.experiments.cnn_sweep --preset cpu --out
DIR`` runs a preset (also ``cpu``, which ``lazyfast reproduce`` does not list yet) with optional
parallel worker processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lazyfast.experiments import common, image_data

NAME = "cnn-sweep"
ARCHS = ("vgg11", "resnet18")
PRESETS = ("quick", "cpu", "cpu-vgg", "cpu-resnet", "gpu", "paper")
RUN_KINDS = ("network", "linearized")


# ----------------------------------------------------------------------------- config
@dataclass
class Config(common.ExperimentConfig):
    data: str = "auto"  # auto (CIFAR-10 with data_dir, else Fashion-MNIST) | cifar10 | fashion-mnist | synthetic
    data_dir: Optional[str] = None
    n_train: Optional[int] = None  # training images after the validation split (None: all the rest)
    n_val: int = 5000  # held out of the training set, for the η0 selection
    n_test: Optional[int] = None  # None: the whole test set
    n_train_eval: int = 2000  # training images on which the final train accuracy is measured
    data_seed: int = 0  # the subset / split (fixed across seeds)
    archs: List[str] = field(default_factory=lambda: ["vgg11", "resnet18"])
    divisors: List[int] = field(default_factory=lambda: [1, 1])  # per arch: every width divided by this
    gains: List[float] = field(default_factory=lambda: [1.0, 1.0])  # per arch: Xavier-normal gain
    epochs: List[int] = field(default_factory=lambda: [100, 100])  # per arch
    subsets: Optional[List[Optional[int]]] = None  # per arch: train on the first k of the n_train images (None: all)
    alphas: List[float] = field(default_factory=lambda: [0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 100.0, 1e3, 1e4, 1e5,
                                                         1e6, 1e7])
    lrs: List[float] = field(default_factory=lambda: [1.0, 0.1, 0.01, 0.001])  # the authors' η0 grid
    # per arch: its own α / η0 grid instead of ``alphas`` / ``lrs`` (None: the shared grid)
    arch_alphas: Optional[List[Optional[List[float]]]] = None
    arch_lrs: Optional[List[Optional[List[float]]]] = None
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 128
    momentum: float = 0.9
    beta: float = 1.0 / 3.0  # η_e = η0 / (1 + β e)
    augment: bool = True  # random crop (pad 4) + horizontal flip (the authors' schedule b)
    float64_from_alpha: float = 1e4  # network runs with α >= this use float64 (see module doc)
    linearized: bool = True  # train the true linearized model too
    eval_batch_size: int = 500
    # the criterion (fixed before the run; see verdict)
    plateau_from_alpha: float = 1e4  # α >= this: the "large-α plateau"
    margin_points: float = 3.0
    margin_stds: float = 3.0
    stability_min: float = 99.0
    seed: int = 58  # unused by the runs (each seed is in `seeds`); kept for the CLI's --seed
    dtype: str = "float32"

    @classmethod
    def paper(cls) -> "Config":
        # The authors' grid on CIFAR-10 (full widths, 100 epochs, augmentation, float64 throughout), with
        # our validation split and 3 seeds: a GPU run.
        return cls(dtype="float64", float64_from_alpha=0.0)

    @classmethod
    def quick(cls) -> "Config":
        """A 2-epoch miniature of the cpu preset (minutes on a CPU): it checks the pipeline, not the claim."""
        return cls(data="auto", n_train=256, n_val=128, n_test=256, n_train_eval=128, divisors=[16, 16],
                   gains=[math.sqrt(2.0), 1.0], epochs=[2, 2], alphas=[1.0, 1e4], lrs=[0.1, 0.01], seeds=[0, 1],
                   augment=False, eval_batch_size=256)

    @classmethod
    def gpu(cls) -> "Config":
        """The paper's scale on one GPU: CIFAR-10 (``--data-dir``), full-width VGG-11 and ResNet-18, the
        cpu presets' protocol otherwise (sized by ``scripts/size_cnn_gpu.py``, docs/figures/cnn-gpu-sizing.json)."""
        return cls(**GPU_PRESET)

    @classmethod
    def cpu(cls) -> "Config":
        """Both architectures: ``cpu-vgg`` then ``cpu-resnet`` (about 2 hours each on the 2-core machine,
        2 workers of 1 thread; sized by ``scripts/size_cnn_cpu.py``, docs/figures/cnn-cpu-sizing.json)."""
        return cls(**CPU_PRESET, **_join(CPU_VGG, CPU_RESNET))

    @classmethod
    def cpu_vgg(cls) -> "Config":
        """The VGG-11 half of ``cpu`` (its runs are the same runs: same keys in the run store)."""
        return cls(**CPU_PRESET, **CPU_VGG)

    @classmethod
    def cpu_resnet(cls) -> "Config":
        """The ResNet-18 half of ``cpu``."""
        return cls(**CPU_PRESET, **CPU_RESNET)

    def arch_settings(self) -> List[dict]:
        subsets = self.subsets if self.subsets is not None else [None] * len(self.archs)
        alphas = self.arch_alphas if self.arch_alphas is not None else [None] * len(self.archs)
        lrs = self.arch_lrs if self.arch_lrs is not None else [None] * len(self.archs)
        return [{"arch": a, "divisor": d, "gain": g, "epochs": e, "subset": k,
                 "alphas": list(self.alphas if al is None else al), "lrs": list(self.lrs if lr is None else lr)}
                for a, d, g, e, k, al, lr in zip(self.archs, self.divisors, self.gains, self.epochs, subsets,
                                                 alphas, lrs)]

    def _check_alphas(self, name: str, alphas) -> None:
        common.check_positive_list(alphas, name)
        if len(set(alphas)) != len(alphas) or list(alphas) != sorted(alphas):
            raise ValueError(f"{name} must be increasing without repeats, got {alphas!r}")
        if not any(a >= self.plateau_from_alpha for a in alphas):
            raise ValueError(f"plateau_from_alpha={self.plateau_from_alpha!r} is above every alpha of {name} "
                             f"(max {max(alphas)!r}): the large-α plateau would be empty")
        if not any(a < self.plateau_from_alpha for a in alphas):
            raise ValueError(f"every alpha of {name} is >= plateau_from_alpha={self.plateau_from_alpha!r}: there "
                             "is no non-lazy α to compare the plateau with")

    @staticmethod
    def _check_lrs(name: str, lrs) -> None:
        common.check_positive_list(lrs, name)
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"{name} must not repeat a value, got {lrs!r}")

    def validate(self) -> None:
        if not isinstance(self.archs, (list, tuple)) or not self.archs:
            raise ValueError(f"archs must be a non-empty list of {ARCHS}, got {self.archs!r}")
        for i, a in enumerate(self.archs):
            if a not in ARCHS:
                raise ValueError(f"archs[{i}] must be one of {ARCHS}, got {a!r}")
        if len(set(self.archs)) != len(self.archs):
            raise ValueError(f"archs must not repeat an architecture, got {self.archs!r}")
        for name in ("divisors", "gains", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or len(v) != len(self.archs):
                raise ValueError(f"{name} must be a list with one entry per arch ({len(self.archs)}), got {v!r}")
        for i, d in enumerate(self.divisors):
            common.check_positive(d, f"divisors[{i}]", integer=True)
            if 64 % d:
                raise ValueError(f"divisors[{i}] must divide 64 (the narrowest layer's width), got {d!r}")
        for i, e in enumerate(self.epochs):
            common.check_positive(e, f"epochs[{i}]", integer=True)
        if self.subsets is not None:
            if not isinstance(self.subsets, (list, tuple)) or len(self.subsets) != len(self.archs):
                raise ValueError(f"subsets must be None or a list with one entry per arch ({len(self.archs)}), "
                                 f"got {self.subsets!r}")
            for i, k in enumerate(self.subsets):
                if k is not None:
                    common.check_positive(k, f"subsets[{i}]", integer=True)
                    if self.n_train is not None and k > self.n_train:
                        raise ValueError(f"subsets[{i}]={k} exceeds n_train={self.n_train}")
        common.check_positive_list(self.gains, "gains")
        common.check_positive(self.plateau_from_alpha, "plateau_from_alpha")
        for name in ("arch_alphas", "arch_lrs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (list, tuple)) or len(v) != len(self.archs)):
                raise ValueError(f"{name} must be None or a list with one entry (a list or None) per arch "
                                 f"({len(self.archs)}), got {v!r}")
        self._check_alphas("alphas", self.alphas)
        self._check_lrs("lrs", self.lrs)
        for i in range(len(self.archs)):
            if self.arch_alphas is not None and self.arch_alphas[i] is not None:
                self._check_alphas(f"arch_alphas[{i}]", self.arch_alphas[i])
            if self.arch_lrs is not None and self.arch_lrs[i] is not None:
                self._check_lrs(f"arch_lrs[{i}]", self.arch_lrs[i])
        if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of ints, got {self.seeds!r}")
        for i, s in enumerate(self.seeds):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds[{i}] must be an int >= 0, got {s!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must not repeat, got {self.seeds!r}")
        for name in ("batch_size", "eval_batch_size", "n_val", "n_train_eval"):
            common.check_positive(getattr(self, name), name, integer=True)
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None:
                common.check_positive(getattr(self, name), name, integer=True)
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int):
            raise ValueError(f"data_seed must be an int, got {self.data_seed!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not (isinstance(self.float64_from_alpha, (int, float)) and self.float64_from_alpha >= 0):
            raise ValueError(f"float64_from_alpha must be a number >= 0, got {self.float64_from_alpha!r}")
        for name in ("margin_points", "margin_stds"):
            common.check_positive(getattr(self, name), name)
        if not (isinstance(self.stability_min, (int, float)) and 0 < self.stability_min <= 100):
            raise ValueError(f"stability_min must be a percentage in (0, 100], got {self.stability_min!r}")
        common.resolve_dtype(self.dtype)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.data not in ("auto", "cifar10", "fashion-mnist", "synthetic"):
            raise ValueError(f"data must be 'auto', 'cifar10', 'fashion-mnist' or 'synthetic', got {self.data!r}")


# The cpu presets: every number is checked against the measured budget in docs/figures/cnn-cpu-sizing.json
# (scripts/size_cnn_cpu.py). Shared settings, then one entry per architecture.
CPU_PRESET = dict(
    data="fashion-mnist", n_train=8000, n_val=2000, n_test=5000, n_train_eval=2000,
    alphas=[0.1, 1.0, 10.0, 100.0, 1e3, 1e4], lrs=[1.0, 0.1, 0.01, 0.001], seeds=[0, 1, 2],
    augment=False, dtype="float32", float64_from_alpha=1e4, plateau_from_alpha=1e3,
)
CPU_VGG = dict(archs=["vgg11"], divisors=[8], gains=[math.sqrt(2.0)], epochs=[12], subsets=[None],
               arch_alphas=[None], arch_lrs=[None])
# ResNet-18 (protocol fixed by the pilot runs of docs/figures/cnn-resnet-pilot.jsonl, see docs/REPRODUCTION.md):
# all 8000 training images and 24 epochs (the first ResNet protocol, 2500 images x 4 epochs, left the
# non-lazy network at ~60 % train accuracy); alpha = 100 and 1e4 dropped where the curve is flat (the
# largest alpha, 1e3, stays float32: float64_from_alpha = 1e4); eta0 in {0.1, 0.01} (the pilot: 1 diverges
# and 0.1 collapses at alpha = 0.1, 0.01 learns too slowly at alpha = 1, 0.001 slower still).
CPU_RESNET = dict(archs=["resnet18"], divisors=[8], gains=[1.0], epochs=[24], subsets=[None],
                  arch_alphas=[[0.1, 1.0, 10.0, 1e3]], arch_lrs=[[0.1, 0.01]])


# The paper's scale for one GPU: CIFAR-10 (45,000 train / 5,000 validation / 10,000 test), full widths,
# augmentation (the authors' schedule b), 3 seeds; float32 (TF32 off, see run) except alpha >= 1e4 in float64.
# The eta0 grids are the CPU pilots' (VGG-11 selected 0.01 at every alpha, ResNet-18 0.1): the authors' grid
# less 0.001 (never selected, slowest).
GPU_PRESET = dict(
    data="cifar10", n_train=None, n_val=5000, n_test=None, n_train_eval=5000, device="cuda",
    archs=["vgg11", "resnet18"], divisors=[1, 1], gains=[math.sqrt(2.0), 1.0], epochs=[30, 30], subsets=[None, None],
    alphas=[0.1, 1.0, 10.0, 100.0, 1e3, 1e4], lrs=[1.0, 0.1, 0.01], arch_alphas=[None, [0.1, 1.0, 10.0, 1e3, 1e4]],
    arch_lrs=[None, [0.1, 0.01]], seeds=[0, 1, 2], augment=True, dtype="float32", float64_from_alpha=1e4,
    plateau_from_alpha=1e3,
)


def _join(*parts: dict) -> dict:
    return {k: [v for p in parts for v in p[k]]
            for k in ("archs", "divisors", "gains", "epochs", "subsets", "arch_alphas", "arch_lrs")}


def make_config(preset: str = "cpu", **overrides) -> Config:
    """The ``preset`` config (quick | cpu | paper) with ``overrides`` (None values ignored), validated."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    cfg = getattr(Config, preset.replace("-", "_"))()
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"{NAME} has no option {bad[0]!r}; options: {sorted(names)}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- models
def make_model(arch: str, in_channels: int, num_classes: int = 10, *, divisor: int = 1, gain: float = 1.0):
    """VGG-11 / ResNet-18 (BN-free, as the authors'), full width (``lazyfast.vgg11`` / ``lazyfast.resnet18``)
    for ``divisor`` 1, else with every width divided by ``divisor``."""
    if arch == "vgg11":
        from lazyfast.experiments.cnn_alpha import make_vgg11

        return make_vgg11(in_channels, num_classes, divisor=divisor, gain=gain)
    if arch == "resnet18":
        from lazyfast.models import resnet18

        return resnet18(num_classes, in_channels, 1, gain, divisor=divisor)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def pattern_forward(model: nn.Module, x: torch.Tensor, patterns: Optional[List[torch.Tensor]] = None):
    """Runs a VGG-11 (``features`` + ``classifier``) or a ResNet-18 of this module and returns
    ``(output, patterns)``: the ReLU on/off masks and max-pool argmax positions, in layer order.
    With ``patterns`` given, those are used instead of the network's own (the frozen-pattern
    surrogate: the current weights gated by the initial network's patterns)."""
    rec: List[torch.Tensor] = []
    it = iter(patterns) if patterns is not None else None

    def relu(z):
        mask = (z > 0) if it is None else next(it)
        rec.append(mask)
        return z * mask

    if hasattr(model, "features"):
        h = x
        for layer in model.features:
            if isinstance(layer, nn.ReLU):
                h = relu(h)
            elif isinstance(layer, nn.MaxPool2d):
                if it is None:
                    h, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                          ceil_mode=layer.ceil_mode, return_indices=True)
                else:
                    idx = next(it)
                    h = h.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
                rec.append(idx)
            else:
                h = layer(h)
        return model.classifier(h.flatten(1)), rec
    h = relu(model.conv1(x))
    for b in model.blocks:
        out = b.conv2(relu(b.conv1(h)))
        h = relu(out + b.shortcut(h))
    return model.classifier(F.avg_pool2d(h, 4).flatten(1)), rec


def pattern_names(patterns: List[torch.Tensor]) -> List[str]:
    names, nr, npool = [], 0, 0
    for p in patterns:
        if p.dtype == torch.bool:
            names.append(f"relu{nr}")
            nr += 1
        else:
            names.append(f"maxpool{npool}")
            npool += 1
    return names


# ----------------------------------------------------------------------------- data
def load_data(cfg: Config) -> dict:
    """Train / validation / test split (float32 images, normalized with the training mean/std; no
    augmentation applied here). The validation images come out of the training set."""
    need = (cfg.n_train or 0) + cfg.n_val
    if cfg.data == "synthetic":
        d = image_data.synthetic_images(need or 64, cfg.n_test or 64, channels=1, seed=cfg.data_seed)
    else:
        d = image_data.load_images(cfg.data, cfg.data_dir, seed=cfg.data_seed)
    g = torch.Generator().manual_seed(int(cfg.data_seed) + 7)
    n_all = d["x_train"].shape[0]
    if cfg.n_val >= n_all:
        raise ValueError(f"n_val={cfg.n_val} leaves no training images ({d['name']} has {n_all})")
    if cfg.n_train is not None and need > n_all:
        raise ValueError(f"n_train + n_val = {need} exceeds the {n_all} training images of {d['name']}")
    perm = torch.randperm(n_all, generator=g)
    val_idx = perm[:cfg.n_val]
    tr_idx = perm[cfg.n_val:cfg.n_val + cfg.n_train] if cfg.n_train is not None else perm[cfg.n_val:]
    x_te, y_te = d["x_test"], d["y_test"]
    if cfg.n_test is not None and cfg.n_test < x_te.shape[0]:
        te = torch.randperm(x_te.shape[0], generator=g)[:cfg.n_test]
        x_te, y_te = x_te[te], y_te[te]
    x_tr = d["x_train"][tr_idx]
    mean = [float(v) for v in x_tr.mean((0, 2, 3))]
    std = [float(v) for v in x_tr.std((0, 2, 3))]
    norm = lambda x: image_data.normalize(x, mean, std)
    return {"name": d["name"], "x_train": norm(x_tr), "y_train": d["y_train"][tr_idx],
            "x_raw_train": x_tr, "mean": mean, "std": std,
            "x_val": norm(d["x_train"][val_idx]), "y_val": d["y_train"][val_idx],
            "x_test": norm(x_te), "y_test": y_te}


# ----------------------------------------------------------------------------- one run
def _mse(out, y):
    return ((out - F.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).mean()


def run_dtype(cfg: Config, kind: str, alpha: float) -> torch.dtype:
    if kind == "network" and alpha >= cfg.float64_from_alpha:
        return torch.float64
    return common.resolve_dtype(cfg.dtype)


def initial_network(cfg: Config, arch_index: int, seed: int, in_channels: int, dtype, device) -> nn.Module:
    """w0 of (arch, seed): the same for every α and η0 of that seed."""
    a = cfg.arch_settings()[arch_index]
    torch.manual_seed(1000 * int(seed) + 17 * arch_index + 1)
    net = make_model(a["arch"], in_channels, 10, divisor=a["divisor"], gain=a["gain"])
    return net.to(device=device, dtype=dtype)


@torch.no_grad()
def _accuracy(model, x, y, bs, dtype, device) -> float:
    correct = 0
    for s in range(0, x.shape[0], bs):
        out = model(x[s:s + bs].to(device, dtype))
        correct += int((out.argmax(1) == y[s:s + bs].to(device)).sum())
    return 100.0 * correct / max(1, x.shape[0])


@torch.no_grad()
def _final_network_eval(lazy, x, y, bs, dtype, device) -> dict:
    """Test accuracy of α·h, of the frozen-pattern surrogate, and the per-layer stability of
    activations (percent of test units / pooled outputs whose pattern equals the initial one)."""
    correct = correct_sur = 0
    agree: Dict[str, float] = {}
    count: Dict[str, int] = {}
    for s in range(0, x.shape[0], bs):
        xb = x[s:s + bs].to(device, dtype)
        yb = y[s:s + bs].to(device)
        out, pats = pattern_forward(lazy.model, xb)
        out0, pats0 = pattern_forward(lazy.model0, xb)
        sur, _ = pattern_forward(lazy.model, xb, patterns=pats0)
        correct += int(((out - out0).argmax(1) == yb).sum())  # argmax of α·h does not depend on α
        correct_sur += int(((sur - out0).argmax(1) == yb).sum())
        for name, p, p0 in zip(pattern_names(pats0), pats, pats0):
            agree[name] = agree.get(name, 0.0) + float((p == p0).double().sum())
            count[name] = count.get(name, 0) + p.numel()
    n = max(1, x.shape[0])
    return {"test_acc": 100.0 * correct / n, "frozen_pattern_acc": 100.0 * correct_sur / n,
            "stability": {k: 100.0 * agree[k] / max(1, count[k]) for k in agree}}


def train_run(cfg: Config, arch_index: int, seed: int, kind: str, alpha: float, lr0: float,
              data: Optional[dict] = None, max_steps: Optional[int] = None) -> dict:
    """One run of the sweep (see the module doc). ``kind``: "network" (α·h) or "linearized"
    (α = 1: its predictor dynamics do not depend on α). ``max_steps`` stops early (timing only)."""
    from lazyfast import LazyModel, Linearized

    if kind not in RUN_KINDS:
        raise ValueError(f"kind must be one of {RUN_KINDS}, got {kind!r}")
    data = data if data is not None else load_data(cfg)
    device = common.resolve_device(cfg.device)
    dtype = run_dtype(cfg, kind, alpha)
    a = cfg.arch_settings()[arch_index]
    net = initial_network(cfg, arch_index, seed, data["x_train"].shape[1], dtype, device)
    if kind == "linearized":
        alpha = 1.0
        model = LazyModel(Linearized(net, implementation="ntk", cache_size=0), 1.0, center=True)
    else:
        model = LazyModel(net, alpha, center=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr0, momentum=cfg.momentum)
    g = torch.Generator().manual_seed(1000 * int(seed) + 5)  # batch order: per seed, shared across α, η0
    n = data["x_train"].shape[0] if a["subset"] is None else min(a["subset"], data["x_train"].shape[0])
    x_tr, y_tr, x_raw = data["x_train"][:n], data["y_train"][:n], data["x_raw_train"][:n]
    hist = {"train_mse": [], "train_acc": [], "lr_schedule": []}
    t0 = time.perf_counter()
    diverged, steps = False, 0
    bar = common.progress(total=a["epochs"] * math.ceil(n / cfg.batch_size), leave=False, mininterval=2.0,
                          desc=f"{a['arch']} s{seed} {kind} α={alpha:g} η0={lr0:g}", enabled=cfg.show_progress)
    for epoch in range(a["epochs"]):
        lr = lr0 / (1.0 + cfg.beta * epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=g)
        tot, correct, seen = 0.0, 0, 0
        model.train()
        for s in range(0, n, cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            if cfg.augment:
                xb = image_data.normalize(image_data.augment(x_raw[idx], g), data["mean"], data["std"])
            else:
                xb = x_tr[idx]
            xb, yb = xb.to(device, dtype), y_tr[idx].to(device)
            out = model(xb)
            loss = _mse(out, yb) / alpha ** 2  # = MSE(h, onehot/α), the authors' loss
            lv = float(loss.detach())
            if not math.isfinite(lv):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += lv * len(idx)
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += len(idx)
            steps += 1
            bar.update(1)
            if max_steps is not None and steps >= max_steps:
                break
        if diverged:
            hist["train_mse"].append(None)
            hist["train_acc"].append(None)
            hist["lr_schedule"].append(lr)
            break
        model.eval()
        hist["train_mse"].append(tot / max(1, seen) * alpha ** 2)  # MSE(αh, onehot), comparable across α
        hist["train_acc"].append(100.0 * correct / max(1, seen))  # running, over the epoch's batches
        hist["lr_schedule"].append(lr)
        if max_steps is not None and steps >= max_steps:
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    res = {"arch": a["arch"], "seed": seed, "kind": kind, "alpha": alpha, "lr": lr0, "dtype": str(dtype)[6:],
           "diverged": diverged, "steps": steps, **hist, "train_seconds": train_seconds}
    model.eval()
    if diverged:
        res.update(final_val_acc=None, final_test_acc=None, final_train_acc=None, frozen_pattern_acc=None,
                   stability=None, relative_change=None)
    else:
        ne = min(cfg.n_train_eval, n)
        res["final_val_acc"] = _accuracy(model, data["x_val"], data["y_val"], cfg.eval_batch_size, dtype, device)
        res["final_train_acc"] = _accuracy(model, x_tr[:ne], y_tr[:ne], cfg.eval_batch_size, dtype, device)
        if kind == "network":
            ev = _final_network_eval(model, data["x_test"], data["y_test"], cfg.eval_batch_size, dtype, device)
            res["final_test_acc"] = ev["test_acc"]
            res["frozen_pattern_acc"] = ev["frozen_pattern_acc"]
            res["stability"] = ev["stability"]
            with torch.no_grad():
                w = torch.cat([p.detach().flatten() for p in model.model.parameters()])
                w0 = torch.cat([p.detach().flatten() for p in model.model0.parameters()])
            res["relative_change"] = float((w - w0).norm() / w0.norm())
        else:
            res["final_test_acc"] = _accuracy(model, data["x_test"], data["y_test"], cfg.eval_batch_size,
                                              dtype, device)
            res["frozen_pattern_acc"] = res["stability"] = None
            with torch.no_grad():
                lin = model.model
                d = torch.cat([(p - q).flatten() for p, q in zip(lin.model.parameters(), lin.model0.parameters())])
                w0 = torch.cat([q.flatten() for q in lin.model0.parameters()])
            res["relative_change"] = float(d.norm() / w0.norm())
    res["seconds"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- the sweep
def fingerprint(cfg: Config) -> str:
    """Hash of the settings that determine a run (not the grids, which only say which runs exist,
    nor the criterion, progress or evaluation batch size)."""
    exclude = ("alphas", "lrs", "arch_alphas", "arch_lrs", "seeds", "archs", "divisors", "gains", "epochs",
               "subsets", "linearized",
               "show_progress",
               "eval_batch_size", "plateau_from_alpha", "margin_points", "margin_stds", "stability_min", "seed")
    return common.fingerprint(cfg, exclude=exclude)


def run_keys(cfg: Config) -> List[Tuple[str, tuple]]:
    """Every run of the sweep as (store key, (arch_index, seed, kind, alpha, lr)), in a fixed order."""
    fp = fingerprint(cfg)
    out = []
    for ai, a in enumerate(cfg.arch_settings()):
        tag = f"{NAME}/{fp}/{a['arch']}/div={a['divisor']}/gain={a['gain']!r}/epochs={a['epochs']}"
        if a["subset"] is not None:
            tag += f"/subset={a['subset']}"
        for seed in cfg.seeds:
            for alpha in a["alphas"]:
                for lr in a["lrs"]:
                    out.append((f"{tag}/seed={seed}/alpha={alpha!r}/lr={lr!r}", (ai, seed, "network", alpha, lr)))
            if cfg.linearized:
                for lr in a["lrs"]:
                    out.append((f"{tag}/seed={seed}/linearized/lr={lr!r}", (ai, seed, "linearized", 1.0, lr)))
    return out


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None, *, shard: Tuple[int, int] = (0, 1),
        extra_stores: Tuple[common.RunStore, ...] = ()) -> dict:
    """Runs (or resumes) the sweep and returns its result dict. ``shard=(k, n)`` computes only every
    n-th run from the k-th (a worker process); runs found in ``store`` or ``extra_stores`` (other
    workers' stores) are reused, never recomputed."""
    cfg = cfg or Config.quick()
    cfg.validate()
    k, nshard = shard
    if not (isinstance(nshard, int) and nshard >= 1 and isinstance(k, int) and 0 <= k < nshard):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    store = common.RunStore() if store is None else store
    if cfg.device == "cuda":
        # α·(f(w) − f(w0)) cancels O(1) numbers to O(1/α): TF32's 10-bit mantissa would round the lazy
        # updates away (this process runs the sweep only, so the process-wide switch is what is meant)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    data = load_data(cfg)  # fails early, with how-to, when the dataset is missing
    keys = run_keys(cfg)
    runs = {}
    todo = [(i, key, spec) for i, (key, spec) in enumerate(keys) if i % nshard == k]
    for i, key, spec in common.progress(todo, desc=f"{NAME} runs", enabled=cfg.show_progress):
        found = next((s for s in (store,) + tuple(extra_stores) if key in s), None)
        if found is not None:
            runs[key] = found.get(key)
            continue
        ai, seed, kind, alpha, lr = spec
        runs[key] = store.run(key, lambda: train_run(cfg, ai, seed, kind, alpha, lr, data))
    result = {"experiment": NAME, "config": common.config_dict(cfg), "dataset": data["name"],
              "n_train": int(data["x_train"].shape[0]), "n_val": int(data["x_val"].shape[0]),
              "n_test": int(data["x_test"].shape[0])}
    if nshard > 1:
        result["shard"] = [k, nshard]
        result["runs"] = list(runs.values())
        return result
    result["runs"] = [runs[key] for key, _ in keys]
    result["summary"] = summarize(cfg, result["runs"], result["n_test"])
    result["verdict"] = verdict(cfg, result["summary"])
    return result


def estimate_seconds(cfg: Config, timings: Dict[str, dict]) -> dict:
    """Single-thread seconds of every run of ``cfg`` from measured per-unit costs.

    ``timings[arch]`` holds, in seconds: ``step_float32`` / ``step_float64`` (one training step of a
    ``batch_size`` batch of the network), ``step_linearized`` (one step of the linearized model,
    ``dtype``), ``eval_float32`` / ``eval_float64`` (one image through the centred network: the
    per-epoch validation and the final train accuracy), ``final_float32`` / ``final_float64`` (one
    test image through the final evaluation: network, initial network and surrogate) and
    ``eval_linearized`` (one image through the linearized model). Every run is counted in full
    (a diverged run stops early, so this is an upper bound)."""
    base = str(common.resolve_dtype(cfg.dtype))[6:]
    per_arch = {}
    for ai, a in enumerate(cfg.arch_settings()):
        t = timings[a["arch"]]
        n_train = cfg.n_train if a["subset"] is None else min(a["subset"], cfg.n_train)
        steps = a["epochs"] * math.ceil(n_train / cfg.batch_size)
        evals = cfg.n_val + min(cfg.n_train_eval, n_train)
        n_test = cfg.n_test
        net = 0.0
        for alpha in a["alphas"]:
            dt = str(run_dtype(cfg, "network", alpha))[6:]
            one = steps * t[f"step_{dt}"] + evals * t[f"eval_{dt}"] + n_test * t[f"final_{dt}"]
            net += one * len(a["lrs"]) * len(cfg.seeds)
        lin = 0.0
        if cfg.linearized:
            one = steps * t["step_linearized"] + (evals + n_test) * t["eval_linearized"]
            lin = one * len(a["lrs"]) * len(cfg.seeds)
        per_arch[a["arch"]] = {"network_seconds": net, "linearized_seconds": lin, "steps_per_run": steps,
                               "runs": len(a["alphas"]) * len(a["lrs"]) * len(cfg.seeds)
                               + (len(a["lrs"]) * len(cfg.seeds) if cfg.linearized else 0),
                               "dtype_base": base}
    total = sum(v["network_seconds"] + v["linearized_seconds"] for v in per_arch.values())
    return {"archs": per_arch, "total_seconds": total}


# ----------------------------------------------------------------------------- summary and criterion
def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return None, None, 0
    m = sum(ok) / len(ok)
    s = math.sqrt(sum((v - m) ** 2 for v in ok) / (len(ok) - 1)) if len(ok) > 1 else 0.0
    return m, s, len(ok)


def _select(cands: Dict[float, List[dict]]) -> Optional[float]:
    """The η0 whose runs have the best mean final validation accuracy (runs that diverged count as
    not finished; an η0 with any diverged seed loses to one with none)."""
    best, best_key = None, None
    for lr, rs in cands.items():
        m, _, cnt = _mean_std([r["final_val_acc"] for r in rs])
        if m is None:
            continue
        key = (cnt, m)
        if best_key is None or key > best_key:
            best, best_key = lr, key
    return best


def summarize(cfg: Config, runs: List[dict], n_test: int) -> dict:
    """Per architecture and α: the η0 selected on validation, and mean ± std over seeds of the test,
    validation and train accuracies, the surrogate's accuracy and the stability; the linearized model
    likewise (η0 selected on validation); and mean training curves."""
    out = {"alphas": list(cfg.alphas), "n_test": int(n_test), "archs": {}}
    for a in cfg.arch_settings():
        mine = [r for r in runs if r["arch"] == a["arch"]]
        per_alpha = []
        for alpha in a["alphas"]:
            cands = {lr: [r for r in mine if r["kind"] == "network" and r["alpha"] == alpha and r["lr"] == lr]
                     for lr in a["lrs"]}
            lr = _select(cands)
            rs = cands[lr] if lr is not None else []
            row = {"alpha": alpha, "best_lr": lr, "n_seeds": len([r for r in rs if not r["diverged"]]),
                   "diverged_lrs": [l for l, c in cands.items() if any(r["diverged"] for r in c)]}
            for key in ("final_test_acc", "final_val_acc", "final_train_acc", "frozen_pattern_acc",
                        "relative_change"):
                m, s, _ = _mean_std([r[key] for r in rs])
                row[key.replace("final_", "")] = m
                row[key.replace("final_", "") + "_std"] = s
            stab = [r["stability"] for r in rs if r["stability"]]
            if stab:
                names = list(stab[0])
                row["stability"] = {nm: _mean_std([st[nm] for st in stab])[0] for nm in names}
                row["stability_mean"] = sum(row["stability"].values()) / len(names)
                row["stability_min"] = min(row["stability"].values())
            else:
                row["stability"], row["stability_mean"], row["stability_min"] = None, None, None
            curves = [r["train_mse"] for r in rs if not r["diverged"]]
            row["train_mse_curve"] = ([_mean_std([c[e] for c in curves])[0] for e in range(len(curves[0]))]
                                      if curves else None)
            per_alpha.append(row)
        lin = None
        lin_runs = [r for r in mine if r["kind"] == "linearized"]
        if lin_runs:
            cands = {lr: [r for r in lin_runs if r["lr"] == lr] for lr in a["lrs"]}
            lr = _select(cands)
            rs = cands[lr] if lr is not None else []
            lin = {"best_lr": lr, "n_seeds": len([r for r in rs if not r["diverged"]])}
            for key in ("final_test_acc", "final_val_acc", "final_train_acc"):
                m, s, _ = _mean_std([r[key] for r in rs])
                lin[key.replace("final_", "")] = m
                lin[key.replace("final_", "") + "_std"] = s
            curves = [r["train_mse"] for r in rs if not r["diverged"]]
            lin["train_mse_curve"] = ([_mean_std([c[e] for c in curves])[0] for e in range(len(curves[0]))]
                                      if curves else None)
        out["archs"][a["arch"]] = {"settings": a, "per_alpha": per_alpha, "linearized": lin,
                                   "seconds": sum(r["seconds"] for r in mine)}
    return out


CRITERION = (
    "Fixed before the run. Per architecture, with per-α test accuracy = mean over seeds at the η0 selected "
    "on validation, σ = its seed std (ddof 1): (1) the best α (highest mean VALIDATION accuracy among "
    "α < plateau_from_alpha) has a test accuracy above the large-α plateau (mean test accuracy over "
    "α >= plateau_from_alpha) by more than margin_points (3) points AND by more than margin_stds (3) "
    "times the larger of the two σ (σ of the plateau = the largest σ over its α); (2) accuracy does not "
    "increase with α beyond the best α: for consecutive α_k < α_k+1 from the best α on, "
    "acc(α_k+1) - acc(α_k) <= max(σ_k, σ_k+1) + 100/n_test; (3) the linearized model matches the "
    "network at the largest α: |acc_lin - acc_net(α_max)| <= max(σ_lin, σ_net) + 100/n_test (one test "
    "image of resolution); (4) activation stability at the largest α is >= stability_min (99 %) in every "
    "layer. The claim holds for an architecture when (1)-(4) all hold. The frozen-pattern surrogate at "
    "α_max is compared with the same tolerance as (3) and reported, but is not part of the claim."
)


def verdict(cfg: Config, summary: dict) -> dict:
    """The criterion of :data:`CRITERION`, computed from the summary (None where a value is missing)."""
    res = {"criterion": CRITERION, "archs": {}}
    for arch, s in summary["archs"].items():
        rows = s["per_alpha"]
        resolution = 100.0 / summary["n_test"]  # one test image, in points
        v = {}
        lazy_rows = [r for r in rows if r["alpha"] >= cfg.plateau_from_alpha]
        cand = [r for r in rows if r["alpha"] < cfg.plateau_from_alpha and r["val_acc"] is not None]
        plateau = [r["test_acc"] for r in lazy_rows if r["test_acc"] is not None]
        if not cand or len(plateau) != len(lazy_rows):
            v.update(holds=False, reason="missing runs (a whole α diverged or is not finished)")
            res["archs"][arch] = v
            continue
        best = max(cand, key=lambda r: r["val_acc"])
        plat_mean = sum(plateau) / len(plateau)
        plat_std = max(r["test_acc_std"] for r in lazy_rows)
        gap = best["test_acc"] - plat_mean
        sigma = max(best["test_acc_std"], plat_std)
        c1 = gap > cfg.margin_points and gap > cfg.margin_stds * sigma
        steps = []
        i0 = rows.index(best)
        c2 = True
        for r0, r1 in zip(rows[i0:], rows[i0 + 1:]):
            if r0["test_acc"] is None or r1["test_acc"] is None:
                c2 = False
                continue
            inc = r1["test_acc"] - r0["test_acc"]
            tol = max(r0["test_acc_std"], r1["test_acc_std"]) + resolution
            steps.append({"from": r0["alpha"], "to": r1["alpha"], "increase": inc, "tolerance": tol})
            c2 = c2 and inc <= tol
        last = rows[-1]
        lin = s["linearized"]
        if lin is None or lin["test_acc"] is None:
            c3, lin_diff, lin_tol = None, None, None
        else:
            lin_diff = lin["test_acc"] - last["test_acc"]
            lin_tol = max(lin["test_acc_std"], last["test_acc_std"]) + resolution
            c3 = abs(lin_diff) <= lin_tol
        if last["frozen_pattern_acc"] is None:
            sur_ok, sur_diff, sur_tol = None, None, None
        else:
            sur_diff = last["frozen_pattern_acc"] - last["test_acc"]
            sur_tol = max(last["frozen_pattern_acc_std"], last["test_acc_std"]) + resolution
            sur_ok = abs(sur_diff) <= sur_tol
        c4 = last["stability_min"] is not None and last["stability_min"] >= cfg.stability_min
        v.update(
            best_alpha=best["alpha"], best_lr=best["best_lr"], best_test_acc=best["test_acc"],
            best_test_acc_std=best["test_acc_std"], best_train_acc=best["train_acc"],
            best_val_acc=best["val_acc"], plateau_alphas=[r["alpha"] for r in lazy_rows],
            plateau_test_acc=plat_mean, plateau_std=plat_std, gap_points=gap, gap_in_sigmas=(gap / sigma if sigma > 0
                                                                                              else None),
            c1_gap=c1, monotone_steps=steps, c2_no_increase_beyond_best=c2,
            alpha_max=last["alpha"], network_at_alpha_max=last["test_acc"], network_at_alpha_max_std=last["test_acc_std"],
            linearized_test_acc=None if lin is None else lin["test_acc"],
            linearized_test_acc_std=None if lin is None else lin["test_acc_std"],
            linearized_minus_network=lin_diff, linearized_tolerance=lin_tol, c3_linearized_matches=c3,
            surrogate_at_alpha_max=last["frozen_pattern_acc"], surrogate_minus_network=sur_diff,
            surrogate_tolerance=sur_tol, surrogate_matches=sur_ok,
            stability_min_at_alpha_max=last["stability_min"], c4_stability=c4,
            lazy_limit_three_agree=(bool(c3) and bool(sur_ok)) if (c3 is not None and sur_ok is not None) else None,
        )
        v["holds"] = bool(c1 and c2 and c3 and c4)
        res["archs"][arch] = v
    res["holds_all"] = all(v.get("holds") for v in res["archs"].values())
    return res


# ----------------------------------------------------------------------------- text and table rows
def _f(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def table_rows(result: dict) -> List[str]:
    """Markdown rows (one per architecture) for the summary tables of README / REPRODUCTION, from a
    result dict (results.json) — never typed by hand."""
    rows = []
    n = result.get("n_test")
    for arch, v in result["verdict"]["archs"].items():
        st = result["summary"]["archs"][arch]["settings"]
        if "best_alpha" not in v:
            rows.append(f"| `{NAME}` {arch} | {result.get('preset', '?')} | – | {v.get('reason', '')} | no |")
            continue
        rows.append(
            f"| `{NAME}` {arch} (÷{st['divisor']} widths, {st['epochs']} epochs, {result['dataset']} "
            f"{st.get('subset') or result['n_train']} train / {n} test, {len(result['config']['seeds'])} seeds) "
            f"| {result.get('preset', '?')} "
            f"| best non-lazy > large-α plateau by > {result['config']['margin_points']:g} pt and > "
            f"{result['config']['margin_stds']:g}σ; no rise beyond best α; linearized = network at large α; "
            f"stability ≥ {result['config']['stability_min']:g} % "
            f"| α = {v['best_alpha']:g}: {_f(v['best_test_acc'])} ± {_f(v['best_test_acc_std'], '{:.2f}')} % test "
            f"({_f(v['best_train_acc'])} % train) vs plateau {_f(v['plateau_test_acc'])} ± "
            f"{_f(v['plateau_std'], '{:.2f}')} % (gap {_f(v['gap_points'])} pt = "
            f"{_f(v['gap_in_sigmas'])}σ); linearized {_f(v['linearized_test_acc'])} vs network "
            f"{_f(v['network_at_alpha_max'])} % at α = {v['alpha_max']:g}; surrogate "
            f"{_f(v['surrogate_at_alpha_max'])} %; stability ≥ {_f(v['stability_min_at_alpha_max'], '{:.2f}')} % "
            f"| {'yes' if v['holds'] else 'no'} |")
    return rows


def per_alpha_table(result: dict, arch: str) -> List[str]:
    """Markdown table of the per-α results of one architecture."""
    s = result["summary"]["archs"][arch]
    rows = s["per_alpha"]
    head = "| α | " + " | ".join(f"{r['alpha']:g}" for r in rows) + " | linearized |"
    lin = s["linearized"] or {}
    lines = [head, "|---" * (len(rows) + 2) + "|"]

    def line(label, key, fmt="{:.1f}", std=True, lin_key=None):
        cells = []
        for r in rows:
            v = r.get(key)
            c = _f(v, fmt)
            if std and v is not None and r.get(key + "_std") is not None:
                c += " ± " + _f(r[key + "_std"], "{:.1f}")
            cells.append(c)
        lv = lin.get(lin_key) if lin_key else None
        lc = _f(lv, fmt) + (" ± " + _f(lin.get(lin_key + "_std"), "{:.1f}") if lv is not None and std else "") \
            if lin_key else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {lc} |")

    line("test accuracy (%)", "test_acc", lin_key="test_acc")
    line("validation accuracy (%)", "val_acc", lin_key="val_acc")
    line("train accuracy (%)", "train_acc", lin_key="train_acc")
    line("frozen-pattern surrogate (%)", "frozen_pattern_acc")
    line("stability, worst layer (%)", "stability_min", "{:.2f}", std=False)
    line("‖w − w0‖/‖w0‖", "relative_change", "{:.2g}", std=False)
    lines.append("| η0 selected on validation | " + " | ".join(_f(r["best_lr"], "{:g}") for r in rows)
                 + f" | {_f(lin.get('best_lr'), '{:g}')} |")
    return lines


def gpu_sizing_table(res: dict) -> str:
    """The markdown of the `gpu` preset's size and time (docs/REPRODUCTION.md), from the JSON written by
    ``scripts/size_cnn_gpu.py``."""
    lines = [f"`gpu` preset on one GPU ({res['rates_kind']} rates: "
             + ", ".join(f"{k} {v['float32']:.1f} / {v['float64']:.1f} TFLOP/s in float32 / float64"
                         for k, v in res["rates"].items())
             + f"; FLOPs counted by {res['counter']}; commit {res['machine']['commit']}):", "",
             "| network | parameters | runs | epochs | steps / run | step FLOPs (batch 128) | GPU hours |",
             "|---|---|---|---|---|---|---|"]
    for arch, v in res["size"]["archs"].items():
        lines.append(f"| {arch} | {v['parameters']:,} | {v['runs']} | {v['epochs']} | {v['steps_per_run']} | "
                     f"{res['flops'][arch]['step_flops'] / 1e9:.0f} G | {v['gpu_hours']:.1f} |")
    lines.append(f"| **all** | | | | | | **{res['size']['total_gpu_hours']:.1f}** |")
    return "\n".join(lines)


def report_markdown(result: dict) -> str:
    """The markdown that docs/REPRODUCTION.md shows for a finished sweep, generated from results.json:
    the summary-table rows, one per-α table per architecture and the verdict."""
    lines = ["Summary rows (README / REPRODUCTION summary table):", ""] + table_rows(result) + [""]
    m = result.get("machine", {})
    secs = [r.get("seconds") for r in result.get("runs", []) if isinstance(r, dict) and r.get("seconds") is not None]
    lines.append(f"Run: `{result.get('preset')}` preset, {len(secs)} runs, {sum(secs) / 3600:.2f} h of compute in all "
                 f"(each run's own time, one torch thread each; {result.get('wall_seconds', 0):.0f} s wall for the "
                 f"process that collected them) on "
                 f"{m.get('host', '?')} ({m.get('cpus', '?')} cores, {m.get('threads', '?')} thread(s) per process, "
                 f"load average at the end {(m.get('loadavg_at_end') or ['?'])[0]}), {m.get('date_utc', '?')} UTC; "
                 f"{result['dataset']}, {result['n_train']} train / {result['n_val']} validation / "
                 f"{result['n_test']} test images.")
    for arch in result["summary"]["archs"]:
        v = result["verdict"]["archs"][arch]
        lines += ["", f"**{arch}** (mean ± std over seeds; η0 selected on validation):", ""]
        lines += per_alpha_table(result, arch)
        checks = ("c1_gap", "c2_no_increase_beyond_best", "c3_linearized_matches", "c4_stability")
        lines += ["", f"Criterion: " + ", ".join(f"{c} = {v.get(c)}" for c in checks)
                  + f" → the claim {'holds' if v.get('holds') else 'does not hold'} for {arch}; the three lazy "
                    f"limits agree: {v.get('lazy_limit_three_agree')}."]
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    lines = [f"== {NAME} ({result.get('preset', '?')} preset, {result.get('wall_seconds', float('nan')):.0f} s): "
             f"{result['dataset']}, {result['n_train']} train / {result['n_val']} val / {result['n_test']} test =="]
    if "verdict" not in result:
        return lines[0] + f"\n  shard {result.get('shard')}: {len(result['runs'])} runs"
    for arch in result["summary"]["archs"]:
        lines.append(f"-- {arch}")
        lines += ["  " + ln for ln in per_alpha_table(result, arch)]
        v = result["verdict"]["archs"][arch]
        lines.append(f"  claim holds: {v.get('holds')}  " + ", ".join(
            f"{k}={v.get(k)}" for k in ("c1_gap", "c2_no_increase_beyond_best", "c3_linearized_matches",
                                        "c4_stability", "lazy_limit_three_agree")))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def _other_stores(out: str, mine: str) -> Tuple[common.RunStore, ...]:
    """Read-only views of every run store already in ``out`` other than ``mine`` (runs.jsonl and the
    shard stores of any earlier worker count), so no finished run is ever computed twice."""
    import glob

    paths = sorted(glob.glob(os.path.join(out, "runs.jsonl")) + glob.glob(os.path.join(out, "runs.shard*of*.jsonl")))
    return tuple(common.RunStore(p) for p in paths if os.path.abspath(p) != os.path.abspath(mine))


def _store_paths(out: str, nshard: int) -> List[str]:
    return [os.path.join(out, "runs.jsonl")] + [os.path.join(out, f"runs.shard{k}of{nshard}.jsonl")
                                                 for k in range(nshard) if nshard > 1]


def reproduce(preset: str = "cpu", out: Optional[str] = None, *, workers: int = 1, threads: int = 1,
              plot: bool = True, **overrides) -> dict:
    """Runs (or resumes) a preset into ``out``: ``workers`` processes of ``threads`` torch threads
    each compute every ``workers``-th run into their own store ``out/runs.shardKofN.jsonl``; then this
    process collects every store (computing in ``out/runs.jsonl`` whatever is still missing) and writes
    ``results.json`` and the figures. Rerunning the same command resumes."""
    cfg = make_config(preset, **overrides)
    common.check_positive(workers, "workers", integer=True)
    common.check_positive(threads, "threads", integer=True)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    extra = ()
    if out and workers > 1:
        os.makedirs(out, exist_ok=True)
        procs = []
        for k in range(workers):
            args = [sys.executable, "-m", "lazyfast.experiments.cnn_sweep", "--preset", preset, "--out", out,
                    "--shard", f"{k}/{workers}", "--threads", str(threads)]
            for key, val in overrides.items():
                if val is not None:
                    args += ["--set", f"{key}={json.dumps(val)}"]
            log = open(os.path.join(out, f"worker{k}.log"), "a", encoding="utf-8")
            procs.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log))
        codes = []
        for p, log in procs:
            codes.append(p.wait())
            log.close()
        if any(codes):
            raise RuntimeError(f"{NAME}: worker exit codes {codes}; see {out}/worker*.log (rerun to resume)")
    if out:
        extra = _other_stores(out, os.path.join(out, "runs.jsonl"))
    store = common.RunStore(os.path.join(out, "runs.jsonl") if out else None)
    result = run(cfg, store, extra_stores=extra)
    result["preset"] = preset
    result["wall_seconds"] = time.perf_counter() - t0
    result["machine"] = _machine()
    if out:
        os.makedirs(out, exist_ok=True)
        files = []
        if plot:
            from lazyfast.experiments import plots

            files = [plots.plot_cnn_sweep(result, os.path.join(out, f"{NAME}.png"))]
        result["files"] = [os.path.relpath(p, out) for p in files]
        tmp = os.path.join(out, "results.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(common.json_safe(result), f, indent=1, allow_nan=False)
        os.replace(tmp, os.path.join(out, "results.json"))
    return result


def _machine() -> dict:
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg_at_end": load,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazyfast.experiments.cnn_sweep",
                                description="VGG-11 / ResNet-18 at scale α with seeds, validation-selected η0 "
                                            "and the lazy limit three ways (resumable; rerun to resume).")
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--out", default=None, help="output directory (run stores, results.json, figures)")
    p.add_argument("--report", default=None, metavar="RESULTS_JSON",
                   help="print the markdown of docs/REPRODUCTION.md for a results.json and exit")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # K/N: one worker (internal)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config option (JSON value)")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            print(report_markdown(json.load(f)))
        return 0
    if not args.out:
        p.error("--out is required (or --report)")
    overrides = {}
    for item in args.set or ():
        if "=" not in item:
            p.error(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            overrides[key.strip()] = val
    try:
        if args.shard:
            k, n = (int(v) for v in args.shard.split("/"))
            cfg = make_config(args.preset, **overrides)
            torch.set_num_threads(args.threads)
            path = _store_paths(args.out, n)[1 + k]
            res = run(cfg, common.RunStore(path), shard=(k, n), extra_stores=_other_stores(args.out, path))
            print(f"shard {k}/{n}: {len(res['runs'])} runs done")
            return 0
        result = reproduce(args.preset, args.out, workers=args.workers, threads=args.threads, **overrides)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"{NAME}: error: {e}", file=sys.stderr)
        return 2
    print(summary_text(result))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" +
          "".join(f"\nwrote {os.path.join(args.out, f)}" for f in result.get("files", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
