"""Fused Triton kernels for skyformer-ext, one module per Skyformer stage.

gaussian_tiles holds the one tiled primitive, kappa(X, Y) @ V; key_summary, query_apply and kernelized are
thin host wrappers mapping a stage onto it; landmarks samples and gathers the landmark rows and scatters
their gradients; landmark_refine moves the landmarks by Lloyd (k-means) steps; landmark_solve fuses the Gram and the landmark solve (Newton-Schulz or Cholesky) into one
kernel per direction;
compile_check compiles every launch configuration for sm_80 / sm_90 without a GPU. Importing this package
needs triton; TRITON_INTERPRET=1 must be set before the first import to run on CPU tensors.
"""
