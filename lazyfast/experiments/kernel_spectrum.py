"""Spectrum of the tangent kernel of the centred VGG-11 at init, on N images vs N random images
(the authors' ``cnn/extract_kernel.py``).

The full eNTK Σ(w0) = J Jᵀ over (sample, class) pairs is (10N)×(10N), row 10·n + i, with the
Jacobian taken w.r.t. the trainable parameters (net + classifier; the frozen initial copy of the
centring is excluded). The authors use the first N training images, normalized, no augmentation,
Xavier gain 2.0 and float32; "random" images have i.i.d. uniform 8-bit pixels normalized the same
way. The script's comment asks for the SVD of both kernels; we report the eigenvalues (K is
symmetric PSD), sorted, and summaries of their decay.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

import lazyfast
from lazyfast import LazyModel
from lazyfast.experiments import common, image_data
from lazyfast.experiments.cnn_alpha import make_vgg11

NAME = "kernel-spectrum"


@dataclass
class Config(common.ExperimentConfig):
    data: str = "auto"  # auto | cifar10 | fashion-mnist | synthetic
    data_dir: Optional[str] = None
    n: int = 495  # the authors' --subset 495 (K is 4950 × 4950)
    gain: float = 2.0  # extract_kernel.py's default (training uses 1.0)
    channel_divisor: int = 1
    seed: int = 58
    dtype: str = "float32"  # the authors' precision for this experiment; K is accumulated in float64

    @classmethod
    def quick(cls) -> "Config":
        return cls(n=40, channel_divisor=4)

    def validate(self) -> None:
        common.check_positive(self.n, "n", integer=True)
        common.check_positive(self.gain, "gain")
        common.check_positive(self.channel_divisor, "channel_divisor", integer=True)
        common.resolve_dtype(self.dtype)
        if self.data not in ("auto", "cifar10", "fashion-mnist", "synthetic"):
            raise ValueError(f"data must be 'auto', 'cifar10', 'fashion-mnist' or 'synthetic', got {self.data!r}")


def first_images(cfg: Config) -> dict:
    """The first ``n`` training images (no shuffling, as the authors) and the dataset's statistics."""
    if cfg.data == "synthetic":
        d = image_data.synthetic_images(cfg.n, 1, seed=cfg.seed)
    else:
        d = image_data.load_images(cfg.data, cfg.data_dir, seed=cfg.seed)
    return {"name": d["name"], "x": d["x_train"][:cfg.n], "mean": d["mean"], "std": d["std"]}


def full_kernel(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (k·N)×(k·N) eNTK, row k·n + i, accumulated in float64."""

    K = lazyfast.empirical_ntk(model, x, mode="full", implementation="auto")  # (N, N, k, k)
    N, _, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(N * k, N * k).double()


def spectrum_stats(ev: torch.Tensor) -> dict:
    """ev: eigenvalues sorted descending."""
    lam = ev.clamp_min(0)
    tot = float(lam.sum())
    return {
        "effective_rank": tot / float(lam[0]),  # trace / λ_max
        "participation_ratio": tot ** 2 / float((lam ** 2).sum()),
        "top10_fraction": float(lam[:10].sum()) / tot,
        "top1_fraction": float(lam[0]) / tot,
    }


def _run(cfg: Config) -> dict:
    dtype, device = common.resolve_dtype(cfg.dtype), common.resolve_device(cfg.device)
    imgs = first_images(cfg)
    x = image_data.normalize(imgs["x"], imgs["mean"], imgs["std"]).to(device, dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    rand = torch.randint(0, 256, tuple(imgs["x"].shape), generator=g).float() / 255
    xr = image_data.normalize(rand, imgs["mean"], imgs["std"]).to(device, dtype)
    torch.manual_seed(cfg.seed)
    net = make_vgg11(x.shape[1], 10, divisor=cfg.channel_divisor, gain=cfg.gain).to(device, dtype)
    model = LazyModel(net, 1.0, center=True)  # centred: Jacobian of net + classifier only
    out = {"dataset": imgs["name"], "n": int(x.shape[0]),
           "n_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    t0 = time.perf_counter()
    for key, inputs in (("images", x), ("random", xr)):
        K = full_kernel(model, inputs)
        ev = torch.linalg.eigvalsh(K).flip(0)
        out[f"eigenvalues_{key}"] = common.tolist(ev)
        out[f"stats_{key}"] = spectrum_stats(ev)
        out[f"symmetry_error_{key}"] = float((K - K.T).abs().max() / K.abs().max())
        out[f"min_over_max_eig_{key}"] = float(ev[-1] / ev[0])
        out[f"trace_{key}"] = float(K.trace())
    out["seconds"] = time.perf_counter() - t0
    return out


def run(cfg: Optional[Config] = None, store: Optional[common.RunStore] = None) -> dict:
    cfg = cfg or Config.quick()
    cfg.validate()
    store = common.RunStore() if store is None else store
    res = store.run(f"{NAME}/{common.fingerprint(cfg, exclude=('show_progress', 'device'))}", lambda: _run(cfg))
    return {"experiment": NAME, "config": common.config_dict(cfg), "summary": res}
