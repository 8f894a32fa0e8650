import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    import lazyfast

    return f"lazyfast backend: {lazyfast.backend_info()}"


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("LAZYFAST_DISABLE_EXTENSION") == "1",
    reason="needs a CUDA device and lazyfast's CUDA kernels",
)


def pytest_collection_modifyitems(config, items):
    # Every test that runs on a CUDA device carries the `cuda` marker, so the GPU
    # script can select them with `-m cuda` (they are parametrized or named "cuda").
    for item in items:
        if "cuda" in item.nodeid.lower():
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny problems: several OpenMP threads on shared CI
    cores are many times slower than one (use with pytest.mark.usefixtures)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def script_module():
    """Loads a file of the repository (benchmarks/..., scripts/...) as a module: ``script_module("benchmarks/bench_nt.py")``."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]

    def load(rel: str):
        path = root / rel
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
