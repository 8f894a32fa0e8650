"""The generated blocks of README.md, docs/benchmarks.md and docs/REPRODUCTION.md
(scripts/update_readme.py, DOCS: which document holds which block) are rebuilt from committed files:
the performance tables from benchmarks/results/, the reproduction blocks from docs/figures/, the
README's summary from both. A block edited by hand, or a results file regenerated without
regenerating the documents, fails here."""
import importlib.util
import json
import pathlib
import re
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
update_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_readme)


def _copy_docs(tmp_path) -> pathlib.Path:
    """A tree holding copies of the documents with generated blocks (to edit in a test)."""
    for doc in update_readme.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    return tmp_path


def test_every_block_matches_its_results_file():
    assert update_readme.check() == [], "run: python scripts/update_readme.py"


def test_every_block_is_in_exactly_one_document():
    names = [n for names in update_readme.DOCS.values() for n in names]
    assert sorted(names) == sorted(update_readme.GENERATORS)
    for doc, names in update_readme.DOCS.items():
        assert set(update_readme.blocks((ROOT / doc).read_text(), names, doc)) == set(names)


def test_every_performance_table_names_a_stamped_results_file():
    docs = {n: doc for doc, names in update_readme.DOCS.items() for n in names}
    assert set(update_readme.TABLES) <= set(docs)
    for name in update_readme.TABLES:
        text = update_readme.blocks((ROOT / docs[name]).read_text(), [name], docs[name])[name]
        m = re.match(r"\*Generated from `(benchmarks/results/[^`]+)` \(`([^`]+)`; (\d{4}-\d\d-\d\d [\d:]+ UTC), "
                     r"commit (\S+), load average ([^,]+),", text)
        assert m, (name, text[:200])
        assert (ROOT / m.group(1)).exists(), m.group(1)
        assert m.group(4) not in ("None", ""), (name, "no commit recorded")
        assert m.group(5) != "None", (name, "no load average recorded")


def test_the_readme_summary_links_to_the_detail():
    text = update_readme.blocks((ROOT / "README.md").read_text(), ["summary"])["summary"]
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| result ")]
    assert 3 <= len(rows) <= 10, "a few headline rows"
    for row in rows:
        assert re.search(r"\]\(docs/(benchmarks|REPRODUCTION)\.md#[\w-]+\)", row), row


@pytest.mark.parametrize("table,file,edit", [
    ("two-layer", "two_layer_cpu.json", lambda d: d["gram"]["time_s"].__setitem__("fused_asym", 1.5 * d["gram"]["time_s"]["fused_asym"])),
    ("engine", "engine_cpu.json", lambda d: d["cg"].__setitem__("iterations", d["cg"]["iterations"] + 1)),
    ("bench-quick", "bench-quick-cpu.json", lambda d: d["rows"][0].__setitem__("seconds", 2 * d["rows"][0]["seconds"])),
    ("mlp", "mlp_cpu.json", lambda d: d["benchmarks"][0]["stats"].__setitem__("min", 2 * d["benchmarks"][0]["stats"]["min"])),
])
def test_a_changed_results_file_is_detected(tmp_path, table, file, edit):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    data = json.loads((results / file).read_text())
    edit(data)
    (results / file).write_text(json.dumps(data))
    assert table in update_readme.check(ROOT, results)


def test_a_changed_results_file_changes_the_readme_summary(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    data = json.loads((results / "engine_cpu.json").read_text())
    data["cg"]["peak_mb"] *= 2
    (results / "engine_cpu.json").write_text(json.dumps(data))
    assert {"engine", "summary"} <= set(update_readme.check(ROOT, results))


def test_a_hand_edited_table_is_detected(tmp_path):
    root = _copy_docs(tmp_path)
    path = root / "docs" / "benchmarks.md"
    text = path.read_text()
    start = text.index("<!-- two-layer:start -->")
    i = text.index("**", start) + 2  # first bold figure in the table
    path.write_text(text[:i] + "9" + text[i:])
    assert update_readme.check(root) == ["two-layer"]


def test_missing_markers_are_an_error(tmp_path):
    root = _copy_docs(tmp_path)
    path = root / "docs" / "benchmarks.md"
    path.write_text(path.read_text().replace("<!-- engine:end -->", ""))
    with pytest.raises(ValueError, match="engine"):
        update_readme.check(root)


def test_a_block_in_the_wrong_document_is_an_error(tmp_path):
    root = _copy_docs(tmp_path)
    path = root / "README.md"
    path.write_text(path.read_text() + "\n<!-- engine:start -->\n<!-- engine:end -->\n")
    with pytest.raises(ValueError, match="another document"):
        update_readme.check(root)


# Files outside the repository must not be cited by what ships in it (the design notes, anchors and
# paper notes were private working documents). Other files are checked once their owners fix them.
_PRIVATE = re.compile("DES" + r"IGN\.md|" + "ANCH" + "ORS" + "|" + "paper" + "-notes")


def test_no_citation_of_files_outside_the_repository():
    paths = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "docs" / "design.md", ROOT / "docs" / "benchmarks.md",
             ROOT / "docs" / "guide.md", ROOT / "lazyfast" / "_ext.py",
             ROOT / "lazyfast" / "__init__.py", ROOT / "lazyfast" / "bench.py", ROOT / "setup.py"]
    paths += sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*"))
    paths += sorted((ROOT / "tests").glob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in paths if p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if _PRIVATE.search(line)]
    assert hits == []


def test_cuda_only_line_table_matches_the_sources():
    """docs/gpu.md's CUDA-only line count is generated (scripts/cuda_lines.py), and its 'before'
    figure is the same count at the commit it names."""
    import sys as _sys

    root = pathlib.Path(__file__).resolve().parents[1]
    _sys.path.insert(0, str(root / "scripts"))
    import cuda_lines

    assert cuda_lines.main(["--check"]) == 0
    m = re.search(r"\(commit (\w+)\) the same count gave (\d+) lines", (root / "docs" / "gpu.md").read_text())
    assert m, "docs/gpu.md states the count before the shared driver"
    before = cuda_lines.count_at(m.group(1), root)
    if before is None:
        pytest.skip("not a git checkout with that commit")
    assert before == int(m.group(2))


def test_reproduction_tables_match_docs_figures():
    assert update_readme.check(ROOT) == [], "run: python scripts/update_readme.py"


def test_a_changed_figure_file_changes_the_reproduction_table_and_its_verdict(tmp_path):
    from lazyfast.experiments import claims

    figures = tmp_path / "figures"
    shutil.copytree(ROOT / "docs" / "figures", figures)
    before = claims.table(figures)
    data = json.loads((figures / "rates.json").read_text())
    data["summary"]["slopes"]["param_gap"] = -1.5  # outside −2 ± 0.15
    data["summary"]["within_tolerance"]["param_gap"] = False
    (figures / "rates.json").write_text(json.dumps(data))
    after = claims.table(figures)
    row = next(line for line in after.splitlines() if line.startswith("| `rates`"))
    assert row.endswith("| **no** |") and "−1.500" in row
    # the reproduction table and the README's summary row of the claims both move
    assert update_readme.check(ROOT, figures=figures) == ["summary", "reproduction"]
    assert before != after


def test_every_experiment_has_a_row():
    from lazyfast.experiments import claims
    from lazyfast.experiments import EXPERIMENTS

    table = claims.table()
    for name in EXPERIMENTS:
        assert f"| `{name}`" in table, name


def _nt_rounds_result():
    """A nt_compare_cpu.json of benchmarks/bench_nt.py's interleaved-rounds format, built by its own
    helpers (the script imports jax only in main())."""
    spec = importlib.util.spec_from_file_location("bench_nt", ROOT / "benchmarks" / "bench_nt.py")
    bench_nt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_nt)
    sd, jc, lf = [1.0, 1.2, 1.1], [0.8, 0.9, 0.7], [0.5, 0.5, 0.4]
    res = [dict(method=bench_nt.SD, seconds=1.1, min_seconds=1.0, max_seconds=1.2, times=sd,
                compile_and_first_call_seconds=3.0),
           dict(method="neural-tangents JC (jit, warm)", seconds=0.8, min_seconds=0.7, max_seconds=0.9, times=jc,
                compile_and_first_call_seconds=2.0),
           dict(method="lazyfast auto (ConvNet3)", seconds=0.5, min_seconds=0.4, max_seconds=0.5, times=lf,
                rel_diff_vs_nt=1e-7, agrees=True,
                nt_sd_over_lazyfast=bench_nt.summary([a / b for a, b in zip(sd, lf)]),
                nt_fastest_over_lazyfast=bench_nt.summary([a / b for a, b in zip(jc, lf)]))]
    rows = [dict(id="conv3_k10", note="3-conv CNN, 10 outputs", n=128, order=[r["method"] for r in res], results=res,
                 nt_fastest="neural-tangents JC (jit, warm)", nt_not_timed={}, nt_alternatives_note="")]
    old = json.loads((ROOT / "benchmarks" / "results" / "nt_compare_cpu.json").read_text())
    return bench_nt, dict(machine=old["machine"], protocol="interleaved rounds", rounds=3, quick=False, rows=rows,
                          targets=bench_nt.targets(rows))


def test_the_nt_table_reads_interleaved_rounds(tmp_path):
    bench_nt, data = _nt_rounds_result()
    t = {x["target"].split(" vs ")[1]: x for x in data["targets"]}
    assert t["neural-tangents SD"]["measured"] == pytest.approx(2.4) and t["neural-tangents SD"]["met"]  # median ratio
    fastest = t["neural-tangents' fastest (neural-tangents JC)"]
    assert (fastest["measured"], fastest["met"]) == (pytest.approx(1.75), True)
    assert "| 2.40× [2.00–2.75] | 1.75× [1.60–1.80] |" in bench_nt.markdown(data)
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    (results / "nt_compare_cpu.json").write_text(json.dumps(data))
    table = update_readme.table_nt(results)
    assert "3 interleaved rounds" in table
    assert "| JC 0.8 s | (ConvNet3) 0.5 s | 2.40× [2.00–2.75] | 1.75× [1.60–1.80] |" in table
    assert "| >= 1.5× | 1.75× [1.60–1.80] | yes |" in table
    summary = update_readme.table_summary(results, update_readme.FIGURES)
    assert "**2.40×** its structured derivatives, 1.75× its fastest method; 2 of 2 targets met" in summary
    assert {"nt", "summary"} <= set(update_readme.check(ROOT, results))


def _as_rounds(row: dict, factors) -> dict:
    """``row`` (a models_cpu*.json row of the earlier protocol) as an interleaved-rounds run would
    write it: per-round times (its time × factors), median time, per-round ratios and their summary."""
    from lazyfast.bench.protocol import per_round_ratios, ratio_summary

    row = json.loads(json.dumps(row))
    recs = {x["method"]: x for x in row["results"]}
    auto = recs["lazyfast auto"]
    auto_times = [auto["seconds"] * f for f in factors]
    for m, x in recs.items():
        if x.get("seconds") is None:
            continue
        # the others' times vary against auto's in the opposite direction: each ratio spreads
        x["times"] = auto_times if m == "lazyfast auto" else [x["seconds"] / f for f in factors]
        x["seconds"], x["timed_runs"] = sorted(x["times"])[len(factors) // 2], f"{len(factors)} rounds"
        if m != "lazyfast auto":
            x["ratio_vs_auto"] = ratio_summary(per_round_ratios(x["times"], auto_times))
    return row


def test_the_models_table_renders_an_interleaved_rounds_run_beside_the_earlier_ones(tmp_path):
    """A later run by interleaved rounds (benchmarks/bench_models.py --rounds): its rows replace the same
    rows of the earlier runs (latest date wins), its ratios render as ``median× [min–max]`` in the models
    table, its targets and the README's summary, and a run that no longer gives a row is not listed."""
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    for f in results.glob("models_cpu_rounds*.json"):  # the runs of the earlier protocol only
        f.unlink()
    old = json.loads((results / "models_cpu_update.json").read_text())
    rows = {r["id"]: r for r in old["rows"]}
    factors = (1.0, 1.1, 0.9, 1.05, 0.95)
    new = dict(machine=dict(old["machine"], date="2099-01-01 00:00 UTC", command="python benchmarks/bench_models.py "
                            "--rounds 5 --rows transformer --out benchmarks/results/models_cpu_rounds"),
               protocol=dict(old["protocol"], rounds=5), rows=[_as_rounds(rows["transformer"], factors)])
    for k in ("repeats", "slow_seconds"):
        new["protocol"].pop(k)
    (results / "models_cpu.json").write_text(json.dumps(new))  # replaces run (a): an interleaved-rounds run
    table = update_readme.table_models(results)
    tut = next(x for x in new["rows"][0]["results"] if x["method"] == "torch.func tutorial (J once)")
    r = tut["ratio_vs_auto"]
    want = f"{update_readme._x(r['median'])} [{update_readme._x(r['min'])[:-1]}–{update_readme._x(r['max'])[:-1]}]"
    assert r["min"] < r["median"] < r["max"]
    line = next(x for x in table.splitlines() if x.startswith("| 2-layer nn.TransformerEncoder"))
    assert f"| {want} |" in line and line.endswith("| a |")
    assert "run (a): one process per method, kept for its row" in table and "5 interleaved rounds" in table
    assert "runs (b), (c): fresh process per method" in table
    assert f"| Transformer: tutorial / auto | >= 2× | {r['median']:.3g} [{r['min']:.3g}–{r['max']:.3g}] |" in table
    token = next(x for x in table.splitlines() if x.startswith("| Embedding(1000, 128)"))
    assert token.endswith("| b |") and "× [" not in token  # still the earlier run's row
    summary = update_readme.table_summary(results, update_readme.FIGURES)
    assert f"({want}: transformer, n = 64, trace;" in summary
    assert {"models", "summary"} <= set(update_readme.check(ROOT, results))
    # a run that gives no row any more is not listed: every row of run (b) measured later
    later = dict(new, rows=[_as_rounds(r, factors) for r in old["rows"]])
    (results / "models_cpu.json").write_text(json.dumps(later))
    table = update_readme.table_models(results)
    assert "models_cpu_update.json" not in table and "models_cpu_full_mode.json" in table
