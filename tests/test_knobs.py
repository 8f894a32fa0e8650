"""docs/knobs.md lists exactly the LAZYFAST_* names that the sources use.

Scans the source files of lazyfast/, csrc/, tests/, benchmarks/, scripts/, .ci/ and setup.py,
CMakeLists.txt, Makefile (not docs/, not this file) for ``LAZYFAST_[A-Z0-9_]+`` and compares
that set with the first column of the table in docs/knobs.md.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS_MD = os.path.join(ROOT, "docs", "knobs.md")
THIS = os.path.abspath(__file__)

NAME = re.compile(r"LAZYFAST_[A-Z0-9_]+")
SOURCE_DIRS = ("lazyfast", "csrc", "tests", "benchmarks", "scripts", ".ci")
SOURCE_FILES = ("setup.py", "CMakeLists.txt", "Makefile")
# Source and build-script suffixes; files without a suffix (.ci/run, Makefile) are scanned too.
# Compiled objects (.so), results data (.json) and prose (.md) are not sources.
SUFFIXES = {".py", ".pyi", ".c", ".cc", ".cpp", ".cu", ".h", ".hpp", ".cuh", ".sh", ".txt", ".cmake",
            ".toml", ".cfg", ".ini", ".yml", ".yaml"}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis"}


def _source_paths():
    for name in SOURCE_FILES:
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            yield path
    for top in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            for fn in filenames:
                suffix = os.path.splitext(fn)[1]
                if suffix in SUFFIXES or suffix == "":
                    path = os.path.join(dirpath, fn)
                    if os.path.abspath(path) != THIS:
                        yield path


def _names_in_sources():
    found = {}
    for path in _source_paths():
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:  # a binary file without a suffix
            continue
        for name in set(NAME.findall(data.decode("utf-8", errors="replace"))):
            found.setdefault(name, []).append(os.path.relpath(path, ROOT))
    return found


def _names_in_table():
    """First-column names of the first markdown table in docs/knobs.md (list, to catch duplicates)."""
    with open(KNOBS_MD, encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows, in_table = [], False
    for line in lines:
        if line.lstrip().startswith("|"):
            in_table = True
            rows.append(line)
        elif in_table:
            break
    names = []
    for row in rows[2:]:  # skip the header and the |---| line
        cell = row.strip().strip("|").split("|")[0].strip().strip("`").strip()
        assert NAME.fullmatch(cell), f"docs/knobs.md: first cell {cell!r} is not a LAZYFAST_* name"
        names.append(cell)
    return names


def test_knobs_table_lists_every_lazyfast_name():
    in_src = _names_in_sources()
    table = _names_in_table()
    dups = sorted({n for n in table if table.count(n) > 1})
    assert not dups, f"docs/knobs.md lists these names more than once: {dups}"
    missing = sorted(set(in_src) - set(table))
    extra = sorted(set(table) - set(in_src))
    msg = []
    if missing:
        msg.append("in the sources but not in docs/knobs.md: "
                   + ", ".join(f"{n} ({', '.join(sorted(in_src[n]))})" for n in missing))
    if extra:
        msg.append("in docs/knobs.md but in no source file: " + ", ".join(extra))
    assert not missing and not extra, "; ".join(msg)
