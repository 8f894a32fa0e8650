"""The house (CONTRIBUTING.md, "Where things live"): zero import cycles, no imports inside function
bodies but optional dependencies, one ``implementation=`` vocabulary, the 0.1 names as warning aliases."""
import ast
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import lazyfast
from lazyfast import _deprecated, _validation
from lazyfast._engine.state import StateGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lazyfast")
# Modules whose import inside a function is allowed: optional dependencies (and the compiled extension,
# which may be missing, and the build record setup.py writes).
OPTIONAL = ("matplotlib", "tqdm", "timm", "transformers", "torchvision", "scipy", "numpy", "jax", "neural_tangents",
            "opacus", "backpack", "nngeometry", "lazyfast._C", "lazyfast._build_config", "lazyfast.experiments.plots")


def _modules():
    out = {}
    for d, _, files in os.walk(PKG):
        if "__pycache__" in d:
            continue
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-9] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


MODULES = _modules()


def _imports(path, top_level_only):
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                yield node, full if full in MODULES else node.module


def test_the_module_graph_has_no_cycle():
    graph = {m: {t for _, t in _imports(p, True) if t in MODULES and t != m} for m, p in MODULES.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_inside_a_function_body_but_optional_dependencies():
    bad = []
    for m, p in MODULES.items():
        tree = ast.parse(open(p).read())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}" for a in node.names]
                    if not all(any(n == o or n.startswith(o + ".") for o in OPTIONAL) for n in names):
                        bad.append(f"{os.path.relpath(p, ROOT)}:{node.lineno} {', '.join(names)}")
    assert not bad, "imports inside function bodies (move them to module level):\n" + "\n".join(bad)


_FORK_IMPORTS = r"""
import os, sys, traceback
import torch  # noqa: F401  (imported once; every child starts with no lazyfast module loaded)
failed = []
for m in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(m)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(m)
print("FAILED:" + ",".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_first_in_a_fresh_interpreter():
    """A cycle that module-level code survives in one import order fails in another: each module is
    imported first, in a fresh process (forked from one that has imported torch only, so the test costs
    one torch import, not one per module)."""
    mods = sorted(m for m in MODULES if not m.endswith("__main__"))
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", _FORK_IMPORTS, *mods], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-500:] + r.stderr[-3000:]
    assert "FAILED:" in r.stdout and r.stdout.strip().endswith("FAILED:")


def test_one_implementation_vocabulary():
    for where, allowed in _validation.IMPLEMENTATIONS_OF.items():
        assert set(allowed) <= set(_validation.VOCABULARY), where
    for where, renamed in _validation.RENAMED_IMPLEMENTATIONS.items():
        assert set(renamed.values()) <= set(_validation.IMPLEMENTATIONS_OF[where]), where
        assert not set(renamed) & set(_validation.VOCABULARY), where  # an old name never means something new
    assert lazyfast.ntk.NTK_IMPLEMENTATIONS == _validation.IMPLEMENTATIONS_OF["empirical_ntk"]
    assert lazyfast.lazy.LINEARIZED_IMPLEMENTATIONS == _validation.IMPLEMENTATIONS_OF["Linearized"]
    with pytest.raises(ValueError, match="implementation must be one of"):
        _validation.check_implementation("layerwise", "empirical_ntk")


def test_old_implementation_names_warn_and_map():
    with pytest.warns(FutureWarning, match="renamed 'generic'"):
        assert _validation.check_implementation("reference", "products") == "generic"
    with pytest.warns(FutureWarning, match="renamed 'products'"):
        assert _validation.check_implementation("ntk", "Linearized") == "products"


@pytest.mark.parametrize("old", sorted(_deprecated.MOVED_MODULES))
def test_the_0_1_modules_are_warning_aliases(old):
    mod = importlib.import_module(f"lazyfast.{old}")
    names = [n for home in _deprecated.MOVED_MODULES[old][0].split()
             for n in vars(importlib.import_module(home)) if not n.startswith("_")]
    assert names
    with pytest.warns(FutureWarning, match=f"lazyfast.{old} is internal"):
        got = getattr(mod, names[0])
    assert got is not None
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_name_here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(lazyfast, old) is mod  # the attribute itself resolves; using it warns


def test_public_surface_is_underscore_free_and_complete():
    for name in lazyfast.__all__:
        assert not name.startswith("_") or name == "__version__"
        assert hasattr(lazyfast, name), name
    for internal in ("structured", "generic", "mlp", "two_layer", "ops", "rules", "bench_models"):
        assert internal not in lazyfast.__all__


def test_state_guard_is_reentrant_and_the_outer_guard_restores():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

    m = Counter()
    with pytest.raises(ValueError, match="seen"):
        with StateGuard(m):
            with StateGuard(m) as inner:
                assert inner.inner
                m.seen += 1
            assert float(m.seen) == 1.0  # the inner guard did nothing: the outer one checks
    assert float(m.seen) == 0.0  # ... and restored
    with StateGuard(m) as g:
        assert not g.inner  # closed guards leave nothing behind


def test_the_vocabulary_table_in_docs_matches_the_code():
    text = open(os.path.join(ROOT, "docs", "engine.md")).read()
    table = text[text.index("## One vocabulary"):]
    for word, meaning in _validation.VOCABULARY.items():
        row = next(line for line in table.splitlines() if line.startswith(f'| `"{word}"` |'))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == meaning
        assert cells[2:] == ["✓" if word in allowed else "" for allowed in _validation.IMPLEMENTATIONS_OF.values()]
