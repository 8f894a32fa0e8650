"""One run of the CNN sweep: the networks, the data split, the pattern forward (the frozen-pattern
surrogate and the activation stability), :func:`train_run`, the dtype of a run and its cost estimate."""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lazyfast import LazyModel, Linearized
from lazyfast.experiments import common, image_data
from lazyfast.experiments.cnn_alpha import make_vgg11
from lazyfast.experiments.cnn_sweep.config import ARCHS, RUN_KINDS, Config
from lazyfast.models import resnet18


# ----------------------------------------------------------------------------- models
def make_model(arch: str, in_channels: int, num_classes: int = 10, *, divisor: int = 1, gain: float = 1.0):
    """VGG-11 / ResNet-18 (BN-free, as the authors'), full width (``lazyfast.vgg11`` / ``lazyfast.resnet18``)
    for ``divisor`` 1, else with every width divided by ``divisor``."""
    if arch == "vgg11":
        return make_vgg11(in_channels, num_classes, divisor=divisor, gain=gain)
    if arch == "resnet18":
        return resnet18(num_classes, in_channels, 1, gain, divisor=divisor)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def pattern_forward(model: nn.Module, x: torch.Tensor, patterns: Optional[List[torch.Tensor]] = None):
    """Runs a VGG-11 (``features`` + ``classifier``) or a ResNet-18 (``conv1``, ``blocks``, ``classifier``)
    and returns ``(output, patterns)``: the ReLU on/off masks and max-pool argmax positions, in layer order.
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
    if kind not in RUN_KINDS:
        raise ValueError(f"kind must be one of {RUN_KINDS}, got {kind!r}")
    data = data if data is not None else load_data(cfg)
    device = common.resolve_device(cfg.device)
    dtype = run_dtype(cfg, kind, alpha)
    a = cfg.arch_settings()[arch_index]
    net = initial_network(cfg, arch_index, seed, data["x_train"].shape[1], dtype, device)
    if kind == "linearized":
        alpha = 1.0
        model = LazyModel(Linearized(net, implementation="products", cache_size=0), 1.0, center=True)
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
