"""Build lazyfast._C: C++ (OpenMP) kernels always, CUDA kernels when possible.

Environment:
  LAZYFAST_CUDA=auto|0|1   build the CUDA kernels (auto: when torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "9.0" when no GPU is visible)
  MAX_JOBS                 parallel compile jobs (ninja)

Install without build isolation (torch must already be installed):
  pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # /usr/local/bin/nvcc can be a wrapper: torch would then guess CUDA_HOME=/usr/local and fail.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402  (after CUDA_HOME is set)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    flag = os.environ.get("LAZYFAST_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise ValueError(f"LAZYFAST_CUDA must be auto, 0 or 1, got {flag!r}")
    possible = torch.version.cuda is not None and _cuda_home is not None
    if flag == "1" and not possible:
        raise RuntimeError(
            "LAZYFAST_CUDA=1 but CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={_cuda_home!r}. "
            "Install a CUDA build of torch and the CUDA toolkit (nvcc)."
        )
    return possible if flag == "auto" else flag == "1"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    with_cuda = _want_cuda()
    sources = _rel([os.path.join(ROOT, "csrc", "lazyfast.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-g0", "-fopenmp"]
    define_macros = []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define_macros.append(("LAZYFAST_WITH_CUDA", "1"))
        return [
            CUDAExtension(
                "lazyfast._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "lazyfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
