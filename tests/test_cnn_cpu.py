"""The CNN sweep (lazyfast/experiments/cnn_sweep/): its presets validate, bad configs fail clearly,
the models' pattern forward is the network, the criterion is computed right, a killed sweep resumes
without losing or redoing a run, and a 2-epoch miniature of the `cpu` preset runs end to end
(verdict, figure, table rows). Synthetic images only: no dataset needed."""
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lazyfast.experiments import EXPERIMENTS, cnn_sweep as cs
from lazyfast.models import _BasicBlock, _xavier_init  # for the frozen copy of NarrowResNet18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("seconds", "train_seconds")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# the 2-epoch miniature of the cpu preset: tiny subset, tiny widths, 2 α, 2 η0, 2 seeds
MINI = dict(data="synthetic", n_train=32, n_val=16, n_test=32, n_train_eval=16, divisors=[16, 32], epochs=[2, 2],
            alphas=[1.0, 1e4], lrs=[0.1, 0.01], seeds=[0, 1], batch_size=32, eval_batch_size=32,
            plateau_from_alpha=1e4, subsets=[32, 24], arch_alphas=[None, None], arch_lrs=[None, None],
            show_progress=False)


def _mini(**kw):
    return cs.make_config("cpu", **{**MINI, **kw})


def _strip(runs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in runs]


# ----------------------------------------------------------------------------- configuration
def test_presets_validate_and_cpu_is_the_union_of_its_halves():
    for p in cs.PRESETS:
        cs.make_config(p)
    cpu = cs.Config.cpu()
    assert cpu.archs == ["vgg11", "resnet18"] and cpu.seeds == [0, 1, 2] and cpu.lrs == [1.0, 0.1, 0.01, 0.001]
    assert min(cpu.alphas) <= 0.1 and max(cpu.alphas) >= 1e4 and cpu.data == "fashion-mnist"
    assert cpu.n_val > 0 and cpu.float64_from_alpha <= 1e4
    halves = {k for p in ("cpu-vgg", "cpu-resnet") for k, _ in cs.run_keys(cs.make_config(p))}
    assert halves == {k for k, _ in cs.run_keys(cpu)}  # a cpu-vgg run is reused by the cpu preset
    assert "cnn-sweep" in EXPERIMENTS


def test_per_architecture_grids_keep_vgg_keys_and_give_resnet_its_own():
    """The ResNet half has its own α / η0 grid; VGG-11's run keys are those of the committed run store."""
    vgg, res = cs.make_config("cpu-vgg"), cs.make_config("cpu-resnet")
    a = res.arch_settings()[0]
    assert a["alphas"] == [0.1, 1.0, 10.0, 1e3] and a["lrs"] == [0.1, 0.01]
    keys = cs.run_keys(res)
    assert len(keys) == 3 * (4 * 2 + 2)
    assert {spec[3] for _, spec in keys if spec[2] == "network"} == set(a["alphas"])
    stored = set()
    for f in os.listdir(os.path.join(ROOT, "docs", "figures", "cnn-sweep-runs")):
        with open(os.path.join(ROOT, "docs", "figures", "cnn-sweep-runs", f)) as fh:
            stored |= {json.loads(line)["key"] for line in fh if line.strip()}
    assert {k for k, _ in cs.run_keys(vgg)} <= stored


# Every preset's fingerprint and a digest of its run keys (key and run spec, in order). A change to
# either renames runs: the committed run store would no longer be found (or, worse, reused for other
# runs). The cpu presets' fingerprint is also read from the committed store and results below.
PINNED_NAMES = {
    "quick": ("8734b53b608c", "41d3664c283ada14"),
    "cpu": ("c1600317c8ad", "0eb416dbcf3acee5"),
    "cpu-vgg": ("c1600317c8ad", "da758aa344c279c6"),
    "cpu-resnet": ("c1600317c8ad", "f0f3324b80f3b1aa"),
    "gpu": ("1e99a16a87d7", "f2b65f3ac50feef5"),
    "paper": ("41b810dcee78", "052f1b73c4b8ff04"),
}


def test_fingerprints_and_run_keys_are_those_of_the_committed_runs():
    runs_dir = os.path.join(ROOT, "docs", "figures", "cnn-sweep-runs")
    stored = set()
    for f in os.listdir(runs_dir):
        with open(os.path.join(runs_dir, f)) as fh:
            stored |= {json.loads(line)["key"] for line in fh if line.strip()}
    (store_fp,) = {k.split("/")[1] for k in stored}  # one fingerprint in the committed store
    with open(os.path.join(ROOT, "docs", "figures", "cnn-sweep.json")) as fh:
        committed = json.load(fh)
    assert committed["preset"] == "cpu"
    assert cs.fingerprint(cs.Config(**committed["config"])) == store_fp
    assert set(PINNED_NAMES) == set(cs.PRESETS)
    for preset in cs.PRESETS:
        cfg = cs.make_config(preset)
        keys = cs.run_keys(cfg)
        digest = hashlib.sha1(json.dumps(keys).encode()).hexdigest()[:16]
        assert (cs.fingerprint(cfg), digest) == PINNED_NAMES[preset], preset
        if preset.startswith("cpu"):
            assert cs.fingerprint(cfg) == store_fp
            assert {k for k, _ in keys} <= stored  # every run of the cpu presets is committed


def test_gpu_preset_and_its_committed_sizing():
    cfg = cs.make_config("gpu")
    assert cfg.device == "cuda" and cfg.data == "cifar10" and cfg.divisors == [1, 1]
    with open(os.path.join(ROOT, "docs", "figures", "cnn-gpu-sizing.json")) as fh:
        sizing = json.load(fh)
    runs = {a["arch"]: len(a["alphas"]) * len(a["lrs"]) * len(cfg.seeds) + len(a["lrs"]) * len(cfg.seeds)
            for a in cfg.arch_settings()}
    assert {k: v["runs"] for k, v in sizing["size"]["archs"].items()} == runs
    assert sizing["rates_kind"].startswith(("assumed", "measured"))


def test_committed_sizing_matches_the_presets():
    path = os.path.join(ROOT, "docs", "figures", "cnn-cpu-sizing.json")
    with open(path) as f:
        sizing = json.load(f)
    plan = sizing["plan"]
    assert plan["shared"] == json.loads(json.dumps(cs.CPU_PRESET))
    for preset in ("cpu-vgg", "cpu-resnet"):
        cfg = cs.make_config(preset)
        arch = cfg.archs[0]
        assert plan["archs"][arch]["settings"] == cfg.arch_settings()[0]
        timings = {arch: next(t for t in sizing["timings"] if t["arch"] == arch and t["divisor"] == cfg.divisors[0])}
        est = cs.estimate_seconds(cfg, timings)
        assert est["total_seconds"] == pytest.approx(plan["archs"][arch]["single_thread_seconds"])
        assert plan["archs"][arch]["fits"] is True


@pytest.mark.parametrize("bad, match", [
    (dict(archs=["vgg11", "alexnet"]), r"archs\[1\]"),
    (dict(archs=["vgg11", "vgg11"]), "repeat"),
    (dict(epochs=[3]), "epochs must be a list with one entry per arch"),
    (dict(divisors=[3, 8]), r"divisors\[0\] must divide 64"),
    (dict(gains=[1.0, -1.0]), r"gains\[1\]"),
    (dict(alphas=[10.0, 1.0]), "increasing"),
    (dict(alphas=[0.1, 1.0]), "plateau"),
    (dict(alphas=[1e3, 1e4], plateau_from_alpha=1e3), "no non-lazy"),
    (dict(lrs=[]), "lrs must not be empty"),
    (dict(seeds=[0, 0]), "seeds must not repeat"),
    (dict(seeds=[-1]), r"seeds\[0\]"),
    (dict(n_val=0), "n_val"),
    (dict(momentum=1.0), "momentum"),
    (dict(stability_min=120), "stability_min"),
    (dict(dtype="float16"), "dtype"),
    (dict(data="mnist"), "data must be"),
    (dict(bogus=1), "no option 'bogus'"),
    (dict(arch_alphas=[[1.0, 1e4]]), "arch_alphas must be None or a list with one entry"),
    (dict(arch_alphas=[None, [1e4, 1.0]]), r"arch_alphas\[1\] must be increasing"),
    (dict(arch_alphas=[None, [0.1, 1.0]]), r"arch_alphas\[1\] .*plateau"),
    (dict(arch_lrs=[None, [0.1, 0.1]]), r"arch_lrs\[1\] must not repeat"),
    (dict(arch_lrs=[None, []]), r"arch_lrs\[1\] must not be empty"),
])
def test_bad_configs_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        cs.make_config("cpu", **bad)


def test_bad_preset_and_run_kind():
    with pytest.raises(ValueError, match="preset"):
        cs.make_config("huge")
    with pytest.raises(ValueError, match="kind"):
        cs.train_run(_mini(), 0, 0, "lazy", 1.0, 0.1, data={})
    with pytest.raises(ValueError, match="shard"):
        cs.run(_mini(), shard=(2, 2))


def test_estimate_counts_every_run():
    cfg = _mini()
    unit = {k: 1.0 for k in ("step_float32", "step_float64", "step_linearized", "eval_float32", "eval_float64",
                              "final_float32", "final_float64", "eval_linearized")}
    est = cs.estimate_seconds(cfg, {"vgg11": unit, "resnet18": unit})
    steps = 2 * math.ceil(32 / 32)
    per_run = steps + (16 + 16) + 32
    assert est["archs"]["vgg11"]["steps_per_run"] == steps
    assert est["archs"]["vgg11"]["runs"] == 2 * 2 * 2 + 2 * 2
    lin = steps + (16 + 16) + 32
    assert est["total_seconds"] == pytest.approx(2 * (8 * per_run + 4 * lin))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_pattern_forward_is_the_network_and_the_surrogate_at_init(arch):
    torch.manual_seed(0)
    net = cs.make_model(arch, 1, divisor=16, gain=1.3).double()
    x = torch.randn(5, 1, 32, 32, dtype=torch.float64)
    out, pats = cs.pattern_forward(net, x)
    torch.testing.assert_close(out, net(x), rtol=1e-12, atol=1e-12)
    names = cs.pattern_names(pats)
    assert names[0] == "relu0" and len(set(names)) == len(names)
    if arch == "vgg11":
        assert "maxpool4" in names
    else:
        assert len(names) == 17  # conv1 + 2 per BasicBlock × 8
    # own patterns reproduce the output; another network's patterns give a different (gated) one
    same, _ = cs.pattern_forward(net, x, patterns=pats)
    torch.testing.assert_close(same, out, rtol=1e-12, atol=1e-12)
    other = cs.make_model(arch, 1, divisor=16, gain=1.3).double()
    _, pats2 = cs.pattern_forward(other, x)
    gated, _ = cs.pattern_forward(net, x, patterns=pats2)
    assert not torch.allclose(gated, out)


# sha256 (first 16 hex digits) of initial_network(cpu preset, arch i, seed 1) state dicts, recorded
# before NarrowResNet18 was replaced by lazyfast.resnet18(divisor=)
INITIAL_DIGESTS = ("33c6c5d7a65b4833", "35427fd185d538ef")


class _OldNarrowResNet18(torch.nn.Module):
    """Frozen copy of the sweep's former ``NarrowResNet18`` (lazyfast/experiments/cnn_sweep.py before it
    used ``lazyfast.resnet18(..., divisor=)``): the reference that the committed runs were made with."""

    def __init__(self, num_classes, in_channels, divisor, gain):
        super().__init__()
        w = 64 // divisor
        self.conv1 = torch.nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                blocks.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.blocks = torch.nn.Sequential(*blocks)
        self.classifier = torch.nn.Linear(cin, num_classes)
        _xavier_init(self, gain)

    def forward(self, x):
        out = self.blocks(torch.relu(self.conv1(x)))
        return self.classifier(torch.nn.functional.avg_pool2d(out, 4).flatten(1))


@pytest.mark.parametrize("divisor, gain, seed", [(8, 1.0, 1017), (16, 1.3, 0), (4, 1.0, 2001)])
def test_narrow_resnet_is_bitwise_the_former_narrow_resnet(divisor, gain, seed):
    """The sweep's ResNet-18 (lazyfast.resnet18 with ``divisor``) has the former NarrowResNet18's
    modules, parameter names and shapes, and for the same seed the same parameters and outputs, to
    the bit (seed 1017: w0 of the cpu preset's ResNet-18, seed 1)."""
    torch.manual_seed(seed)
    old = _OldNarrowResNet18(10, 1, divisor, gain)
    torch.manual_seed(seed)
    new = cs.make_model("resnet18", 1, 10, divisor=divisor, gain=gain)
    assert [n for n, _ in new.named_modules()] == [n for n, _ in old.named_modules()]
    assert [type(m) for _, m in new.named_modules()][1:] == [type(m) for _, m in old.named_modules()][1:]
    sd_old, sd_new = old.state_dict(), new.state_dict()
    assert list(sd_new) == list(sd_old)
    for name in sd_old:
        assert sd_new[name].shape == sd_old[name].shape and torch.equal(sd_new[name], sd_old[name]), name
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
        assert torch.equal(cs.pattern_forward(new, x)[0], cs.pattern_forward(old, x)[0])


def test_initial_networks_of_the_cpu_preset_are_unchanged():
    """w0 of the committed cpu runs, seed 1 of each architecture, pinned by a digest of its state dict."""
    cfg = cs.make_config("cpu")
    for ai, pinned in enumerate(INITIAL_DIGESTS):
        net = cs.initial_network(cfg, ai, 1, 1, torch.float32, torch.device("cpu"))
        h = hashlib.sha256()
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        assert h.hexdigest()[:16] == pinned, cfg.archs[ai]


def test_vgg_surrogate_matches_lazyfast_frozen_pattern_net():
    from lazyfast import FrozenPatternNet, LazyModel

    torch.manual_seed(1)
    net = cs.make_model("vgg11", 1, divisor=16, gain=1.4).double()
    lazy = LazyModel(net, 3.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(6, 1, 32, 32, dtype=torch.float64)
    y = torch.randint(10, (6,))
    ev = cs._final_network_eval(lazy, x, y, 4, torch.float64, torch.device("cpu"))
    ref = FrozenPatternNet(lazy.model, lazy.model0, alpha=3.0)
    with torch.no_grad():
        ref_acc = 100.0 * float((ref(x).argmax(1) == y).double().mean())
        net_acc = 100.0 * float((lazy(x).argmax(1) == y).double().mean())
    assert ev["frozen_pattern_acc"] == pytest.approx(ref_acc) and ev["test_acc"] == pytest.approx(net_acc)
    stab = ref.stability(x)
    for k, v in stab.items():
        assert ev["stability"][k] == pytest.approx(100.0 * v)


# ----------------------------------------------------------------------------- the criterion
def _fake_runs(cfg, acc, lin_acc, stab=99.9, val=None):
    """Runs whose accuracies are acc[alpha][seed] (val = test unless given), η0 0.1 best everywhere."""
    runs = []
    for a in cfg.arch_settings():
        for si, seed in enumerate(cfg.seeds):
            for alpha in cfg.alphas:
                for lr in cfg.lrs:
                    t = acc[alpha][si] - (0 if lr == 0.1 else 20)
                    v = (val or acc)[alpha][si] - (0 if lr == 0.1 else 20)
                    runs.append({"arch": a["arch"], "seed": seed, "kind": "network", "alpha": alpha, "lr": lr,
                                 "diverged": False, "final_test_acc": t, "final_val_acc": v, "final_train_acc": t,
                                 "frozen_pattern_acc": t if alpha >= 1e3 else t - 30, "relative_change": 1 / alpha,
                                 "stability": {"relu0": stab if alpha >= 1e3 else 60.0, "maxpool0": 100.0},
                                 "train_mse": [1.0, 0.5], "seconds": 1.0})
            for lr in cfg.lrs:
                t = lin_acc[si] - (0 if lr == 0.1 else 20)
                runs.append({"arch": a["arch"], "seed": seed, "kind": "linearized", "alpha": 1.0, "lr": lr,
                             "diverged": False, "final_test_acc": t, "final_val_acc": t, "final_train_acc": t,
                             "train_mse": [1.0, 0.5], "seconds": 1.0})
    return runs


def _verdict(acc, lin, **kw):
    cfg = cs.make_config("cpu", archs=["vgg11"], divisors=[8], gains=[1.0], epochs=[2], subsets=[None],
                         alphas=[0.1, 1.0, 1e3, 1e4],
                         lrs=[0.1, 0.01], seeds=[0, 1, 2], plateau_from_alpha=1e3, arch_alphas=[None], arch_lrs=[None])
    s = cs.summarize(cfg, _fake_runs(cfg, acc, lin, **kw), n_test=10000)
    return s, cs.verdict(cfg, s)["archs"]["vgg11"]


GOOD = {0.1: [85, 86, 87], 1.0: [88, 89, 90], 1e3: [80, 80.5, 81], 1e4: [80, 80.4, 80.8]}


def test_criterion_holds_on_a_clear_gap():
    s, v = _verdict(GOOD, [80.1, 80.4, 80.7])
    assert s["archs"]["vgg11"]["per_alpha"][1]["best_lr"] == 0.1
    assert v["best_alpha"] == 1.0 and v["gap_points"] == pytest.approx(89 - (80.5 + 80.4) / 2)
    assert v["c1_gap"] and v["c2_no_increase_beyond_best"] and v["c3_linearized_matches"] and v["c4_stability"]
    assert v["holds"] and v["lazy_limit_three_agree"]


def test_criterion_fails_each_way():
    small = {**GOOD, 0.1: [81, 82, 83], 1.0: [82, 83, 84]}  # gap 2.55 points < 3
    assert not _verdict(small, [80.1, 80.4, 80.7])[1]["c1_gap"]
    noisy = {**GOOD, 1.0: [80, 89, 98]}  # gap 8.5 but σ = 9
    assert not _verdict(noisy, [80.1, 80.4, 80.7])[1]["c1_gap"]
    rising = {**GOOD, 1e4: [84, 84.5, 85]}  # accuracy rises from 1e3 to 1e4 by 4 points
    assert not _verdict(rising, [84.1, 84.4, 84.7])[1]["c2_no_increase_beyond_best"]
    v = _verdict(GOOD, [70, 70.5, 71])[1]  # the linearized model far below the network at α_max
    assert not v["c3_linearized_matches"] and not v["holds"]
    assert not _verdict(GOOD, [80.1, 80.4, 80.7], stab=97.0)[1]["c4_stability"]


def test_best_alpha_and_lr_are_chosen_on_validation_not_test():
    # on test α = 1 is best (89 %), on validation α = 0.1: the verdict follows validation
    val = {**GOOD, 0.1: [95, 95, 95]}
    s, v = _verdict(GOOD, [80.1, 80.4, 80.7], val=val)
    assert v["best_alpha"] == 0.1 and v["best_test_acc"] == pytest.approx(86.0)


# ----------------------------------------------------------------------------- end to end
def test_miniature_of_the_cpu_preset_end_to_end(tmp_path):
    res = cs.reproduce("cpu", str(tmp_path), **MINI)
    assert res["preset"] == "cpu" and res["dataset"] == "synthetic"
    assert len(res["runs"]) == len(cs.run_keys(_mini()))
    for r in res["runs"]:
        if r["kind"] == "network":
            assert r["dtype"] == ("float64" if r["alpha"] >= 1e4 else "float32")
    v = res["verdict"]
    assert set(v["archs"]) == {"vgg11", "resnet18"} and isinstance(v["holds_all"], bool)
    for arch, va in v["archs"].items():
        assert isinstance(va["holds"], bool) and va["holds"] == bool(
            va["c1_gap"] and va["c2_no_increase_beyond_best"] and va["c3_linearized_matches"] and va["c4_stability"])
    st = res["summary"]["archs"]["vgg11"]["per_alpha"]
    assert st[1]["stability_min"] >= st[0]["stability_min"]  # lazier at large α
    assert st[1]["relative_change"] < st[0]["relative_change"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdict"] == json.loads(json.dumps(v))
    assert (tmp_path / "cnn-sweep.png").stat().st_size > 10000
    rows = cs.table_rows(saved)
    assert len(rows) == 2 and all(r.startswith("| `cnn-sweep`") and r.endswith(("| yes |", "| no |")) for r in rows)
    assert "test accuracy" in cs.summary_text(saved)
    r = subprocess.run([sys.executable, "-m", "lazyfast.experiments.cnn_sweep", "--report",
                        str(tmp_path / "results.json")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert rows[0] in r.stdout and "the claim" in r.stdout


CHILD = textwrap.dedent("""
    import os, signal, sys, json
    import torch
    torch.set_num_threads(1)
    from lazyfast.experiments import common, cnn_sweep as cs
    kill_at = int(sys.argv[2])
    real, calls = cs.train_run, [0]
    def train_run(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-sweep, while this run is in progress
        return real(*a, **k)
    cs.train_run = train_run
    cfg = cs.make_config("cpu", **json.loads(sys.argv[3]))
    cs.run(cfg, common.RunStore(sys.argv[1]))
    print("done", calls[0])
""")


def test_killed_sweep_resumes_without_losing_or_redoing_runs(tmp_path):
    mini = dict(MINI, archs=["vgg11"], arch_alphas=[None], arch_lrs=[None], divisors=[16], gains=[1.4], epochs=[2],
                seeds=[3], subsets=[32], lrs=[0.1])
    store = str(tmp_path / "runs.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", CHILD, store, "3", json.dumps(mini)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == -9, r.stderr  # killed by SIGKILL
    with open(store) as f:
        before = [json.loads(line) for line in f if line.strip()]
    assert len(before) == 2  # runs 1-2 finished, run 3 (of 3) was in progress
    r = subprocess.run([sys.executable, "-c", CHILD, store, "0", json.dumps(mini)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    n_runs = len(cs.run_keys(cs.make_config("cpu", **mini)))
    assert n_runs == 3 and r.stdout.split() == ["done", "1"]  # only the missing run was computed
    with open(store) as f:
        after = [json.loads(line) for line in f if line.strip()]
    assert len(after) == n_runs and len({a["key"] for a in after}) == n_runs
    assert after[:2] == before  # finished runs kept as they were (timings included: not redone)
    from lazyfast.experiments import common

    fresh = cs.run(cs.make_config("cpu", **mini), common.RunStore())  # uninterrupted, in this process
    resumed = cs.run(cs.make_config("cpu", **mini), common.RunStore(store))  # all found: nothing computed
    assert _strip(resumed["runs"]) == _strip(fresh["runs"])
    assert resumed["verdict"] == fresh["verdict"]


def test_two_workers_give_the_one_process_result(tmp_path):
    mini = dict(MINI, archs=["vgg11"], arch_alphas=[None], arch_lrs=[None], divisors=[16], gains=[1.4], epochs=[1],
                seeds=[0], lrs=[0.1], subsets=[32],
                linearized=False)
    one = cs.reproduce("cpu", str(tmp_path / "one"), plot=False, **mini)
    two = cs.reproduce("cpu", str(tmp_path / "two"), workers=2, plot=False, **mini)
    assert _strip(two["runs"]) == _strip(one["runs"])
    assert sorted(os.listdir(tmp_path / "two")) == ["results.json", "runs.shard0of2.jsonl", "runs.shard1of2.jsonl",
                                                    "worker0.log", "worker1.log"]
    # a later run with another worker count reuses every finished run (nothing is computed again)
    again = cs.reproduce("cpu", str(tmp_path / "two"), workers=1, plot=False, **mini)
    assert again["runs"] == two["runs"] and not (tmp_path / "two" / "runs.jsonl").exists()


@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_network_at_large_alpha_follows_the_linearized_model(arch):
    """The lazy limit two ways, step by step: same w0, same batches, same η0 (float64)."""
    from lazyfast import LazyModel, Linearized

    cfg = _mini()
    ai = cfg.archs.index(arch)
    net = cs.initial_network(cfg, ai, 0, 1, torch.float64, torch.device("cpu"))
    lin = LazyModel(Linearized(cs.initial_network(cfg, ai, 0, 1, torch.float64, torch.device("cpu")),
                               implementation="products", cache_size=0), 1.0)
    alpha = 1e5  # at α = 10 the two differ by ~25 % here
    lazy = LazyModel(net, alpha)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 1, 32, 32, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randint(10, (8,), generator=g) for _ in range(3)]
    for model, a in ((lazy, alpha), (lin, 1.0)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        for x, y in zip(xs, ys):
            loss = cs._mse(model(x), y) / a ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt = torch.randn(6, 1, 32, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        a_out, l_out = lazy(xt), lin(xt)
    assert l_out.abs().max() > 1e-3  # it did move
    assert (a_out - l_out).abs().max() <= 1e-3 * l_out.abs().max(), float((a_out - l_out).abs().max() / l_out.abs().max())
