"""The documents name files that exist, and CONTRIBUTING.md's "Where things live" names every file.

1. Every module path that README.md, CONTRIBUTING.md or a page of docs/ names — a path such as
   ``lazyfast/_engine/uses.py``, ``csrc/cuda/*.cu``, ``benchmarks/bench_nt.py``, or a dotted name such
   as ``lazyfast._engine.generic.generic_costs`` — exists in the tree (a file, a package, a glob that
   matches, or a name the module defines), so a stale name fails CI. A document that names one of
   the deprecated 0.1 aliases (``lazyfast/structured.py``, ``lazyfast.generic``, ...) as if it held
   code must say on that line that it is an alias.
2. Every relative link of those documents points at a file that exists, and at a heading of it.
3. "Where things live" has exactly one line per tracked file (``git ls-files``; data under
   benchmarks/results/ and docs/figures/ excepted), and each of its lines names a file that exists.
"""
import pathlib
import re
import subprocess
from collections import Counter

import pytest

from lazyfast._deprecated import MOVED_MODULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted((ROOT / "docs").glob("*.md"))

# The planned modules of the structured engine's split (lazyfast/_engine/structured/__init__.py into
# these files), which lands in a separate change: docs/design.md and CONTRIBUTING.md already name them.
# They may be missing ONLY while listed here. EMPTY THIS SET once the split is merged (then a planned
# name that did not land, or was renamed, fails like any other stale name).
PLANNED = set()  # planned files a document may name before they land (none now: the structured split landed)

# Written by every build (setup.py), never tracked: documents may name them in a fresh clone.
BUILD_OUTPUTS = {"lazyfast/_build_config.py", "lazyfast/_C*.so", "lazyfast._C", "lazyfast._build_config"}

_PATH = re.compile(r"(?<![\w./-])((?:lazyfast|csrc|benchmarks|scripts|tests|docs)/[\w.*/{},-]*)")
_DOTTED = re.compile(r"(?<![\w./-])lazyfast(?:\.[A-Za-z_]\w*)+")
_ALIAS_WORDS = re.compile(r"deprecat|alias|FutureWarning|0\.1", re.I)


def _planned(path: str) -> bool:
    return path in PLANNED or path.rstrip("/") + "/" in PLANNED


def _expand(path: str):
    """``a/{b,c}.x`` → ``a/b.x``, ``a/c.x``."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


def _path_exists(path: str) -> bool:
    """A file, a directory (``a/``), a glob that matches, a stem of existing files (``--out
    benchmarks/results/models_cpu_update`` names ``models_cpu_update.{json,md}``), or an allowed name.
    A trailing ``.*`` may be the end of an italic sentence (``*… docs/figures/cnn-alpha.json.*``)."""
    if path.endswith(".*") and _path_exists(path[:-2]):
        return True
    if path in BUILD_OUTPUTS or _planned(path):
        return True
    for p in _expand(path):
        if "*" not in p and not p.endswith("/") and not (ROOT / p).exists() and list(ROOT.glob(p + ".*")):
            continue
        if "*" in p:
            if not list(ROOT.glob(p.rstrip("/"))):
                return False
        elif p.endswith("/"):
            if not (ROOT / p).is_dir():
                return False
        elif not (ROOT / p).exists():
            return False
    return True


def _defines(path: pathlib.Path, name: str) -> bool:
    return path.is_file() and re.search(rf"\b{re.escape(name)}\b", path.read_text()) is not None


def _dotted_exists(name: str) -> bool:
    """``lazyfast.a.b.c``: packages and modules as far as they go, then a name the last one defines."""
    if name in BUILD_OUTPUTS:
        return True
    cur = ROOT / "lazyfast"
    for part in name.split(".")[1:]:
        if cur.is_dir():
            if (cur / part).is_dir():
                cur = cur / part
            elif (cur / f"{part}.py").is_file():
                cur = cur / f"{part}.py"
            else:
                return _defines(cur / "__init__.py", part) or _planned(f"{cur.relative_to(ROOT)}/{part}.py")
        else:
            return _defines(cur, part)
    return True


def _names(text: str):
    """(line number, line, slash paths, dotted names) for every line naming a module."""
    for i, line in enumerate(text.splitlines(), 1):
        paths = [p.rstrip(".,:;") for p in _PATH.findall(line)]
        dotted = _DOTTED.findall(line)
        if paths or dotted:
            yield i, line, [p for p in paths if p not in ("lazyfast", "")], dotted


def _alias(name: str) -> bool:
    """Does a slash path or dotted name point into one of the deprecated 0.1 alias modules?"""
    m = re.match(r"lazyfast[./](\w+)(?:\.py\b|\.|$)", name)
    return bool(m) and m.group(1) in MOVED_MODULES


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_path_a_document_names_exists(doc):
    bad = []
    for i, line, paths, dotted in _names(doc.read_text()):
        bad += [f"{i}: {p}" for p in paths if not _path_exists(p)]
        bad += [f"{i}: {d}" for d in dotted if not _dotted_exists(d)]
        if not _ALIAS_WORDS.search(line):
            bad += [f"{i}: {n} (a deprecated alias, not where the code lives)" for n in paths + dotted if _alias(n)]
    assert bad == [], f"{doc.relative_to(ROOT)} names modules that are not in the tree: {bad}"


def test_the_check_catches_a_stale_name():
    assert not _path_exists("lazyfast/_uses.py")
    assert not _path_exists("lazyfast/_engine/structured/planner.py")
    assert not _path_exists("csrc/cuda/*.hip")
    assert _path_exists("csrc/cuda/*.cu") and _path_exists("benchmarks/results/two_layer_cpu.{json,md}")
    assert _dotted_exists("lazyfast._engine.generic.generic_costs") and _dotted_exists("lazyfast.selfcheck.self_check")
    assert not _dotted_exists("lazyfast._engine.generic.no_such_function")
    assert not _dotted_exists("lazyfast._engine.nothing_here")
    assert _alias("lazyfast/structured.py") and _alias("lazyfast.generic") and not _alias("lazyfast._engine.generic")


def test_planned_names_are_only_the_structured_split():
    assert all(p.startswith("lazyfast/_engine/structured/") for p in PLANNED)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    out, seen, fence = set(), Counter(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"#{1,6} (.*)", line)
        if m:
            s = _slug(m.group(1))
            out.add(s if not seen[s] else f"{s}-{seen[s]}")
            seen[s] += 1
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading(doc):
    bad, fence = [], False
    for i, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        if fence:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                bad.append(f"{i}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{i}: {target} (no such heading)")
    assert bad == [], f"{doc.relative_to(ROOT)}: {bad}"


# ----------------------------------------------------------------------------- Where things live
def _where_entries():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    assert "\n## Where things live\n" in text, 'CONTRIBUTING.md has a "Where things live" section'
    section = text.split("\n## Where things live\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([^`]+)` — \S", section, re.M)


def _tracked():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is None or out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines()
            if not f.startswith("benchmarks/results/") and not (f.startswith("docs/figures/") and not f.endswith(".py"))]


def test_where_things_live_lists_every_tracked_file():
    entries = _where_entries()
    missing = sorted(set(_tracked()) - set(entries))
    assert missing == [], ('CONTRIBUTING.md, "Where things live": add one line "- `PATH` — what it owns" for '
                           f"each of {missing}")


def test_where_things_live_names_only_files_that_exist_once():
    entries = _where_entries()
    dups = sorted(e for e, c in Counter(entries).items() if c > 1)
    assert dups == [], f'CONTRIBUTING.md, "Where things live": listed twice: {dups}'
    gone = [e for e in entries if not ((ROOT / e).exists() or _planned(e))]
    assert gone == [], f'CONTRIBUTING.md, "Where things live": no such file (remove or rename the line): {gone}'
