"""The CNN sweep's configuration: :class:`Config`, its presets, their validation, and the names of the
runs (:func:`fingerprint`, :func:`run_keys`) under which the run store keeps them.

The fingerprint and the run keys name the committed runs (docs/figures/cnn-sweep-runs/): changing
what they hash renames every run (tests/test_cnn_cpu.py pins them per preset).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from lazyfast.experiments import common

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
    names = {f.name for f in dataclasses.fields(cfg)}
    bad = [k for k in overrides if k not in names]
    if bad:
        raise ValueError(f"{NAME} has no option {bad[0]!r}; options: {sorted(names)}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- run names
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
