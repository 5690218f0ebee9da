"""Fused Triton kernels for skyformer-ext, one module per Skyformer stage.

gaussian_tiles holds the kernels (one tiled primitive, kappa(X, Y) @ V, plus the landmark Gram); the stage
modules gram, key_summary, query_apply and kernelized are thin host wrappers mapping a stage onto it;
compile_check compiles every launch configuration for sm_80 / sm_90 without a GPU. Importing this package
needs triton; TRITON_INTERPRET=1 must be set before the first import to run on CPU tensors.
"""
