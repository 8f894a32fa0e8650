"""README.md's performance tables are generated from committed results files
(scripts/update_readme.py): a table edited by hand, or a results file regenerated without
regenerating the README, fails here."""
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


def test_every_table_matches_its_results_file():
    assert update_readme.check() == [], "run: python scripts/update_readme.py"


def test_every_table_names_a_stamped_results_file():
    blocks = update_readme.blocks((ROOT / "README.md").read_text())
    assert set(blocks) == set(update_readme.TABLES)
    for name, text in blocks.items():
        m = re.match(r"\*Generated from `(benchmarks/results/[^`]+)` \(`([^`]+)`; (\d{4}-\d\d-\d\d [\d:]+ UTC), "
                     r"commit (\S+), load average ([^,]+),", text)
        assert m, (name, text[:200])
        assert (ROOT / m.group(1)).exists(), m.group(1)
        assert m.group(4) not in ("None", ""), (name, "no commit recorded")
        assert m.group(5) != "None", (name, "no load average recorded")


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
    assert table in update_readme.check(ROOT / "README.md", results)


def test_a_hand_edited_table_is_detected(tmp_path):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- two-layer:start -->")
    i = readme.index("**", start) + 2  # first bold figure in the table
    edited = readme[:i] + "9" + readme[i:]
    path = tmp_path / "README.md"
    path.write_text(edited)
    assert "two-layer" in update_readme.check(path)


def test_missing_markers_are_an_error(tmp_path):
    path = tmp_path / "README.md"
    path.write_text((ROOT / "README.md").read_text().replace("<!-- engine:end -->", ""))
    with pytest.raises(ValueError, match="engine"):
        update_readme.check(path)


# Files outside the repository must not be cited by what ships in it (the design notes, anchors and
# paper notes were private working documents). Other files are checked once their owners fix them.
_PRIVATE = re.compile("DES" + r"IGN\.md|" + "ANCH" + "ORS" + "|" + "paper" + "-notes")


def test_no_citation_of_files_outside_the_repository():
    paths = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "docs" / "design.md", ROOT / "lazyfast" / "_ext.py",
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
    assert update_readme.check_reproduction() == [], "run: python scripts/update_readme.py"


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
    assert update_readme.check_reproduction(figures=figures) == [str(p) for p in update_readme.REPRO_DOCS]
    assert before != after


def test_every_experiment_has_a_row():
    from lazyfast.experiments import claims
    from lazyfast.experiments import EXPERIMENTS

    table = claims.table()
    for name in EXPERIMENTS:
        assert f"| `{name}`" in table, name
