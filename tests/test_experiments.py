"""The experiments of the paper at small sizes: their qualitative claims, the CLI, data loading and
resumability. Each test runs in seconds on a CPU."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from lazyfast.experiments import (EXPERIMENTS, common, cover, cnn_alpha, image_data, kernel_equivalence,
                                  kernel_spectrum, population_sgd, rates, runner, tau_sweep, width_sweep)
from lazyfast.experiments.shallow import (gaussian_init, relu_net_forward, relu_net_gd, relu_net_population_sgd)

NOPROG = {"show_progress": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The problems are tiny; on a shared CPU, several OpenMP threads only add contention.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- hand-written gradients
@pytest.mark.parametrize("shared", [True, False])
def test_relu_net_gd_step_matches_autograd(shared):
    g = torch.Generator().manual_seed(3)
    B, m, d, n = 3, 6, 4, 7
    W, a = gaussian_init(B, m, d, g, symmetric=False, positive_first_half=False)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) if shared else torch.randn(B, n, d, generator=g,
                                                                                         dtype=torch.float64)
    y = torch.randn(n if shared else B * n, generator=g, dtype=torch.float64).reshape(-1, n)
    y = y[0] if shared else y
    s = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    eta = torch.tensor([0.1, 0.3, 0.05], dtype=torch.float64)
    out = relu_net_gd(x, y, x, y, W, a, scaling=s, stepsize=eta, niter=1, show_progress=False)
    Wr, ar = W.clone().requires_grad_(), a.clone().requires_grad_()
    pred = relu_net_forward(Wr, ar, x, s)  # (B, n)
    # F = R(s f)/s², R = ½ mean; the authors' step W ← W − η ∇F
    F = (0.5 * ((pred - y) ** 2).mean(-1) / s ** 2).sum()
    gW, ga = torch.autograd.grad(F, (Wr, ar))
    torch.testing.assert_close(out["W"], W - eta[:, None, None] * gW, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["a"], a - eta[:, None] * ga, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out["loss_train"][0], (0.5 * ((pred - y) ** 2).mean(-1)).detach())


def test_population_sgd_step_matches_the_authors_formula():
    g = torch.Generator().manual_seed(5)
    B, m, d, m0, bs = 2, 4, 3, 2, 9
    W, a = gaussian_init(B, m, d, g, symmetric=True, positive_first_half=True)
    tW = torch.nn.functional.normalize(torch.randn(m0, d, dtype=torch.float64), dim=1)
    ta = torch.tensor([1.0, -1.0], dtype=torch.float64)
    eta = 0.7
    g1 = torch.Generator().manual_seed(11)
    out = relu_net_population_sgd(tW, ta, W, a, stepsize=eta, batchsize=bs, niter=1, generator=g1, show_progress=False)
    from lazyfast.data import sphere

    x = sphere(bs, d, generator=torch.Generator().manual_seed(11))
    y0 = torch.relu(x @ tW.T) @ ta / bs
    Wr, ar = W.clone().requires_grad_(), a.clone().requires_grad_()
    Y = relu_net_forward(Wr, ar, x, 1.0 / m)
    L = (0.5 * ((Y - y0) ** 2).mean(-1)).sum()
    gW, ga = torch.autograd.grad(L, (Wr, ar))
    # the authors' gradients omit the 1/m; the input weights step d× further
    torch.testing.assert_close(out["a"], a - eta * m * ga)
    torch.testing.assert_close(out["W"], W - eta * d * m * gW)


def test_symmetrized_init_outputs_zero():
    g = torch.Generator().manual_seed(0)
    W, a = gaussian_init(2, 10, 5, g, symmetric=True, positive_first_half=True)
    assert (a[:, :5] >= 0).all()
    x = torch.randn(8, 5, dtype=torch.float64)
    assert relu_net_forward(W, a, x, 1.0).abs().max() < 1e-12


# ----------------------------------------------------------------------------- paper claims
def test_tau_sweep_quick_test_loss_increases_with_tau():
    res = tau_sweep.run(common.make_config(tau_sweep.Config, "quick", **NOPROG))
    s = res["summary"]
    assert s["spearman_end_tau_ge_0.1"] >= 0.8
    assert s["spearman_best_tau_ge_0.1"] >= 0.8
    assert s["lazy_plateau_over_small_tau"] >= 3
    taus = s["taus"]
    # small τ: neurons move a lot and find the teacher; large τ: lazy
    i_small = taus.index(min(taus))
    assert s["relative_change_mean"][i_small] > 0.5
    assert s["teacher_alignment_mean"][i_small] > 0.95
    assert s["relative_change_mean"][-1] < 0.05
    assert all(0 < v < float("inf") for v in s["test_end_mean"])


def test_cover_lazy_moves_little_nonlazy_moves_a_lot():
    res = cover.run(common.make_config(cover.Config, "quick", niter=8000, **NOPROG))
    s = res["summary"]
    assert s["tau=2"]["relative_change"] < 0.05
    assert s["tau=0.1"]["relative_change"] > 0.5
    for r in res["runs"]:
        assert len(r["paths"]) == 16 and len(r["paths"][0][0]) == 2
        assert r["train_end"] < r["train_init"]


def test_rates_slopes_within_tolerance():
    res = rates.run(common.make_config(rates.Config, "quick", extra_series=[], **NOPROG))
    s = res["summary"]
    for key, exp in rates.EXPECTED.items():
        assert abs(s["slopes"][key] - exp) <= rates.TOLERANCE[key], (key, s["slopes"][key])
    assert all(s["within_tolerance"].values())


def test_population_sgd_small_tau_fits_large_tau_plateaus():
    cfg = common.make_config(population_sgd.Config, "quick", d=20, taus=[0.01, 0.05, 1.0, 4.0], niter=2500,
                             tail=300, ntrials=1, **NOPROG)
    s = population_sgd.run(cfg)["summary"]
    norm = s["normalized_mean"]
    assert max(norm[:2]) < 0.1  # fits the teacher
    assert min(norm[2:]) > 0.9  # lazy plateau
    assert s["relative_change_mean"][-1] < 0.01


def test_width_sweep_runs_and_ntk_scaling_is_worse():
    cfg = common.make_config(width_sweep.Config, "quick", ms=[16, 64, 128], niter=1500, ntrials=1, **NOPROG)
    s = width_sweep.run(cfg)["summary"]
    assert s["ntk_above_mean_field_for_m_ge_16"]
    assert s["ntk"]["kappa_slope"] < -0.3  # κ ~ m^-1/2 under 1/√m
    assert abs(s["mean_field"]["kappa_slope"]) < 0.2  # flat under 1/m
    # lazier as m grows under 1/√m
    rel = s["ntk"]["relative_change_mean"]
    assert rel[-1] < rel[0]


def test_kernel_equivalence_linearized_is_kernel_gd_and_lazy_converges():
    cfg = common.make_config(kernel_equivalence.Config, "quick", n_train=20, n_test=30, m=40, steps=200,
                             alphas=[1.0, 10.0, 100.0], **NOPROG)
    s = kernel_equivalence.run(cfg)["summary"]
    assert s["linearized_vs_kernel_gap"] < 1e-8 * max(1.0, s["prediction_scale"])
    gaps = s["lazy_vs_kernel_gap"]
    assert gaps[0] > gaps[1] > gaps[2]
    assert s["gap_slope"] < -0.9


# ----------------------------------------------------------------------------- CNN experiments
def _tiny_cnn_cfg(**kw):
    base = dict(data="synthetic", n_train=48, n_test=24, alphas=[1.0, 1000.0], lrs=[0.05], epochs=1,
                batch_size=16, channel_divisor=16, dtype="float64", **NOPROG)
    base.update(kw)
    return common.make_config(cnn_alpha.Config, "quick", **base)


def test_cnn_alpha_tiny_end_to_end(tmp_path):
    res = runner.reproduce("cnn-alpha", "quick", str(tmp_path), **_tiny_cnn_cfg().__dict__)
    s = res["summary"]
    assert s["alphas"] == [1.0, 1000.0]
    assert len(s["stability"]) == 2 and "relu0" in s["stability"][0] and "maxpool4" in s["stability"][0]
    # lazier at large α: weights move less, patterns more stable
    assert s["relative_change"][1] < s["relative_change"][0]
    assert min(s["stability"][1].values()) >= min(s["stability"][0].values())
    assert all(0 <= v <= 100 for v in s["test_acc"] + s["frozen_pattern_acc"] + s["linearized_acc"])
    assert os.path.exists(tmp_path / "cnn-alpha.png")
    json.loads((tmp_path / "results.json").read_text())


def test_cnn_alpha_surrogate_equals_network_at_huge_alpha():
    from lazyfast import FrozenPatternNet, LazyModel

    cfg = _tiny_cnn_cfg()
    data = cnn_alpha.load_data(cfg)
    net = cnn_alpha._initial_model(cfg, data, torch.float64, torch.device("cpu"))
    lazy = LazyModel(net, 1e6, center=True)
    cnn_alpha._train(cfg, lazy, 1e6, 0.05, data, torch.float64, torch.device("cpu"), "t")
    x = image_data.normalize(data["x_test"], data["mean"], data["std"]).double()
    sur = FrozenPatternNet(lazy.model, lazy.model0, alpha=1e6)
    with torch.no_grad():
        a, b = lazy(x), sur(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def _write_cifar_fixture(root, n_per_batch=6):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
             b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"filenames": [b"x.png"] * n_per_batch}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f)


def test_cifar_loader_reads_the_python_version_format(tmp_path):
    _write_cifar_fixture(tmp_path)
    d = image_data.load_cifar10(str(tmp_path))
    assert d["x_train"].shape == (30, 3, 32, 32) and d["x_test"].shape == (6, 3, 32, 32)
    assert d["y_train"].dtype == torch.int64 and 0.0 <= float(d["x_train"].min()) <= float(d["x_train"].max()) <= 1.0
    # CHW planes: the first 1024 bytes are the red plane of image 0
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_allclose(d["x_train"][0, 0].numpy().ravel() * 255, raw[b"data"][0, :1024], atol=1e-3)
    assert d["y_train"][0].item() == raw[b"labels"][0]
    # and the CNN experiment runs on it through --data-dir
    res = cnn_alpha.run(_tiny_cnn_cfg(data="auto", data_dir=str(tmp_path), n_train=None, n_test=None,
                                      alphas=[10.0], linearized=False))
    assert res["summary"]["dataset"] == "CIFAR-10"


def test_missing_data_dir_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        image_data.load_cifar10(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        image_data.load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        image_data.load_fashion_mnist(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "lazyfast.cli", "reproduce", "cnn-alpha", "--data-dir",
                        str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "cifar-10-python.tar.gz" in r.stderr and "Traceback" not in r.stderr


def test_fashion_mnist_idx_reader(tmp_path):
    import gzip
    import struct

    imgs = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    labels = np.array([1, 2, 9], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, 3, 28, 28) + imgs.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, 3) + labels.tobytes())
    d = image_data.load_fashion_mnist(str(tmp_path))
    assert d["x_train"].shape == (3, 1, 32, 32)
    assert d["y_test"].tolist() == [1, 2, 9]
    assert float(d["x_train"][:, :, :2].abs().max()) == 0.0  # zero padding
    np.testing.assert_allclose(d["x_train"][1, 0, 2:30, 2:30].numpy() * 255, imgs[1], atol=1e-3)


def test_augment_is_a_padded_crop_with_flip():
    x = torch.rand(5, 3, 32, 32)
    y = image_data.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    # every output is a (possibly flipped) 32×32 window of the zero-padded input
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(5):
        found = any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(-1))
                    for oy in range(9) for ox in range(9) for w in [xp[i, :, oy:oy + 32, ox:ox + 32]])
        assert found


def test_kernel_spectrum_tiny():
    cfg = common.make_config(kernel_spectrum.Config, "quick", data="synthetic", n=6, channel_divisor=16,
                             dtype="float64", **NOPROG)
    s = kernel_spectrum.run(cfg)["summary"]
    for key in ("images", "random"):
        ev = s[f"eigenvalues_{key}"]
        assert len(ev) == 60  # (10N) × (10N)
        assert ev == sorted(ev, reverse=True)
        assert s[f"min_over_max_eig_{key}"] >= -1e-6  # PSD to round-off
        assert s[f"symmetry_error_{key}"] <= 1e-12


def test_kernel_spectrum_matches_an_independent_jacobian():
    from lazyfast import LazyModel

    torch.manual_seed(0)
    net = cnn_alpha.make_vgg11(1, 10, divisor=32, gain=2.0).double()
    model = LazyModel(net, 1.0, center=True)
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    K = kernel_spectrum.full_kernel(model, x)
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    for n in range(3):
        for i in range(10):
            gr = torch.autograd.grad(out[n, i], params, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in gr]))
    J = torch.stack(rows)  # the authors' per-(sample, class) backward loop
    torch.testing.assert_close(K, J @ J.T, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- runner, CLI, resume
def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    over = dict(d=5, n_train=20, n_test=20, m=4, taus=[0.1, 1.0], niter=20, ntrials=2, **NOPROG)
    calls = []
    real = tau_sweep.run_trial

    def counting(cfg, trial):
        calls.append(trial)
        return real(cfg, trial)

    monkeypatch.setattr(tau_sweep, "run_trial", counting)
    r1 = runner.reproduce("tau-sweep", "quick", str(tmp_path), plot=False, **over)
    assert calls == [0, 1]
    lines = (tmp_path / runner.RUNS_FILE).read_text().splitlines()
    assert len(lines) == 2
    # a kill while writing leaves a partial last line: ignored on reload
    with open(tmp_path / runner.RUNS_FILE, "a") as f:
        f.write('{"key": "tau-sweep/xx/trial')
    over["ntrials"] = 3
    r2 = runner.reproduce("tau-sweep", "quick", str(tmp_path), plot=False, **over)
    assert calls == [0, 1, 2]  # only the new trial ran
    assert r2["trials"][:2] == r1["trials"]
    # a changed setting is a different run, not a stale reuse
    over["niter"] = 21
    runner.reproduce("tau-sweep", "quick", str(tmp_path), plot=False, **over)
    assert calls == [0, 1, 2, 0, 1, 2]


def test_results_are_strict_json(tmp_path):
    res = runner.reproduce("width-sweep", "quick", str(tmp_path), d=5, n_train=10, n_test=10, ms=[2, 4], niter=5,
                           ntrials=1, ntk_step=1e9, **NOPROG)  # a huge step diverges: NaN must become null
    text = (tmp_path / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert res["summary"]["ntk"]["diverged"] == [1, 1]


def test_bad_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="taus"):
        common.make_config(tau_sweep.Config, "quick", taus=[])
    with pytest.raises(ValueError, match=r"taus\[1\]"):
        common.make_config(tau_sweep.Config, "quick", taus=[0.1, -1.0])
    with pytest.raises(ValueError, match="niter"):
        common.make_config(cover.Config, "quick", niter=0)
    with pytest.raises(ValueError, match="no option 'bogus'"):
        common.make_config(cover.Config, "quick", bogus=1)
    with pytest.raises(ValueError, match="preset"):
        common.make_config(cover.Config, "huge")
    with pytest.raises(ValueError, match="dtype"):
        common.make_config(cover.Config, "quick", dtype="float16")
    with pytest.raises(ValueError, match="unknown experiment"):
        runner.reproduce("nope")


def test_cli_help_lists_every_experiment():
    r = subprocess.run([sys.executable, "-m", "lazyfast.cli", "reproduce", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in EXPERIMENTS:
        assert name in r.stdout


def test_cli_reproduce_writes_results_and_figure(tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "lazyfast.cli", "reproduce", "cover", "--out", str(out), "--seed", "3",
                        "--set", "niter=300", "--set", "show_progress=false"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["seed"] == 3 and res["config"]["niter"] == 300
    assert (out / "cover.png").stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "lazyfast.cli", "reproduce", "cover", "--out", str(out), "--set",
                        "niter=-3"], capture_output=True, text=True)
    assert r.returncode == 2 and "niter" in r.stderr


def test_spearman_and_slope_helpers():
    assert common.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert common.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert common.loglog_slope([1, 10, 100], [1, 0.1, 0.01]) == pytest.approx(-1.0)
    m, s = common.mean_std([[1.0, float("nan")], [3.0, 2.0]])
    assert m[0] == 2.0 and m[1] == 2.0 and s[1] == 0.0


def test_tau_sweep_runs_over_disjoint_taus_merge_into_one_sweep():
    over = dict(d=5, n_train=20, n_test=20, m=4, niter=30, ntrials=2, **NOPROG)
    full = tau_sweep.run(common.make_config(tau_sweep.Config, "quick", taus=[0.1, 0.5, 2.0], **over))["trials"]
    a = tau_sweep.run(common.make_config(tau_sweep.Config, "quick", taus=[2.0, 0.1], **over))["trials"]
    b = tau_sweep.run(common.make_config(tau_sweep.Config, "quick", taus=[0.5], ntrials=1,
                                         **{k: v for k, v in over.items() if k != "ntrials"}))["trials"]
    merged = tau_sweep.merge_trials([a, b])
    assert len(merged) == 1  # only trials present in every part
    for key in ("taus", "test_end", "relative_change"):
        np.testing.assert_allclose(merged[0][key], full[0][key], rtol=1e-10)
    with pytest.raises(ValueError, match="share"):
        tau_sweep.merge_trials([a, a])


def test_run_store_reports_the_compute_time_of_resumed_runs(tmp_path):
    import time as _time

    from lazyfast.experiments.common import RunStore

    path = str(tmp_path / "runs.jsonl")
    s = RunStore(path, fingerprint="f")
    s.run("a", lambda: (_time.sleep(0.2), 1)[1])
    t = s.timing()
    assert t["runs_computed"] == 1 and t["runs_resumed"] == 0 and t["run_seconds"] >= 0.2
    s2 = RunStore(path, fingerprint="f")  # a resumed process: the run is reused, its time is kept
    assert s2.run("a", lambda: 2) == 1
    s2.run("b", lambda: 3)
    t2 = s2.timing()
    assert t2["runs_resumed"] == 1 and t2["runs_computed"] == 1 and t2["run_seconds"] >= 0.2
    assert t2["runs_without_time"] == 0
