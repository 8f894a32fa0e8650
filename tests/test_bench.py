"""`lazyfast bench`: the harness itself (tiny sizes; the real run is `lazyfast bench --quick`)."""
import json

import pytest
import torch

from lazyfast import bench

TINY = dict(gram=dict(n=24, d=5, m=40), prod=dict(n=20, d=5, m=30, T=3), mlp=dict(n=16, d=5, w=12),
            step=dict(n=16, d=5, m=20), cg=dict(n=30, d=4, m=50), repeats=1, func_max_bytes=1 << 30, gemm=64)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.PRESETS, "tiny", TINY)
    return "tiny"


def test_every_workload_runs_and_agrees(tiny):
    res = bench.run(tiny, dtype=torch.float64, memory=False, log=lambda *a: None)
    rows = res["rows"]
    assert {r["workload"] for r in rows} == set(bench.WORKLOADS)
    assert all(r["agrees"] for r in rows), [r for r in rows if not r["agrees"]]
    for wl in bench.WORKLOADS:
        lf = [r for r in rows if r["workload"] == wl and r["implementation"].startswith("lazyfast")]
        assert len(lf) == 1 and lf[0]["speedup"], wl
    gram = [r for r in rows if r["workload"] == "two_layer_gram"]
    assert {r["implementation"] for r in gram} == {"dense PyTorch (GEMMs)", "lazyfast", "torch.func jacobian"}
    assert all(r["gflops"] > 0 and r["gemm_fraction"] > 0 for r in gram)
    table = bench.format_table(res)
    assert "| two_layer_gram | lazyfast |" in table and "GEMM rate measured in this run" in table


def test_disagreement_is_flagged(tiny, monkeypatch):
    real = bench.case_two_layer_vjp

    def broken(*args):
        case = real(*args)
        good = case.impls["lazyfast"]
        case.impls["lazyfast"] = lambda: tuple(1.01 * t for t in good())
        return case

    monkeypatch.setitem(bench.WORKLOADS, "two_layer_vjp", (broken, "prod"))
    res = bench.run(tiny, workloads=["two_layer_vjp"], dtype=torch.float64, memory=False, log=lambda *a: None)
    lf = [r for r in res["rows"] if r["implementation"] == "lazyfast"][0]
    assert not lf["agrees"] and lf["rel_err"] > 1e-3
    assert "DISAGREES" in bench.format_table(res)


def test_peak_memory_in_a_subprocess():
    # The child measures one call in a fresh process; a Gram of 512x512 float64 needs >= 2 MB.
    mb = bench.peak_mb("two_layer_gram", "dense PyTorch (GEMMs)", "quick", torch.float64, "cpu")
    assert mb is not None and mb >= 2.0


def test_cli_json_and_errors(tiny, tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--preset", "quick", "--workloads", "two_layer_vjp", "--no-memory", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["preset"] == "quick" and data["rows"]
    with pytest.raises(ValueError, match="unknown workloads"):
        bench.run("quick", workloads=["nope"], memory=False)
    with pytest.raises(ValueError, match="preset must be one of"):
        bench.run("huge", memory=False)


def _perturbed(monkeypatch, workload, wrap):
    real, key = bench.WORKLOADS[workload]

    def broken(*args):
        case = real(*args)
        good = case.impls["lazyfast"] if "lazyfast" in case.impls else case.impls["lazyfast matrix-free CG"]
        name = next(k for k in case.impls if k.startswith("lazyfast"))
        bad = lambda: wrap(good())  # noqa: E731
        bad.compare = getattr(good, "compare", True)
        case.impls[name] = bad
        return case

    monkeypatch.setitem(bench.WORKLOADS, workload, (broken, key))


def _lazyfast_row(tiny, workload, dtype):
    res = bench.run(tiny, workloads=[workload], dtype=dtype, memory=False, log=lambda *a: None)
    return [r for r in res["rows"] if r["implementation"].startswith("lazyfast")][0]


@pytest.mark.parametrize("workload,dtype", [("linearized_step", torch.float32), ("linearized_step", torch.float64),
                                            ("kernel_regression", torch.float32), ("kernel_regression", torch.float64),
                                            ("mlp_ntk", torch.float64)])
def test_one_percent_error_fails(tiny, monkeypatch, workload, dtype):
    # Unperturbed, the row agrees; the same result 1 % off (a 1 % wrong gradient for the step:
    # the parameter change scaled by 1.01) must be flagged.
    assert _lazyfast_row(tiny, workload, dtype)["agrees"]

    def off(out):
        return [1.01 * t for t in out] if isinstance(out, list) else 1.01 * out

    _perturbed(monkeypatch, workload, off)
    row = _lazyfast_row(tiny, workload, dtype)
    assert not row["agrees"] and row["rel_err"] > 5e-3, row


def test_linearized_step_compares_the_change_not_the_parameters(tiny):
    case = bench.build_case("linearized_step", tiny, torch.float64, "cpu")
    w0 = case.impls["lazyfast"]()  # first call: one step, returns w1 - w0
    again = case.impls["lazyfast"]()
    assert all(torch.equal(a, b) for a, b in zip(w0, again))  # the first step's change, kept
    assert all(float(t.abs().max()) > 0 for t in w0)


def test_stamp_has_machine_load_date_commit():
    st = bench.stamp("x")
    for key in ("machine", "load_avg", "date", "commit", "command", "torch", "threads"):
        assert key in st
    assert st["command"] == "x" and st["date"].endswith("UTC")
