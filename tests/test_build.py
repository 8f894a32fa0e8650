"""The compiled extension: what is built, how it loads, and the fallback."""
import json
import os
import re
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_single_sourced():
    from lazyfast import _version

    assert lazyfast.__version__ == _version.__version__
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "lazyfast._version.__version__"' in pyproject
    assert '\nversion = "' not in pyproject  # no literal version besides lazyfast/_version.py


def test_every_package_directory_is_packaged():
    """pyproject.toml lists its packages by hand: a new subpackage missing there is left out of the wheel."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        listed = set(re.search(r'^packages = \[(.*?)\]$', f.read(), re.M | re.S).group(1).replace('"', "")
                     .replace(" ", "").replace("\n", "").split(","))
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "lazyfast"))
             if "__init__.py" in files and "__pycache__" not in d}
    assert found <= listed, sorted(found - listed)


def test_version_mismatch_message():
    msg = _ext.version_mismatch("2.12.0+cpu", "2.13.0+cu130")
    assert "2.12.0+cpu" in msg and "2.13.0+cu130" in msg and "--no-build-isolation" in msg
    assert _ext.version_mismatch("2.13.0+cpu", "2.13.0+cu130") is None  # same release, other local build
    assert _ext.version_mismatch(None, "2.13.0") is None  # no record: nothing to compare


def test_a_stale_build_record_is_ignored(monkeypatch):
    import types

    fake = types.ModuleType("lazyfast._build_config")
    fake.BUILD_CONFIG = {"torch_version": "1.0.0", "so_size": -1, "so_sha256": "0" * 64}
    monkeypatch.setitem(sys.modules, "lazyfast._build_config", fake)
    assert _ext._read_build_config() == {}


def test_setup_py_says_how_to_build_when_torch_is_missing():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    r = _run(code)
    assert r.returncode != 0
    assert "install torch first" in r.stderr and "--no-build-isolation" in r.stderr, r.stderr


@pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
def test_extension_built_for_another_torch_is_refused(tmp_path):
    import hashlib
    import shutil

    pkg = tmp_path / "lazyfast"
    shutil.copytree(os.path.join(ROOT, "lazyfast"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    so = _ext._C.__file__
    with open(so, "rb") as f:
        data = f.read()
    record = {"torch_version": "1.0.0", "so_size": len(data), "so_sha256": hashlib.sha256(data).hexdigest()}
    (pkg / "_build_config.py").write_text(f"BUILD_CONFIG = {record!r}\n")
    code = "import lazyfast; i = lazyfast.backend_info(); print(i['cpu_kernels'], i['built_with_torch']); print(i['extension_error'])"
    env = dict(os.environ, LAZYFAST_REQUIRE_COMPILED="0", PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first == "False 1.0.0"
    assert "built against torch 1.0.0" in second and torch.__version__ in second
    env["LAZYFAST_REQUIRE_COMPILED"] = "1"
    r = subprocess.run([sys.executable, "-c", "import lazyfast"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode != 0 and "ImportError" in r.stderr and "built against torch 1.0.0" in r.stderr
