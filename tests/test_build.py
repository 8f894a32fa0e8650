"""The compiled extension: what is built, how it loads, and the fallback."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lazyfast
from lazyfast import _ext

REQUIRE_COMPILED = os.environ.get("CI") == "true" or os.environ.get("LAZYFAST_REQUIRE_COMPILED") == "1"


def test_backend_info_keys_and_types():
    info = lazyfast.backend_info()
    for key in ("cpu_kernels", "cuda_kernels", "torch", "cuda", "threads"):
        assert key in info
    assert isinstance(info["cpu_kernels"], bool) and isinstance(info["cuda_kernels"], bool)
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()


@pytest.mark.skipif(not REQUIRE_COMPILED, reason="set CI=true or LAZYFAST_REQUIRE_COMPILED=1 to require the build")
def test_extension_was_built():
    info = lazyfast.backend_info()
    assert info["cpu_kernels"], f"the C++ extension did not load: {info['extension_error']}"
    assert info["extension_error"] is None
    assert info["openmp"]


@pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
def test_cuda_version_op_matches_build():
    v = torch.ops.lazyfast.cuda_version()
    assert isinstance(v, int)
    if _ext.HAS_CUDA_KERNELS:
        assert v > 0
    else:
        assert v == -1
    assert lazyfast.cuda_version() == v


@pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
def test_ops_are_registered():
    assert hasattr(torch.ops.lazyfast, "gram")
    schema = str(torch.ops.lazyfast.gram.default._schema)
    assert "accumulate_f64" in schema


def _run(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)


def test_cli_info_prints_backend():
    r = _run("import sys; from lazyfast.cli import main; sys.exit(main(['info', '--json']))")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cpu_kernels"] == _ext.HAS_CPU_KERNELS


def test_fallback_without_extension_warns_once_and_matches():
    code = r"""
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import lazyfast
    j = torch.randn(5, 7, dtype=torch.float64)
    a = lazyfast.gram(j)
    b = lazyfast.gram(j, j)
msgs = [str(x.message) for x in w if "compiled extension is not available" in str(x.message)]
assert lazyfast.backend_info()["cpu_kernels"] is False
assert len(msgs) == 1, msgs
assert torch.allclose(a, j @ j.T) and torch.allclose(b, a)
print("ok")
"""
    r = _run(code, LAZYFAST_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
