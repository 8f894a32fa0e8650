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
