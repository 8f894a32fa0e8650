"""benchmarks/bench_models.py's protocol: all methods of a row timed in interleaved rounds (A B C A B C
...), each in its own persistent child process; per method the median time over rounds, per ratio the
median of the per-round ratios with its min–max (lazyfast.bench.protocol.interleaved_rounds,
ratio_summary); a child that times out is recorded, never dropped."""
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import time

import pytest

from lazyfast.bench.protocol import format_ratio, interleaved_rounds, per_round_ratios, ratio_summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_models", ROOT / "benchmarks" / "bench_models.py")
bench_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_models)


def test_rounds_interleave_every_method_and_a_failing_one_keeps_its_earlier_rounds():
    calls = []

    def timer(name, fail_on=None):
        def t():
            calls.append(name)
            if fail_on is not None and calls.count(name) == fail_on:
                raise RuntimeError("boom")
            return float(len(calls))
        return t

    times, errors = interleaved_rounds({"A": timer("A"), "B": timer("B", fail_on=2), "C": timer("C")}, 3,
                                       drop_failing=True)
    assert calls == ["A", "B", "C", "A", "B", "C", "A", "C"]
    assert times == {"A": [1.0, 4.0, 7.0], "B": [2.0], "C": [3.0, 6.0, 8.0]}
    assert errors == {"B": "round 2: RuntimeError: boom"}
    with pytest.raises(RuntimeError):  # without drop_failing it propagates
        interleaved_rounds({"B": timer("B", fail_on=4)}, 3)


def test_ratio_summary_is_the_median_of_per_round_ratios():
    r = ratio_summary(per_round_ratios([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]))
    assert r == dict(median=3.0, min=2.0, max=3.0, rounds=[2.0, 3.0, 3.0])
    assert format_ratio(r) == "3.00× [2.00–3.00]" and format_ratio(None) == ""
    assert ratio_summary([]) is None


def test_ratio_vs_auto_reads_both_formats():
    assert bench_models.ratio_vs_auto({"ratio_vs_auto": 2.5}) == dict(median=2.5, min=None, max=None)
    new = dict(median=2.0, min=1.5, max=3.0, rounds=[1.5, 2.0, 3.0])
    assert bench_models.ratio_vs_auto({"ratio_vs_auto": new}) is new
    assert bench_models.ratio_vs_auto({}) is None


@pytest.mark.slow
def test_a_row_by_interleaved_rounds_in_child_processes():
    row = bench_models.R("mlp", "tiny_mlp", 16, "trace")
    meths = ["lazyfast auto", bench_models.TUTORIAL, "nngeometry GramMatrix"]
    py = sys.executable
    res = bench_models.run_row(row, meths, python_main=py, python_peers=py, threads=1, rounds=2, timeout=300,
                               budget=1 << 30, log=lambda *a: None)
    assert res["reference"]["status"] == "ok"
    by = {r["method"]: r for r in res["results"]}
    assert [r["method"] for r in res["results"]] == meths
    a, t = by["lazyfast auto"], by[bench_models.TUTORIAL]
    for r in (a, t):
        assert r["status"] == "ok" and r["correct"] and r["rel_err"] < 1e-5 and r["state_unchanged"]
        assert len(r["times"]) == 2 and r["timed_runs"] == "2 rounds"
        assert r["seconds"] == statistics.median(r["times"]) and r["peak_rss_mb"] > 0
    assert t["ratio_vs_auto"]["rounds"] == pytest.approx([x / y for x, y in zip(t["times"], a["times"])])
    assert t["ratio_vs_auto"]["min"] <= t["ratio_vs_auto"]["median"] <= t["ratio_vs_auto"]["max"]
    assert "ratio_vs_auto" not in a
    ng = by["nngeometry GramMatrix"]  # recorded, never dropped (installed or not)
    assert ng["status"] == "ok" or ng["status"].startswith(("not installed", "failed"))


@pytest.mark.slow
def test_a_cold_row_and_a_timed_out_child_are_recorded():
    row = bench_models.R("mlp", "tiny_mlp", 16, "trace", rounds=0)
    py = sys.executable
    res = bench_models.run_row(row, ["lazyfast auto"], python_main=py, python_peers=py, threads=1, rounds=2,
                               timeout=300, budget=1 << 30, log=lambda *a: None)
    a = res["results"][0]
    assert a["timed_runs"] == "1 (cold)" and a["times"] == [a["warmup_seconds"]] and "ratio_vs_auto" not in a
    res = bench_models.run_row(row, ["lazyfast auto"], python_main=py, python_peers=py, threads=1, rounds=2,
                               timeout=0.01, budget=1 << 30, log=lambda *a: None)
    assert res["reference"]["status"].startswith("timed out after 0.01 s")
    assert res["results"][0]["status"].startswith("timed out after 0.01 s (warm-up)")


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="Linux schedstat")
def test_settle_waits_until_a_busy_child_is_idle():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.4: pass\n"
                             "time.sleep(30)"])
    try:
        time.sleep(0.1)  # it is spinning now
        waited = bench_models.settle(busy.pid)
        assert 0.15 < waited < 1.5, waited
        assert bench_models.settle(busy.pid) < 0.1  # asleep: at once
    finally:
        busy.kill()
        busy.wait()
