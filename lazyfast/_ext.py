"""Loads the compiled extension ``lazyfast._C`` once and records what it offers.

If ``_C`` cannot be imported (not built, built against another torch), or a tensor lives
on a device whose kernels were not compiled, lazyfast warns once and every public
function routes to :mod:`lazyfast.reference`. With ``LAZYFAST_REQUIRE_COMPILED=1`` a
missing or mismatched extension is an ``ImportError`` at import instead (CI sets it).

The build writes ``lazyfast/_build_config.py`` next to ``_C`` (setup.py): the torch
version it compiled against and the size and SHA-256 of that ``_C`` file. A record whose
file does not match the ``_C`` found (a stale record) is ignored; a matching record naming
another torch release than the running one stops ``_C`` from loading (its C++ ABI is that
torch's) with a message saying how to rebuild.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None
_BUILD_INFO: dict = {}
#: what setup.py recorded when it compiled the ``_C`` found here ({} when unknown)
BUILD_CONFIG: dict = {}

REBUILD_HINT = ("Rebuild it against the running torch: `pip install --no-build-isolation -e .` "
                "(or `python setup.py build_ext --inplace`) with that torch installed.")


def _release(version: str) -> str:
    return version.split("+")[0]


def _read_build_config() -> dict:
    """The build record of the ``_C`` file that ``import lazyfast._C`` would load, or {}."""
    try:
        from lazyfast._build_config import BUILD_CONFIG as cfg
    except Exception:
        return {}
    spec = importlib.util.find_spec("lazyfast._C")
    origin = getattr(spec, "origin", None) if spec else None
    if not origin or not os.path.exists(origin):
        return {}
    if "so_sha256" in cfg:
        if os.path.getsize(origin) != cfg.get("so_size"):
            return {}
        with open(origin, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != cfg["so_sha256"]:
                return {}
    return dict(cfg)


def version_mismatch(built: str | None, running: str) -> str | None:
    """The message for an extension built against torch ``built`` run under ``running``, or None."""
    if not built or _release(built) == _release(running):
        return None
    return (f"lazyfast._C was built against torch {built}, but torch {running} is running; "
            f"a compiled extension only loads against the torch it was built with. {REBUILD_HINT}")


if os.environ.get("LAZYFAST_DISABLE_EXTENSION", "0") == "1":
    _LOAD_ERROR = "disabled by LAZYFAST_DISABLE_EXTENSION=1"
else:
    BUILD_CONFIG = _read_build_config()
    _LOAD_ERROR = version_mismatch(BUILD_CONFIG.get("torch_version"), torch.__version__)
    if _LOAD_ERROR is None:
        try:
            from lazyfast import _C  # noqa: F811  (registers torch.ops.lazyfast.*)

            _BUILD_INFO = dict(_C.build_info())
        except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
            _C = None
            _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
            if "undefined symbol" in str(exc):
                _LOAD_ERROR += f" (the extension was probably built against another torch; {REBUILD_HINT})"
    if _LOAD_ERROR is not None and os.environ.get("LAZYFAST_REQUIRE_COMPILED", "0") == "1":
        raise ImportError(f"LAZYFAST_REQUIRE_COMPILED=1 but the compiled extension cannot be used: {_LOAD_ERROR}")

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


def check_op_tensors(op: str, *args) -> None:
    """The device / dtype / layout checks of the compiled launchers (``check_op_tensors`` in
    csrc/checks.h), for the fake kernels of the raw ops.

    ``args`` are ``(name, value)`` pairs in schema order, ``value`` a tensor, None (an absent
    optional, skipped) or a list of tensors (element ``l`` is named ``name[l]``). Every tensor
    must be strided (not sparse, mkldnn or nested), with the dtype (float32 or float64) and on
    the device of the first one. The fake kernel is also the Meta kernel, so a call with one
    tensor on ``meta`` and the rest on the CPU lands here: without this check it returned an
    uninitialized CPU tensor. Raises RuntimeError (as TORCH_CHECK does) naming the op and the
    argument, e.g. ``lazyfast: two_layer_ntk: B is on meta but x1 is on cpu``.
    """
    ref = ref_name = None
    for name, value in args:
        if value is None:
            continue
        items = [(f"{name}[{l}]", t) for l, t in enumerate(value)] if isinstance(value, (list, tuple)) \
            else [(name, value)]
        for label, t in items:
            torch._check(not t.is_nested and t.layout == torch.strided,
                         lambda: f"lazyfast: {op}: {label} must be a strided (dense) tensor, got "
                                 f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")
            if ref is None:
                ref, ref_name = t, label
                torch._check(t.dtype in (torch.float32, torch.float64),
                             lambda: f"lazyfast: {op}: {label} must be float32 or float64, got {t.dtype}")
                continue
            torch._check(t.device == ref.device,
                         lambda: f"lazyfast: {op}: {label} is on {t.device} but {ref_name} is on {ref.device}")
            torch._check(t.dtype == ref.dtype,
                         lambda: f"lazyfast: {op}: {label} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def knobs() -> dict:
    """The ``LAZYFAST_*`` runtime knobs the compiled ops use now (docs/knobs.md), as
    ``{variable: value}`` with 0 for an unset integer knob and ``"cpu"`` / ``"cuda"`` for
    ``LAZYFAST_DRIVER_WALK``; ``{}`` without the extension. The extension reads them from the
    environment once, at the first use, not on every call: see :func:`reload_knobs`."""
    return {} if _C is None else dict(_C.knobs())


def reload_knobs() -> dict:
    """Makes the compiled extension re-read its ``LAZYFAST_*`` runtime knobs from
    ``os.environ`` (ops started afterwards use them) and returns them as :func:`knobs` does.
    ``lazyfast.testing.knobs(...)`` sets variables, reloads, and restores both on exit."""
    return {} if _C is None else dict(_C.reload_knobs())


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
    ``openmp``, ``built_with_torch`` (the torch version ``_C`` was compiled against, from
    its build record; None when unknown) and ``extension_error`` (why ``_C`` failed to
    load, or None).
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
        "built_with_torch": BUILD_CONFIG.get("torch_version"),
        "extension_error": _LOAD_ERROR,
    }
