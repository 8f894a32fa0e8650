"""Regression tests of the contracts of docs/contracts.md, one per item of the hardening issue
(each failed on the code before the fix): no silent wrong result, no silent damage to stored work."""
import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import _validation
from lazyfast._engine import two_layer
from lazyfast.distributed import distributed_ntk
from lazyfast.experiments.common import RunStore
from lazyfast.train import CheckpointError, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
D64 = torch.float64


def _two_layer(k=2, **kw):
    torch.manual_seed(0)
    return lazyfast.TwoLayer(3, 8, k, dtype=D64, **kw)


def _x(n=5, d=3):
    return torch.randn(n, d, dtype=D64)


# ----------------------------------------------------------------------------- item 3: NaN weights
def test_fused_relu_kernels_refuse_nan_weights():
    model = _two_layer()
    with torch.no_grad():
        model.hidden.weight[0, 0] = float("nan")
    x = _x()
    assert torch.isnan(model(x)).any()  # the model's own output is NaN ...
    with pytest.raises(ValueError, match="A contains NaN"):  # ... so its kernel must not be finite silently
        lazyfast.empirical_ntk(model, x)
    with pytest.raises(ValueError, match="A contains NaN"):
        lazyfast.vjp(model, x, torch.ones(5, 2, dtype=D64))
    with torch.no_grad():
        model.hidden.weight[0, 0] = 0.0
        model.output.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="B contains NaN"):
        two_layer.model_ntk(model, x)


# ----------------------------------------------------------------------------- item 4: train-mode BN / Dropout
class _BNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.l2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.bn(self.l1(x)))))


def test_lazy_model_is_zero_at_init_with_batchnorm_and_dropout_in_both_modes():
    torch.manual_seed(0)
    net = _BNDrop().double()
    lazy = lazyfast.LazyModel(net, alpha=10.0)
    x = torch.randn(16, 3, dtype=D64)
    buffers0 = {k: v.clone() for k, v in lazy.model0.state_dict().items()}
    lazy.train()
    assert torch.equal(lazy(x), torch.zeros(16, 2, dtype=D64))  # h(w0) = 0 in training mode
    assert int(net.bn.num_batches_tracked) == 1  # the live model updates its statistics as usual
    for k, v in lazy.model0.state_dict().items():  # the frozen copy's state is never touched
        assert torch.equal(v, buffers0[k]), k
    lazy.eval()
    assert torch.equal(lazy(x), torch.zeros(16, 2, dtype=D64))  # and in eval mode (current running stats)
    # after a step the output moves (the centering did not cancel the trainable part)
    lazy.train()
    loss = lazy.loss(x, torch.randn(16, 2, dtype=D64))
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    assert lazy(x).abs().max() > 0


def test_linearized_refuses_train_mode_batchnorm_and_dropout():
    net = _BNDrop().double()
    with pytest.raises(ValueError, match=r"bn \(BatchNorm1d\).*model.eval\(\)"):
        lazyfast.Linearized(net)
    lin = lazyfast.Linearized(net.eval())  # documented: the eval-mode network is linearized
    x = torch.randn(4, 3, dtype=D64)
    torch.testing.assert_close(lin(x), net(x))


# ----------------------------------------------------------------------------- item 5: KernelGradientFlow
def _psd(n=6):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(n, 9, dtype=D64, generator=g)
    return J @ J.T


def test_kernel_gradient_flow_refuses_what_it_cannot_solve():
    K, y = _psd(), torch.randn(6, 2, dtype=D64)
    with pytest.raises(ValueError, match="eig_rtol"):
        lazyfast.KernelGradientFlow(K, y, eig_rtol=2.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        lazyfast.KernelGradientFlow(-K, y)
    asym = K.clone()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        lazyfast.KernelGradientFlow(asym, y)
    flow = lazyfast.KernelGradientFlow(K, y)
    with pytest.raises(ValueError, match="f0_test"):
        flow.test_predictions(K[:3], torch.zeros(3, 1, dtype=D64))
    # the accepted ones still solve: t = inf interpolates
    torch.testing.assert_close(flow.train_predictions(math.inf), y)


# ----------------------------------------------------------------------------- item 6: empty batch
@pytest.mark.parametrize("kind", ["two_layer", "generic"])
def test_linearized_on_an_empty_batch(kind):
    torch.manual_seed(0)
    net = _two_layer() if kind == "two_layer" else nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    lin = lazyfast.Linearized(net)
    x = _x()[:0]
    out = lin(x)
    assert out.shape == (0, 2)
    out.sum().backward()  # differentiable, zero gradients
    assert all(p.grad is None or not p.grad.any() for p in lin.parameters())
    assert lin.tangent(x).shape == (0, 2)


# ----------------------------------------------------------------------------- item 7: extreme alpha
@pytest.mark.parametrize("alpha", [1e-200, 1e-160, 1e160, 1e300])
def test_extreme_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        lazyfast.LazyModel(_two_layer(), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        lazyfast.scaled_loss(torch.zeros(2, 1, dtype=D64), torch.zeros(2, 1, dtype=D64), alpha=alpha)


def test_alpha_out_of_range_for_float32_and_scaled_loss_underflow():
    with pytest.raises(ValueError, match="float32"):
        lazyfast.LazyModel(lazyfast.TwoLayer(3, 8), alpha=1e25)
    with pytest.raises(ValueError, match="alpha"):
        lazyfast.scaled_loss(torch.zeros(2, 1), torch.zeros(2, 1), alpha=1e-320)


def test_diverging_training_warns():
    torch.manual_seed(0)
    model = lazyfast.LazyModel(_two_layer(k=1, symmetric=True), alpha=1.0, center=False)
    x, y = _x(8), torch.randn(8, 1, dtype=D64)
    with pytest.warns(RuntimeWarning, match="diverged"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            train(model, x, y, TrainConfig(lr=1e6, steps=60, log_every=1))


# ----------------------------------------------------------------------------- item 8: stored-work integrity
def _lines(path):
    with open(path, "rb") as f:
        return f.read().split(b"\n")


def test_run_store_does_not_reuse_an_edited_record(tmp_path, capsys):
    path = str(tmp_path / "runs.jsonl")
    RunStore(path).put("a", {"v": 1.0})
    rec = json.loads(_lines(path)[0])
    rec["result"]["v"] = 2.0  # a well-formed but edited record
    with open(path, "w") as f:
        f.write(json.dumps(rec) + "\n")
    store = RunStore(path)
    assert "a" not in store
    assert store.run("a", lambda: {"v": 1.0}) == {"v": 1.0}
    assert "checksum" in capsys.readouterr().err


def test_run_store_repairs_a_torn_last_line_once(tmp_path, capsys):
    path = str(tmp_path / "runs.jsonl")
    RunStore(path).put("a", {"v": 1})
    with open(path, "ab") as f:
        f.write(b'{"key": "b", "resu')  # a write killed midway
    s2 = RunStore(path)
    assert "incomplete" in capsys.readouterr().err
    s2.put("c", {"v": 3})
    s3 = RunStore(path)
    assert capsys.readouterr().err == ""  # reported once: the repair made the file clean
    assert s3.get("a") == {"v": 1} and s3.get("c") == {"v": 3} and "b" not in s3


def test_run_store_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b'\xff\xfe{"key": 1}\n')
    from lazyfast import _store

    with pytest.raises(_store.IntegrityError, match="runs.jsonl.*not UTF-8"):
        RunStore(str(path))


def test_run_store_fingerprint_keeps_runs_of_other_data_apart(tmp_path):
    path = str(tmp_path / "runs.jsonl")
    RunStore(path, fingerprint="data-A").put("a", {"v": 1})
    assert "a" not in RunStore(path, fingerprint="data-B")
    assert RunStore(path, fingerprint="data-A").get("a") == {"v": 1}


def _edit_first_float(path, old: float, new: float, dtype=torch.float32):
    data = bytearray(path.read_bytes())
    ob = torch.tensor([old], dtype=dtype).numpy().tobytes()
    i = data.find(ob)
    assert i >= 0
    data[i:i + len(ob)] = torch.tensor([new], dtype=dtype).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_ntk_shards_do_not_reuse_an_edited_block(tmp_path):
    torch.manual_seed(0)
    model, x = lazyfast.TwoLayer(3, 8), torch.randn(6, 3)
    full = distributed_ntk(model, x, block_size=3, out_dir=str(tmp_path)).kernel
    _edit_first_float(tmp_path / "block_00000.pt", float(full[0, 0]), 123.0)
    again = distributed_ntk(model, x, block_size=3, out_dir=str(tmp_path))
    assert again.computed_blocks == [0]
    assert torch.equal(again.kernel, full)


def test_ntk_shards_fingerprint_includes_the_data(tmp_path):
    torch.manual_seed(0)
    model, x = lazyfast.TwoLayer(3, 8), torch.randn(6, 3)
    distributed_ntk(model, x, block_size=3, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="different problem"):
        distributed_ntk(model, x + 1, block_size=3, out_dir=str(tmp_path))


# ----------------------------------------------------------------------------- items 9, 10: train
def test_train_does_not_resume_on_different_data_of_the_same_size(tmp_path):
    torch.manual_seed(0)
    ck = str(tmp_path / "ck.pt")
    x, y = _x(8), torch.randn(8, 2, dtype=D64)
    cfg = TrainConfig(lr=0.1, steps=3)
    train(_two_layer(), x, y, cfg, checkpoint_path=ck)
    with pytest.raises(CheckpointError, match="different configuration or data"):
        train(_two_layer(), x + 1, y, cfg, checkpoint_path=ck, resume=True)


def test_train_checks_the_checkpoint_path_before_training(tmp_path):
    steps = []
    with pytest.raises(ValueError, match="checkpoint_path.*does not exist"):
        train(_two_layer(), _x(8), torch.randn(8, 2, dtype=D64), TrainConfig(lr=0.1, steps=3),
              checkpoint_path=str(tmp_path / "missing" / "ck.pt"), callback=steps.append)
    assert steps == []  # refused before the first step


# ----------------------------------------------------------------------------- item 11 and CLI style
class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """Runs ``lazyfast ARGS`` in-process (a subprocess costs seconds of imports)."""
    from lazyfast import cli as cli_module

    def run(*args):
        capsys.readouterr()
        try:
            rc = cli_module.main(list(args))
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)

    return run


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_ntk_device_cuda_without_cuda_is_an_error(tmp_path, cli):
    r = cli("ntk", "--synthetic", "4", "--input-dim", "3", "--width", "8", "--device", "cuda",
             "--out", str(tmp_path))
    assert r.returncode == 2 and "error: --device cuda" in r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args, needle", [
    (("ntk", "--synthetic", "4", "--block-size", "0", "--out", "OUT"), "--block-size"),
    (("ntk", "--model", "mlp", "--widths", "8,abc", "--synthetic", "4", "--out", "OUT"), "--widths"),
    (("ntk", "--out", "OUT"), "--data"),
    (("example", "--n", "0"), "--n"),
    (("bench", "--workloads", "nope"), "workloads"),
    (("reproduce", "cover", "--set", "novalue"), "--set"),
])
def test_cli_bad_arguments_are_one_error_line_exit_2(tmp_path, cli, args, needle):
    r = cli(*[str(tmp_path) if a == "OUT" else a for a in args])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lazyfast {args[0]}") and "error:" in last and needle in last


def test_cli_ntk_progress_per_block(tmp_path, cli):
    r = cli("ntk", "--synthetic", "5", "--input-dim", "3", "--width", "8", "--block-size", "2",
             "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "block" in ln and "computed" in ln][-1].startswith(
        "rank 0/1: block 3/3 rows 4:5 computed")


# ----------------------------------------------------------------------------- unclear errors
def test_constructor_errors_name_the_argument():
    with pytest.raises(TypeError, match="widths must be a list"):
        lazyfast.MLP(4, 5, 2)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        lazyfast.TwoLayer(3, 4, symmetric="no")
    with pytest.raises(TypeError, match="bias must be a bool"):
        lazyfast.MLP(4, [5], 2, bias="False")
    with pytest.raises(TypeError, match="center must be a bool"):
        lazyfast.LazyModel(_two_layer(), 1.0, center="yes")


def test_train_messages_name_the_right_argument():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match=r"x_test has per-sample shape \(5,\) but x_train has \(3,\)"):
        train(model, _x(4), torch.randn(4, 2, dtype=D64), TrainConfig(lr=0.1, steps=1),
              x_test=_x(4, 5), y_test=torch.randn(4, 2, dtype=D64))


def test_solver_errors_name_the_argument():
    model, x = _two_layer(), _x(6)
    with pytest.raises(TypeError, match="ridge"):
        lazyfast.kernel_regression_cg(model, x, torch.randn(6, 2, dtype=D64), ridge=None)
    with pytest.raises(TypeError, match="y has dtype"):
        lazyfast.kernel_regression_cg(model, x, torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"y must have shape \(6, 2\)"):
        lazyfast.kernel_regression_cg(model, x, torch.randn(6, 3, dtype=D64))
    with pytest.raises(ValueError, match="x0"):
        lazyfast.kernel_regression_cg(model, x, torch.randn(6, 2, dtype=D64), x0=torch.zeros(6, 1, dtype=D64))
    flow = lazyfast.KernelGradientFlow(_psd(), torch.randn(6, 1, dtype=D64))
    with pytest.raises(TypeError, match="K_test has dtype"):
        flow.test_predictions(_psd()[:2].float())


def test_linearized_under_inference_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    lin = lazyfast.Linearized(net)
    x = _x()
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(0.01)
    want = lin(x).detach()
    lin.clear_cache()
    for _ in range(3):  # the first, second (cached) and third call
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), want)
    torch.testing.assert_close(lin(x), want)  # and outside it again


def test_check_input_allow_grad_false_refuses_inputs_requiring_grad():
    x = _x().requires_grad_()
    with pytest.raises(ValueError, match="x1 requires grad.*x1.detach"):
        _validation.check_input(x, "x1", allow_grad=False)
    assert _validation.check_input(x, "x1") is x


def test_check_input_allow_integer():
    ids = torch.randint(0, 5, (4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        _validation.check_input(ids, "x")
    emb = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Flatten(), torch.nn.Linear(12, 1))
    assert _validation.check_input(ids, "x", emb, allow_integer=True) is ids
    with pytest.raises(TypeError, match="real features"):  # a model that declares real features refuses ids
        _validation.check_input(ids, "x", _two_layer(), allow_integer=True)
    with pytest.raises(TypeError, match="floating-point"):
        _validation.check_input(ids.bool(), "x", allow_integer=True)


needs_ops = pytest.mark.skipif(lazyfast._ext._C is None, reason="compiled ops not built")


@needs_ops
def test_fake_kernels_check_shapes():
    meta = dict(device="meta", dtype=torch.float32)
    A, B, x = torch.empty(6, 3, **meta), torch.empty(2, 6, **meta), torch.empty(5, 4, **meta)
    with pytest.raises(RuntimeError, match="x1 must be .n, d. with d = A.shape.1. = 3"):
        torch.ops.lazyfast.two_layer_ntk(x, None, A, None, B, 1.0, 1, True)
    with pytest.raises(RuntimeError, match="at least one tangent"):
        torch.ops.lazyfast.two_layer_jvp(torch.empty(5, 3, **meta), A, None, B, 1.0, 1, None, None, None)
    with pytest.raises(RuntimeError, match="r must be"):
        torch.ops.lazyfast.two_layer_vjp(torch.empty(5, 3, **meta), A, None, B, 1.0, 1, torch.empty(4, 2, **meta))
    out = torch.ops.lazyfast.two_layer_ntk(torch.empty(5, 3, **meta), None, A, None, B, 1.0, 1, True)
    assert out.shape == (5, 5, 2, 2)


@needs_ops
def test_torch_compile_traces_two_layer_entk_without_graph_breaks_when_checks_are_off():
    import torch._dynamo as dynamo

    model, x = _two_layer(), _x(6)
    f = lambda x: lazyfast.empirical_ntk(model, x)  # noqa: E731
    dynamo.reset()
    try:
        with lazyfast.checks(finite=False):
            assert not _validation.finite_checks_enabled()
            explained = dynamo.explain(f)(x)
            assert explained.graph_break_count == 0, explained.break_reasons
            dynamo.reset()
            compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), f(x), rtol=1e-12, atol=1e-12)
        assert _validation.finite_checks_enabled()  # restored on exit
    finally:
        dynamo.reset()


def test_finite_checks_opt_out_lets_nan_through_and_is_restored():
    model, x = _two_layer(), _x()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x1 contains NaN"):
        lazyfast.empirical_ntk(model, x)
    with lazyfast.checks(finite=False):
        K = lazyfast.empirical_ntk(model, x)  # no host sync, no check: NaN propagates
    assert K.shape == (5, 5)
    lazyfast.checks.set(finite=False)
    try:
        assert not _validation.finite_checks_enabled()
    finally:
        lazyfast.checks.set(finite=True)
    with pytest.raises(TypeError, match="finite must be a bool"):
        lazyfast.checks(finite="no")


def test_check_finite_is_one_fused_check_naming_the_first_bad_tensor():
    a, b, c = torch.ones(3), torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")])
    with pytest.raises(ValueError, match="^b contains"):
        _validation.check_finite(a=a, b=b, c=c, d=None)
    _validation.check_finite(a=a, ids=torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- kill during write
_CHILD_COMMON = r'''
import os, sys, time
sys.path.insert(0, {root!r})
from lazyfast import _store
KILL_AT = int(os.environ.get("KILL_AT", "-1"))
calls = [0]
_real_write, _real_replace = os.write, os.replace

def write_half_then_hang(fd, data):
    # the KILL_AT-th write stops halfway, then waits to be killed
    calls[0] += 1
    if calls[0] == KILL_AT:
        _real_write(fd, bytes(data[: len(data) // 2]))
        os.fsync(fd)
        print("HALF", flush=True)
        time.sleep(600)
    return _real_write(fd, data)

def hang_before_replace(src, dst):
    calls[0] += 1
    if calls[0] == KILL_AT:
        print("HALF", flush=True)
        time.sleep(600)
    return _real_replace(src, dst)
'''

_CHILD_STORE = _CHILD_COMMON + r'''
_store.os.write = write_half_then_hang
from lazyfast.experiments.common import RunStore
store = RunStore(sys.argv[1], fingerprint="fp")
for i in range(6):
    store.run(f"run{{i}}", lambda: {{"i": i, "values": [i / 7.0] * 2000}})
print("DONE", flush=True)
'''

_CHILD_SHARDS = _CHILD_COMMON + r'''
import torch
_store.os.replace = hang_before_replace
import lazyfast
from lazyfast.distributed import distributed_ntk
torch.manual_seed(0)
model, x = lazyfast.TwoLayer(3, 16), torch.randn(10, 3)
distributed_ntk(model, x, block_size=3, out_dir=sys.argv[1])
print("DONE", flush=True)
'''


def _run_until_killed(script, arg, kill_at, tmp_path):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "child.py"
    path.write_text(script.format(root=root))
    env = dict(os.environ, KILL_AT=str(kill_at), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(path), arg], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "HALF", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_run_store_killed_mid_append_recovers_to_the_uninterrupted_result(tmp_path, capsys):
    killed = str(tmp_path / "killed.jsonl")
    _run_until_killed(_CHILD_STORE, killed, kill_at=4, tmp_path=tmp_path)  # 3 records whole, the 4th torn
    with open(killed, "rb") as f:
        assert not f.read().endswith(b"\n")  # the kill really left a torn line
    computed = []

    def rerun(path):
        store = RunStore(path, fingerprint="fp")
        return {f"run{i}": store.run(f"run{i}", lambda i=i: computed.append(i) or
                                     {"i": i, "values": [i / 7.0] * 2000}) for i in range(6)}

    resumed = rerun(killed)
    assert computed == [3, 4, 5]  # the three whole records were reused, the torn one recomputed
    assert "incomplete" in capsys.readouterr().err
    fresh = rerun(str(tmp_path / "fresh.jsonl"))
    assert resumed == fresh
    again = RunStore(killed, fingerprint="fp")  # the repaired file reads clean, every record trusted
    assert len(again) == 6 and capsys.readouterr().err == ""


def test_ntk_shards_killed_mid_write_recover_to_the_uninterrupted_kernel(tmp_path):
    out = tmp_path / "shards"
    # the 1st os.replace is the manifest, the 4th is block 2: killed after its bytes, before its rename
    _run_until_killed(_CHILD_SHARDS, str(out), kill_at=4, tmp_path=tmp_path)
    assert sorted(p.name for p in out.glob("block_*.pt")) == ["block_00000.pt", "block_00001.pt"]
    assert list(out.glob(".*.tmp"))  # the killed write's temporary file
    # a block file torn by a non-atomic copy is refused by its checksum, not loaded
    blk = out / "block_00001.pt"
    blk.write_bytes(blk.read_bytes()[:-7])
    torch.manual_seed(0)
    model, x = lazyfast.TwoLayer(3, 16), torch.randn(10, 3)
    res = distributed_ntk(model, x, block_size=3, out_dir=str(out))
    assert res.computed_blocks == [1, 2, 3] and res.skipped_blocks == [0]
    assert not list(out.glob(".*.tmp"))
    fresh = distributed_ntk(model, x, block_size=3, out_dir=str(tmp_path / "fresh")).kernel
    assert torch.equal(res.kernel, fresh)
    assert distributed_ntk(model, x, block_size=3, out_dir=str(out)).skipped_blocks == [0, 1, 2, 3]


def test_distributed_ntk_probe_changes_no_module_state(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = _x(4)
    net.train()  # the k-probe must not advance BatchNorm's statistics
    state = {k: v.clone() for k, v in net.state_dict().items()}
    from lazyfast._validation import probe_out_features

    assert probe_out_features(net, x) == 2
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="inputs are empty"):
        probe_out_features(net, x[:0])


def test_run_store_never_truncates_a_file_that_is_not_a_store(tmp_path):
    from lazyfast import _store

    path = tmp_path / "runs.jsonl"
    path.write_bytes(b"\x89PNG\r\x1a binary without a final newline")
    with pytest.raises(_store.IntegrityError, match="runs.jsonl"):
        RunStore(str(path))
    assert path.read_bytes().startswith(b"\x89PNG")  # untouched
