"""Build lazyfast._C: C++ (OpenMP when the compiler supports it) kernels always, CUDA kernels
when possible.

Environment:
  LAZYFAST_CUDA=auto|0|1   build the CUDA kernels (auto: when torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "9.0+PTX" when no GPU is visible)
  MAX_JOBS                 parallel compile jobs (ninja)

torch must already be installed, and the build must see it (never build with isolation):
  pip install --no-build-isolation -e .          # editable
  python -m build --no-isolation                 # sdist + wheel in dist/

Every build writes lazyfast/_build_config.py next to the compiled lazyfast._C (the torch
version it was compiled against, CUDA, OpenMP); lazyfast/_ext.py compares it with the
running torch at import.
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

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

try:
    import torch  # noqa: E402  (after CUDA_HOME is set)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
except ImportError as exc:  # the usual cause: pip's build isolation hides the installed torch
    raise SystemExit(
        "\nlazyfast: building the extension needs PyTorch, and this build cannot import it "
        f"({type(exc).__name__}: {exc}).\n"
        "lazyfast compiles against the torch that will run it, so:\n"
        "  1. install torch first (e.g. `pip install torch`), then\n"
        "  2. build WITHOUT build isolation:\n"
        "       pip install --no-build-isolation .        (or -e . for an editable install)\n"
        "       python -m build --no-isolation            (sdist + wheel)\n"
        "Build isolation (pip's default) installs the build requirements into an empty "
        "environment, which has no torch.\n"
    )


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


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def openmp_flags():
    """Compile+link flags for OpenMP when the C++ compiler accepts them (probed), else [] and a message."""
    if sys.platform == "win32":
        return ["/openmp"], []
    cxx = _compiler()
    src = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+:n)\nn += omp_get_num_threads();\nreturn n > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "omp_probe.cpp")
        with open(path, "w") as f:
            f.write(src)
        for flags in (["-fopenmp"], ["-Xpreprocessor", "-fopenmp", "-lomp"]):
            try:
                r = subprocess.run([cxx, *flags, path, "-o", os.path.join(tmp, "omp_probe")],
                                   capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if r.returncode == 0:
                compile_flags = [f for f in flags if not f.startswith("-l")]
                return compile_flags, flags
    print(
        f"lazyfast: WARNING: the C++ compiler {cxx!r} does not build OpenMP programs (tried -fopenmp); "
        "building the CPU kernels single-threaded. Install an OpenMP runtime (e.g. libgomp / libomp) "
        "or set CXX to a compiler with OpenMP support for multi-threaded kernels.",
        file=sys.stderr,
    )
    return [], []


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _source_check(with_cuda):
    needed = [os.path.join("csrc", "lazyfast.cpp"), os.path.join("csrc", "checks.h"),
              os.path.join("csrc", "include", "lazyfast", "common.h")]
    if with_cuda:
        needed.append(os.path.join("csrc", "cuda"))
    missing = [p for p in needed if not os.path.exists(os.path.join(ROOT, p))]
    if missing:
        raise SystemExit(f"lazyfast: the source tree is incomplete (missing {missing}); "
                         "an sdist must contain all of csrc/ (see MANIFEST.in)")


BUILD_CONFIG = {}


def extensions():
    with_cuda = _want_cuda()
    _source_check(with_cuda)
    sources = _rel([os.path.join(ROOT, "csrc", "lazyfast.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    omp_compile, omp_link = openmp_flags()
    cxx = ["-O3", "-g0", *omp_compile]
    define_macros = []
    BUILD_CONFIG.update(torch_version=torch.__version__, torch_cuda=torch.version.cuda, with_cuda=with_cuda,
                        openmp_flags=omp_compile, python=sys.version.split()[0])
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: Hopper SASS + PTX, which newer GPUs JIT-compile.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        BUILD_CONFIG["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define_macros.append(("LAZYFAST_WITH_CUDA", "1"))
        return [
            CUDAExtension(
                "lazyfast._C",
                sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
                extra_link_args=omp_link,
            )
        ]
    return [
        CppExtension(
            "lazyfast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=omp_link,
        )
    ]


class build_ext(BuildExtension.with_options(use_ninja=True)):
    """Also writes _build_config.py next to each lazyfast._C it compiles, and copies it into the
    source tree with _C for in-place builds (setuptools compiles in build/, then copies)."""

    def build_extension(self, ext):
        super().build_extension(ext)
        if ext.name == "lazyfast._C":
            path = self._config_path(ext)
            so = os.path.join(os.path.dirname(path), os.path.basename(self.get_ext_filename(ext.name)))
            with open(so, "rb") as f:
                record = dict(BUILD_CONFIG, so_size=os.path.getsize(so), so_sha256=hashlib.sha256(f.read()).hexdigest())
            with open(path, "w") as f:
                f.write('"""Written by setup.py when lazyfast._C was built; read by lazyfast/_ext.py."""\n'
                        f"BUILD_CONFIG = {record!r}\n")

    def _config_path(self, ext):
        inplace, self.inplace = self.inplace, False
        try:
            return os.path.join(os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name))), "_build_config.py")
        finally:
            self.inplace = inplace

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for ext in self.extensions:
            built = self._config_path(ext)
            if ext.name == "lazyfast._C" and os.path.exists(built):
                shutil.copyfile(built, os.path.join(ROOT, "lazyfast", "_build_config.py"))


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext},
)
