"""The default Triton forward+backward captured in a CUDA graph and replayed (issue 12, item 6).

Capture follows torch.cuda.graphs' rules: warm up on a side stream first (Triton compiles, the caching
allocator fills its pools), then capture into static inputs and outputs; a replay reads whatever the
static inputs hold, so new values are copied into them. Random landmarks come from the default CUDA
generator, which graph capture registers: each replay advances its offset like an eager call does, so a
replay draws the same landmarks as an eager call made from the same generator state. The eager and the
replayed runs execute the same kernels with the same launch configurations on the same data in the same
order (deterministic=True: no atomics), so the results must be bit-identical.
"""

import pytest
import torch

from skyformer_ext import skyformer_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

SHAPE = dict(batch=2, heads=4, n=1024, p=64)


def _inputs(seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, h, n, p = SHAPE["batch"], SHAPE["heads"], SHAPE["n"], SHAPE["p"]
    q, k, v, grad_out = (torch.randn(b, h, n, p, device="cuda", generator=gen, dtype=torch.bfloat16)
                         for _ in range(4))
    mask = torch.rand(b, n, device="cuda", generator=gen) > 0.2
    return q, k, v, grad_out, mask


def _forward_backward(q, k, v, grad_out, mask):
    out = skyformer_attention(q, k, v, num_landmarks=128, attn_mask=mask, backend="triton")
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def test_default_forward_backward_replays_bit_identically():
    static = [t.clone() for t in _inputs(0)]
    for t in static[:3]:
        t.requires_grad_()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _forward_backward(*static)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = _forward_backward(*static)

    for seed in (1, 2):
        fresh = _inputs(seed)
        with torch.no_grad():
            for target, value in zip(static, fresh):
                target.copy_(value)
        state = torch.cuda.get_rng_state()
        graph.replay()
        replayed = [t.clone() for t in static_results]
        torch.cuda.set_rng_state(state)   # the eager call draws its landmarks from the same generator state
        eager_inputs = [t.clone().requires_grad_(i < 3) for i, t in enumerate(fresh)]
        eager = _forward_backward(*eager_inputs)
        torch.cuda.synchronize()
        for name, a, b in zip(("out", "dq", "dk", "dv"), replayed, eager):
            assert torch.isfinite(a).all(), name
            assert torch.equal(a, b), f"{name}: replay differs from eager by {(a.float() - b.float()).abs().max()}"
