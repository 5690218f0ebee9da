"""skyformer-ext: Skyformer (Gaussian-kernel Nystrom) attention for PyTorch.

Public API:
    skyformer_attention(q, k, v, ...)   approximate Gaussian-kernel attention with m landmarks
    kernelized_attention(q, k, v, ...)  the exact kernelized attention it approximates
    skyformer_attention_varlen(...), kernelized_attention_varlen(...)  packed sequences (cu_seqlens)
    sample_landmarks(...)               landmark row indices into [q; k]
    reference                           plain, readable PyTorch versions (float64-capable)
    parallel.context_parallel_attention(...)  the sequence sharded over torch.distributed ranks
"""

from . import reference
from . import nn
from . import parallel
from .api import kernelized_attention, kernelized_attention_varlen, skyformer_attention, skyformer_attention_varlen
from .landmarks import sample_landmarks
from ._extension import build_info

__all__ = ["skyformer_attention", "kernelized_attention", "skyformer_attention_varlen",
           "kernelized_attention_varlen", "sample_landmarks", "reference"]
__version__ = "0.1.0"
