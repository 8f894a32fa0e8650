"""Loads the compiled extension ``lazyfast._C`` once and records what it offers.

If ``_C`` cannot be imported (not built, wrong torch), or a tensor lives on a
device whose kernels were not compiled, lazyfast warns once and every public
function routes to :mod:`lazyfast.reference`. Nothing here raises at import.
"""
from __future__ import annotations

import os
import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None
_BUILD_INFO: dict = {}

if os.environ.get("LAZYFAST_DISABLE_EXTENSION", "0") == "1":
    _LOAD_ERROR = "disabled by LAZYFAST_DISABLE_EXTENSION=1"
else:
    try:
        from lazyfast import _C  # noqa: F811  (registers torch.ops.lazyfast.*)

        _BUILD_INFO = dict(_C.build_info())
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
        _C = None
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

HAS_CPU_KERNELS: bool = bool(_BUILD_INFO.get("cpu_kernels", False))
HAS_CUDA_KERNELS: bool = bool(_BUILD_INFO.get("cuda_kernels", False))

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernels_for(device: torch.device | str) -> bool:
    """True when compiled kernels exist for tensors on ``device``; warns once otherwise."""
    dev = torch.device(device)
    if dev.type == "cpu":
        if HAS_CPU_KERNELS:
            return True
        warn_once(
            "cpu",
            "lazyfast: the compiled extension is not available "
            f"({_LOAD_ERROR or 'unknown reason'}); using the pure-PyTorch reference "
            "implementations (correct, but slower). Rebuild with "
            "`pip install --no-build-isolation -e .`.",
        )
        return False
    if dev.type == "cuda":
        if HAS_CUDA_KERNELS:
            return True
        why = _LOAD_ERROR or "the extension was built without CUDA kernels"
        warn_once(
            "cuda",
            f"lazyfast: no compiled CUDA kernels ({why}); CUDA tensors use the pure-PyTorch "
            "reference implementations. Rebuild on a machine with nvcc and a CUDA build of torch.",
        )
        return False
    warn_once(dev.type, f"lazyfast: no compiled kernels for device type {dev.type!r}; using references.")
    return False


def cuda_version() -> int:
    """CUDA runtime version the extension was compiled against; -1 without CUDA kernels or extension."""
    if _C is None:
        return -1
    return int(torch.ops.lazyfast.cuda_version())


def backend_info() -> dict:
    """What is compiled and what this process will use.

    Returns a dict with ``cpu_kernels`` and ``cuda_kernels`` (bool: compiled kernels
    present), ``cuda_available`` (a usable GPU), ``torch`` and ``cuda`` (versions;
    ``cuda`` is the CUDA version of the compiled kernels or None), ``threads``
    (intra-op threads, which also bound the extension's OpenMP regions),
    ``openmp`` and ``extension_error`` (why ``_C`` failed to load, or None).
    """
    cv = cuda_version()
    return {
        "cpu_kernels": HAS_CPU_KERNELS,
        "cuda_kernels": HAS_CUDA_KERNELS,
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": None if cv < 0 else f"{cv // 1000}.{(cv % 1000) // 10}",
        "threads": torch.get_num_threads(),
        "openmp": bool(_BUILD_INFO.get("openmp", False)),
        "extension_error": _LOAD_ERROR,
    }
