"""The documents' runnable examples run as written: the README's API tour (its own asserts check
that linearized training and closed-form kernel gradient descent agree on test points, and that CG
converged) and docs/guide.md's *Linearized training* example (timm and Hugging Face models against
kernel gradient descent with their eNTK). Each example sits between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers in a python code block."""
import os
import re

import pytest

import lazyfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(doc: str, name: str) -> str:
    with open(os.path.join(ROOT, doc)) as fh:
        text = fh.read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"{doc}: exactly one {start} … {end} block"
    block = text.split(start, 1)[1].split(end, 1)[0]
    m = re.search(r"```python\n(.*?)```", block, re.S)
    assert m, f"{doc}: the {name} block holds no python code"
    return m.group(1)


def _section(doc: str, heading: str) -> str:
    with open(os.path.join(ROOT, doc)) as fh:
        text = fh.read()
    return text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]


def test_readme_api_tour_runs(capsys):
    code = _example("README.md", "api-tour")
    ns = {"__name__": "readme_api_tour"}
    try:
        exec(compile(code, "README.md:api-tour", "exec"), ns)
    finally:
        if "Scale" in ns and ns["Scale"] in lazyfast.registered_rules():
            lazyfast.unregister_rule(ns["Scale"])
    out = capsys.readouterr().out
    assert "rule custom (Scale)" in out  # explain shows the registered rule taking the custom layer


def test_readme_api_tour_is_short_and_names_the_whole_public_api():
    """The tour is a tour (about 20 lines); with the paragraph after it, the README's API section
    names every public name (lazyfast/__init__.py says they are documented there)."""
    code = _example("README.md", "api-tour")
    assert len([line for line in code.splitlines() if line.strip()]) <= 30
    section = _section("README.md", "## API tour")
    missing = [n for n in lazyfast.__all__ if not n.startswith("__") and not re.search(rf"\b{re.escape(n)}\b", section)]
    assert missing == [], f"README.md, API tour: public names not mentioned: {missing}"


def test_guide_linearized_example_runs(capsys):
    from lazyfast import zoo

    try:
        zoo.import_timm()
        zoo.import_transformers()
    except ImportError:
        pytest.skip("timm / transformers not installed (the bench extra)")
    exec(compile(_example("docs/guide.md", "linearized-example"), "docs/guide.md:linearized-example", "exec"),
         {"__name__": "guide_example"})
    out = capsys.readouterr().out
    assert out.count("relative difference") == 2
