"""The tiled PyTorch path (backend="torch") against the reference: values, gradients, dtypes, shapes,
masks, determinism, and the tiling itself (forced small tiles exercise every tile boundary)."""

import pytest
import torch

import skyformer_ext as sx
from skyformer_ext import reference, torch_backend

from conftest import assert_within_low_precision_rule, max_error


def make_inputs(batch=2, heads=4, kv_heads=2, n_q=97, n_k=61, p=80, p_v=40, dtype=torch.float64,
                masked=True):
    q = torch.randn(batch, heads, n_q, p, dtype=dtype)
    k = torch.randn(batch, kv_heads, n_k, p, dtype=dtype)
    v = torch.randn(batch, kv_heads, n_k, p_v, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(batch, n_k) > 0.3
        mask[:, 0] = True
    return q, k, v, mask


@pytest.fixture(params=[False, True], ids=["default-tiles", "tiny-tiles"])
def tiling(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 1)
    return request.param


def _outputs_and_grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


@pytest.mark.parametrize("inverse", ["newton_schulz", "cholesky"])
@pytest.mark.parametrize("shape", [dict(), dict(n_q=40, n_k=97, heads=2, kv_heads=2, p=16, p_v=16),
                                   dict(n_q=1, n_k=17, heads=3, kv_heads=1, p=64, p_v=8)],
                         ids=["gqa-97x61-p80", "cross-40x97-p16", "mqa-1x17-p64"])
def test_skyformer_fp32_matches_reference(inverse, shape, tiling):
    q, k, v, mask = make_inputs(dtype=torch.float64, **shape)
    idx = sx.sample_landmarks(q.shape[0], q.shape[2], k.shape[2], 16, attn_mask=mask)
    truth_fn = lambda q_, k_, v_: reference.skyformer_attention(q_, k_, v_, idx, attn_mask=mask, inverse=inverse)
    fast_fn = lambda q_, k_, v_: sx.skyformer_attention(q_, k_, v_, landmark_indices=idx, attn_mask=mask,
                                                        inverse=inverse, backend="torch")
    grad_out = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    truth, truth_grads = _outputs_and_grads(truth_fn, (q, k, v), grad_out)
    fast, fast_grads = _outputs_and_grads(fast_fn, (q.float(), k.float(), v.float()), grad_out.float())
    assert fast.dtype == torch.float32
    assert max_error(fast, truth) <= 1e-5 * truth.abs().max().item()
    for name, g, t in zip("qkv", fast_grads, truth_grads):
        assert g.dtype == torch.float32
        assert max_error(g, t) <= 1e-5 * t.abs().max().item(), f"d{name}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inverse", ["newton_schulz", "cholesky"])
def test_skyformer_low_precision_within_twice_reference_error(dtype, inverse, tiling):
    q, k, v, mask = make_inputs(dtype=torch.float64)
    idx = sx.sample_landmarks(2, q.shape[2], k.shape[2], 16, attn_mask=mask)
    q, k, v = q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double()  # representable inputs
    grad_out = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=torch.float64).to(dtype)
    ref = lambda q_, k_, v_: reference.skyformer_attention(q_, k_, v_, idx, attn_mask=mask, inverse=inverse)
    fast = lambda q_, k_, v_: sx.skyformer_attention(q_, k_, v_, landmark_indices=idx, attn_mask=mask,
                                                     inverse=inverse, backend="torch")
    truth, truth_grads = _outputs_and_grads(ref, (q, k, v), grad_out.double())
    low = [t.to(dtype) for t in (q, k, v)]
    base, base_grads = _outputs_and_grads(ref, low, grad_out)
    out, out_grads = _outputs_and_grads(fast, low, grad_out)
    assert out.dtype == dtype
    assert_within_low_precision_rule(out, truth, base, name="output")
    for name, g, t, b in zip("qkv", out_grads, truth_grads, base_grads):
        assert g.dtype == dtype
        assert_within_low_precision_rule(g, t, b, name=f"d{name}")


@pytest.mark.parametrize("inverse", ["newton_schulz", "cholesky"])
@pytest.mark.parametrize("masked", [False, True])
def test_skyformer_gradcheck_float64(inverse, masked, monkeypatch):
    monkeypatch.setattr(torch_backend, "TILE_ELEMENTS", 1)
    q, k, v, mask = make_inputs(batch=1, heads=2, kv_heads=1, n_q=5, n_k=19, p=3, p_v=2, masked=masked)
    idx = sx.sample_landmarks(1, 5, 19, 4, attn_mask=mask)
    fn = lambda q_, k_, v_: sx.skyformer_attention(q_, k_, v_, landmark_indices=idx, attn_mask=mask,
                                                   inverse=inverse, backend="torch")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


def test_kernelized_matches_reference_and_gradcheck(tiling):
    q, k, v, mask = make_inputs(dtype=torch.float64)
    grad_out = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    ref_fn = lambda q_, k_, v_: reference.kernelized_attention(q_, k_, v_, attn_mask=mask)
    fast_fn = lambda q_, k_, v_: sx.kernelized_attention(q_, k_, v_, attn_mask=mask, backend="torch")
    truth, truth_grads = _outputs_and_grads(ref_fn, (q, k, v), grad_out)
    fast, fast_grads = _outputs_and_grads(fast_fn, (q, k, v), grad_out)
    torch.testing.assert_close(fast, truth, rtol=1e-12, atol=1e-12)
    for g, t in zip(fast_grads, truth_grads):
        torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)
    small = [t[:1, :2, :6, :3].clone().requires_grad_() for t in (q, k, v)]
    small_mask = mask[:1, :6]
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: sx.kernelized_attention(q_, k_, v_, attn_mask=small_mask, backend="torch"), small)


def test_large_norms_neither_overflow_nor_underflow():
    # Rows around a far common centre: scale*|q|^2/2 is ~800, so kappa factored into exp(q.k) * exp(-|q|^2/2)
    # overflows to inf/NaN or underflows to 0, while the true kernel values are moderate. The tiled path
    # must keep the exponent in one piece; fp32 cancellation of the ~800-sized terms costs ~3e-4 relative.
    q, k, v, _ = make_inputs(n_q=33, n_k=45, p=16, p_v=8, dtype=torch.float64, masked=False)
    q, k = q + 20.0, k + 20.0
    truth = reference.kernelized_attention(q, k, v)
    fast = sx.kernelized_attention(q.float(), k.float(), v.float(), backend="torch")
    assert truth.abs().max() > 1e-3
    assert max_error(fast, truth) <= 2e-3 * truth.abs().max().item()
    idx = sx.sample_landmarks(2, 33, 45, 16, generator=torch.Generator().manual_seed(0))
    truth = reference.skyformer_attention(q, k, v, idx, inverse="cholesky")
    fast = sx.skyformer_attention(q.float(), k.float(), v.float(), landmark_indices=idx, inverse="cholesky",
                                  backend="torch")
    assert torch.isfinite(fast).all()
    assert max_error(fast, truth) <= 2e-3 * truth.abs().max().item()


def test_padded_keys_change_nothing():
    q, k, v, mask = make_inputs(dtype=torch.float32)
    idx = sx.sample_landmarks(2, q.shape[2], k.shape[2], 16, attn_mask=mask)
    base = sx.skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="torch")
    pad = ~mask[:, None, :, None]
    k2 = torch.where(pad, torch.randn_like(k) * 100, k)
    v2 = torch.where(pad, torch.full_like(v, float("nan")), v)
    changed = sx.skyformer_attention(q, k2, v2, landmark_indices=idx, attn_mask=mask, backend="torch")
    assert torch.equal(base, changed)
    ka = sx.kernelized_attention(q, k, v, attn_mask=mask, backend="torch")
    assert torch.equal(ka, sx.kernelized_attention(q, k2, v2, attn_mask=mask, backend="torch"))


def test_landmarks_never_on_padded_rows():
    batch, n = 3, 50
    mask = torch.rand(batch, n) > 0.6
    mask[:, 3] = True
    for strategy in ("random", "strided"):
        for n_q in (n, 20):  # self-attention (queries share the mask) and cross-attention
            idx = sx.sample_landmarks(batch, n_q, n, 64, attn_mask=mask, strategy=strategy)
            assert idx.shape == (batch, 64) and idx.dtype == torch.int64
            for b in range(batch):
                query_rows, key_rows = idx[b][idx[b] < n_q], idx[b][idx[b] >= n_q] - n_q
                assert len(query_rows) == 32 and len(key_rows) == 32
                assert mask[b, key_rows].all()
                if n_q == n:
                    assert mask[b, query_rows].all()


def test_sampling_is_reproducible_and_strided_is_deterministic():
    q, k, v, mask = make_inputs(dtype=torch.float32)
    runs = [sx.skyformer_attention(q, k, v, attn_mask=mask, num_landmarks=16,
                                   generator=torch.Generator().manual_seed(7), backend="torch") for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = sx.skyformer_attention(q, k, v, attn_mask=mask, num_landmarks=16,
                                   generator=torch.Generator().manual_seed(8), backend="torch")
    assert not torch.equal(runs[0], other)
    strided = [sx.sample_landmarks(2, 97, 61, 16, attn_mask=mask, strategy="strided") for _ in range(2)]
    assert torch.equal(strided[0], strided[1])
    even = sx.sample_landmarks(1, 8, 8, 4, strategy="strided")
    assert even.tolist() == [[2, 6, 10, 14]]


def test_non_contiguous_inputs():
    q, k, v, mask = make_inputs(dtype=torch.float64)
    idx = sx.sample_landmarks(2, q.shape[2], k.shape[2], 16, attn_mask=mask)
    # Seq-major storage, as produced by (batch, seq, heads, dim) projections.
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    expected = reference.skyformer_attention(q, k, v, idx, attn_mask=mask)
    actual = sx.skyformer_attention(qt, kt, vt, landmark_indices=idx, attn_mask=mask, backend="torch")
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_compiles_fullgraph_with_explicit_landmarks():
    q, k, v, mask = make_inputs(dtype=torch.float32, n_q=33, n_k=33)
    idx = sx.sample_landmarks(2, 33, 33, 8, attn_mask=mask)
    fn = lambda q_, k_, v_: sx.skyformer_attention(q_, k_, v_, landmark_indices=idx, attn_mask=mask,
                                                   backend="torch")
    grad_out = torch.randn(2, 4, 33, 40)
    eager, eager_grads = _outputs_and_grads(fn, (q, k, v), grad_out)
    compiled, compiled_grads = _outputs_and_grads(torch.compile(fn, fullgraph=True), (q, k, v), grad_out)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e)
