"""The compiled extension is built, loaded, and carries the CUDA code the build was asked for.

On a GPU-less machine with nvcc (CI) the extension must be built with its CUDA kernels for sm_80 and sm_90
(the compile itself proves the CUDA source builds); build_info reports nvcc's own arch list.
"""

import os
import shutil

import torch

import skyformer_ext
from skyformer_ext import _extension


def _expected_archs():
    configured = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if configured:
        return {a.replace("+PTX", "") for a in configured.replace(" ", ";").split(";") if a}
    if torch.cuda.is_available():
        return {"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}
    return {"8.0", "9.0"}


def test_extension_is_loaded():
    info = skyformer_ext.build_info()
    assert info["extension_loaded"], f"the compiled extension did not load: {info['load_error']}"
    assert info["load_error"] is None
    assert hasattr(torch.ops.skyformer, "cholesky_solve")


def test_cuda_kernels_are_compiled_when_a_toolkit_is_present():
    info = skyformer_ext.build_info()
    wants_cuda = (torch.version.cuda is not None and shutil.which("nvcc") is not None
                  and os.environ.get("SKYFORMER_FORCE_CPU", "") in ("", "0"))
    assert info["cuda"] == wants_cuda, info
    if wants_cuda:
        assert _expected_archs() <= set(info["cuda_archs"]), info
        assert info["cuda_version"] == ".".join(torch.version.cuda.split(".")[:2]), info


def test_arch_list_parsing():
    assert _extension._arch_names("800,900") == ["8.0", "9.0"]
    assert _extension._arch_names("860, 1000, 1200") == ["8.6", "10.0", "12.0"]
    assert _extension._arch_names("unknown") == []
