"""The README's *Linearized training* example runs as written (its own asserts check that linearized
training and kernel gradient descent with the model's eNTK agree on the test points)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    block = text.split("<!-- linearized-example:start -->", 1)[1].split("<!-- linearized-example:end -->", 1)[0]
    m = re.search(r"```python\n(.*?)```", block, re.S)
    assert m, "README.md: the linearized-example block holds no python code"
    return m.group(1)


def test_readme_linearized_example_runs(capsys):
    from lazyfast import zoo

    try:
        zoo.import_timm()
        zoo.import_transformers()
    except ImportError:
        pytest.skip("timm / transformers not installed (the bench extra)")
    exec(compile(_example(), "README.md:linearized-example", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.count("relative difference") == 2
