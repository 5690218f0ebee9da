"""Fused Triton kernels for skyformer-ext, one module per Skyformer stage."""
