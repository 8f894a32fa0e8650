"""benchmarks/bench_users_models.py's pooling of a row's rounds over fresh processes."""


def test_pooled_rounds_keep_each_process_aligned_and_recompute_the_ratios(script_module):
    b = script_module("benchmarks/bench_users_models.py")
    tut = "torch.func tutorial (J once)"
    p1 = dict(row="r", times={"lazyfast auto": [1.0, 2.0], tut: [3.0, 4.0], "floor": [0.5, 1.0]}, f32_rel_err={"x": 1})
    p2 = dict(row="r", times={"lazyfast auto": [4.0], tut: [2.0], "floor": [8.0]}, f32_rel_err={"x": 1})
    r = b.pooled([p1, p2])
    assert r["processes"] == 2 and r["times"]["lazyfast auto"] == [1.0, 2.0, 4.0]
    assert r["tutorial_over_lazyfast"]["rounds"] == [3.0, 2.0, 0.5]
    assert r["tutorial_over_lazyfast"]["median"] == 2.0 and r["tutorial_over_lazyfast"]["min"] == 0.5
    assert r["lazyfast_over_floor"]["rounds"] == [2.0, 2.0, 0.5]
    assert r["seconds"]["lazyfast auto"] == 2.0


def test_a_row_without_the_tutorial_pools_to_no_tutorial_ratio(script_module):
    b = script_module("benchmarks/bench_users_models.py")
    p = dict(row="r", times={"lazyfast auto": [1.0], "floor": [2.0]})
    r = b.pooled([p, p])
    assert r["tutorial_over_lazyfast"] is None and r["lazyfast_over_floor"]["rounds"] == [0.5, 0.5]
