"""End to end: skyformer_attention through the landmark-solve extension still matches the reference."""

import pytest
import torch

from skyformer_ext import _extension, reference, sample_landmarks, skyformer_attention

from conftest import assert_within_low_precision_rule, max_error


def _inputs(dtype, *, batch=2, heads=4, kv_heads=2, n_q=37, n_k=29, head_dim=12, value_dim=7, m=16):
    q = torch.randn(batch, heads, n_q, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, n_k, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, n_k, value_dim, dtype=dtype)
    mask = torch.rand(batch, n_k) > 0.3
    mask[:, 0] = True
    indices = sample_landmarks(batch, n_q, n_k, m, attn_mask=mask, strategy="random", generator=None,
                               device=q.device)
    return q, k, v, mask, indices


def _forward_backward(fn, q, k, v, upstream):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return [out] + [t.grad for t in leaves]


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("inverse", ["cholesky", "newton_schulz"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_skyformer_attention_matches_reference(extension, inverse, dtype, monkeypatch):
    """float64: equal to the float64 reference; float32: error <= 2x that of the float32 reference."""
    if not extension:
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "_fallback_warned", True)
    q, k, v, mask, indices = _inputs(dtype)
    upstream = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=dtype)
    options = dict(landmark_indices=indices, attn_mask=mask, inverse=inverse, ridge=0.1, ns_iters=6)
    actual = _forward_backward(lambda a, b, c: skyformer_attention(a, b, c, backend="torch", **options),
                               q, k, v, upstream)
    def run_reference(*tensors):
        return _forward_backward(lambda a, b, c: reference.skyformer_attention(
            a, b, c, indices, attn_mask=mask, inverse=inverse, ridge=0.1, ns_iters=6), *tensors)

    truth = run_reference(q.double(), k.double(), v.double(), upstream.double())
    baseline = run_reference(q, k, v, upstream)
    for name, got, want, same_dtype in zip(("output", "dq", "dk", "dv"), actual, truth, baseline):
        assert got.dtype == dtype
        if dtype == torch.float64:
            assert max_error(got, want) <= 1e-10 * max(want.abs().max().item(), 1.0), name
        else:
            assert_within_low_precision_rule(got, want, same_dtype, name=name)


def test_cholesky_and_newton_schulz_agree_when_converged():
    """With enough iterations the two inverses give the same attention output."""
    q, k, v, mask, indices = _inputs(torch.float64)
    options = dict(landmark_indices=indices, attn_mask=mask, ridge=1.0, backend="torch")
    exact = skyformer_attention(q, k, v, inverse="cholesky", **options)
    iterated = skyformer_attention(q, k, v, inverse="newton_schulz", ns_iters=30, **options)
    assert max_error(exact, iterated) <= 1e-8 * exact.abs().max().item()
