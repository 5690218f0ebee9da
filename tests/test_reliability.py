"""What training throws at the op, on every backend (triton in the interpreter here): garbage under padding,
fully masked batch rows, NaN in valid rows, double backward, autocast. Each test failed on the main of
issue 13 before its fix."""

import pytest
import torch

import skyformer_ext as sx
from conftest import assert_within_low_precision_rule, max_error

BACKENDS = ["torch", "reference", "triton"]
DTYPES = {"torch": [torch.float64, torch.float32, torch.bfloat16],
          "reference": [torch.float64, torch.float32, torch.bfloat16],
          "triton": [torch.float32, torch.bfloat16]}
BACKEND_DTYPES = [(backend, dtype) for backend in BACKENDS for dtype in DTYPES[backend]]
P = 16


def _ns_iters(backend):
    """Few iterations: a faster interpreter, and irrelevant here. One on triton, whose interpreted solve
    dominates a call; the CPU backends keep two (an iteration handing over to the next, for the second
    derivatives of the reference)."""
    return 1 if backend == "triton" else 2


def _attention(fn, backend, q, k, v, mask, **options):
    if fn == "skyformer":
        options.setdefault("generator", torch.Generator().manual_seed(5))
        options.setdefault("ns_iters", _ns_iters(backend))
        return sx.skyformer_attention(q, k, v, num_landmarks=8, attn_mask=mask, backend=backend, **options)
    return sx.kernelized_attention(q, k, v, attn_mask=mask, backend=backend)


def _run(fn, backend, q, k, v, mask, **options):
    """(out, dq, dk, dv) for a fixed random output gradient."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = _attention(fn, backend, q, k, v, mask, **options)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(dtype, n_q, n_k, batch=2, heads=2, kv_heads=1, p=P):
    """GQA inputs; few (batch, head) pairs, since the interpreter runs the landmark solve one matrix at a time."""
    q = torch.randn(batch, heads, n_q, p).to(dtype)
    k, v = (torch.randn(batch, kv_heads, n_k, p).to(dtype) for _ in range(2))
    return q, k, v


def _with_padding(k, v, mask, value):
    padded = ~mask[:, None, :, None]
    return k.masked_fill(padded, value), v.masked_fill(padded, value)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
@pytest.mark.parametrize("n_q,n_k,garbage", [(23, 23, float("nan")), (17, 23, float("inf"))])
def test_garbage_under_padded_keys_changes_nothing(backend, dtype, fn, n_q, n_k, garbage):
    """Keys and values that attn_mask excludes may hold anything: every output and every gradient (of valid
    and padded positions) is bit-identical to the call with zeros there."""
    q, k, v = _inputs(dtype, n_q, n_k)
    mask = torch.ones(2, n_k, dtype=torch.bool)
    mask[0, -6:] = False
    mask[1, 3:5] = False
    clean = _run(fn, backend, q, *_with_padding(k, v, mask, 0.0), mask)
    dirty = _run(fn, backend, q, *_with_padding(k, v, mask, garbage), mask)
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
@pytest.mark.parametrize("inverse", ["newton_schulz", "cholesky"])
def test_fully_masked_batch_row_with_nan_keys_gives_zeros(backend, dtype, fn, inverse):
    """A batch row whose keys are all masked (and hold NaN) returns zeros with zero gradients; the other rows
    are untouched."""
    if fn == "kernelized" and inverse == "cholesky":
        pytest.skip("kernelized attention has no landmark solve")
    q, k, v = _inputs(dtype, 19, 19)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1] = False
    options = dict(inverse=inverse) if fn == "skyformer" else {}
    clean = _run(fn, backend, q, *_with_padding(k, v, mask, 0.0), mask, **options)
    out, dq, dk, dv = _run(fn, backend, q, *_with_padding(k, v, mask, float("nan")), mask, **options)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), name
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, (out, dq, dk, dv)):
        assert torch.equal(a[0], b[0]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
def test_nan_in_a_valid_query_row_gives_nan_in_that_row(backend, fn):
    """NaN in, NaN out: the Triton kernels' exponent clamp used to turn a NaN query into a finite kappa."""
    q, k, v = _inputs(torch.float32, 21, 21, heads=4, kv_heads=2)
    q[0, 1, 4, 3] = float("nan")
    options = dict(landmark_indices=torch.tensor([[0, 2, 21, 30]] * 2)) if fn == "skyformer" else {}
    out = _attention(fn, backend, q, k, v, None, **options)
    assert torch.isnan(out[0, 1, 4]).all()
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, 1, 4] = False
    assert torch.isfinite(out[others]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
def test_nan_in_a_valid_key_row_gives_nan_for_its_kv_head(backend, fn):
    """A NaN key that is not a landmark reaches every output of its batch row and kv-head group (through
    the key summary, or the exact sum), and nothing else."""
    q, k, v = _inputs(torch.float32, 21, 21, heads=4, kv_heads=2)
    k[0, 1, 6, 0] = float("nan")  # kv-head 1 serves q-heads 2 and 3
    options = dict(landmark_indices=torch.tensor([[0, 2, 21, 30]] * 2)) if fn == "skyformer" else {}
    out = _attention(fn, backend, q, k, v, None, **options)
    assert torch.isnan(out[0, 2:]).all()
    assert torch.isfinite(out[0, :2]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
def test_reference_backend_has_correct_second_derivatives(fn):
    q, k, v = _inputs(torch.float64, 5, 6, batch=1, heads=2, kv_heads=1, p=3)
    mask = torch.tensor([[True] * 5 + [False]])
    options = dict(landmark_indices=torch.tensor([[0, 3, 5, 8]])) if fn == "skyformer" else {}
    inputs = tuple(x.requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradgradcheck(lambda *x: _attention(fn, "reference", *x, mask, **options), inputs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
def test_double_backward_raises_a_clear_error(backend, fn):
    """The hand-written backwards have no derivative: differentiating their gradients raises (it used to
    return silently wrong second derivatives on the torch backend), while first derivatives taken with
    create_graph=True stay exact."""
    q, k, v = _inputs(torch.float32, 9, 9, batch=1, heads=2, kv_heads=1)
    options = dict(landmark_indices=torch.tensor([[0, 3, 9, 12]])) if fn == "skyformer" else {}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    plain = torch.autograd.grad(_attention(fn, backend, *leaves, None, **options).sum(), leaves)
    grads = torch.autograd.grad(_attention(fn, backend, *leaves, None, **options).sum(), leaves,
                                create_graph=True)
    for a, b in zip(plain, grads):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' computes first derivatives only"):
        torch.autograd.grad(grads[0].square().sum(), leaves[0], retain_graph=True)  # used to give zeros
    with pytest.raises(RuntimeError, match="first derivatives only"):
        (grads[0].sum() + grads[1].sum() + grads[2].sum()).backward()


def _run_in_autocast(fn, backend, dtype, q, k, v, mask, backward_inside):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with torch.autocast("cpu", dtype=dtype):
        out = _attention(fn, backend, q, k, v, mask)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
        if backward_inside:
            out.backward(grad)
    if not backward_inside:
        out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
def test_autocast_casts_float32_inputs_like_sdpa(backend, autocast_dtype, fn):
    """Under torch.autocast, float32 q, k, v are cast to the region's dtype and the call runs as it would on
    inputs of that dtype, bit for bit; the output has that dtype and the float32 leaves get float32
    gradients. A backward called inside the region works too: the tiled and fused backwards turn autocast
    off; PyTorch autocasts the plain-autograd parts (the reference; the torch path's landmark Gram and
    solve), which may cost those gradients some precision, so they are held to the low-precision rule."""
    q, k, v = _inputs(torch.float32, 13, 15)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, -4:] = False
    cast = _run(fn, backend, *(x.to(autocast_dtype) for x in (q, k, v)), mask)
    outside = _run_in_autocast(fn, backend, autocast_dtype, q, k, v, mask, backward_inside=False)
    inside = _run_in_autocast(fn, backend, autocast_dtype, q, k, v, mask, backward_inside=True)
    assert outside[0].dtype == inside[0].dtype == autocast_dtype
    assert all(g.dtype == torch.float32 for g in outside[1:] + inside[1:])
    truth = _run(fn, "reference", *(x.double() for x in (q, k, v)), mask, ns_iters=_ns_iters(backend))
    for name, a, b, c, exact in zip(("out", "dq", "dk", "dv"), cast, outside, inside, truth):
        assert torch.equal(a.float(), b), name
        assert_within_low_precision_rule(c, exact, a, name=name)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_leaves_float64_alone(backend):
    q, k, v = _inputs(torch.float64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sx.skyformer_attention(q, k, v, num_landmarks=4, backend=backend)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_custom_ops_apply_the_autocast_policy_when_called_directly(autocast_dtype):
    from skyformer_ext import triton_backend  # noqa: F401  (registers the ops)
    q, k, v = _inputs(torch.float32, 9, 9)
    with torch.autocast("cpu", dtype=autocast_dtype):
        exact = torch.ops.skyformer_ext.kernelized_attention(q, k, v, None, 0.25, True)
        out, landmarks, _, summary, _, _, counts = torch.ops.skyformer_ext.skyformer_attention(
            q, k, v, None, None, None, 4, 0.25, 0.1, "newton_schulz", 6, True, 1)  # one refinement step
    assert exact.dtype == out.dtype == landmarks.dtype == autocast_dtype
    assert summary.dtype == counts.dtype == torch.float32
    assert torch.equal(exact, torch.ops.skyformer_ext.kernelized_attention(
        *(x.to(autocast_dtype) for x in (q, k, v)), None, 0.25, True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["skyformer", "kernelized"])
@pytest.mark.parametrize("batch,heads,kv_heads", [(0, 2, 1), (2, 0, 0), (2, 0, 1)])
def test_no_batch_rows_or_no_heads_give_an_empty_result(backend, fn, batch, heads, kv_heads):
    """As SDPA: an empty (batch, heads, n_q, p_v) output that backward passes through (zero gradients)."""
    q = torch.randn(batch, heads, 5, P, requires_grad=True)
    k = torch.randn(batch, kv_heads, 6, P, requires_grad=True)
    v = torch.randn(batch, kv_heads, 6, 3, requires_grad=True)
    out = _attention(fn, backend, q, k, v, None)
    assert out.shape == (batch, heads, 5, 3) and out.dtype == q.dtype
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_far_more_landmarks_than_rows_warns_once(monkeypatch):
    from skyformer_ext import api
    monkeypatch.setattr(api, "_many_landmarks_warned", False)
    q, k, v = _inputs(torch.float64, 7, 9)
    with pytest.warns(RuntimeWarning, match="40 landmarks for 16 rows"):
        sx.skyformer_attention(q, k, v, num_landmarks=40, backend="torch")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sx.skyformer_attention(q, k, v, num_landmarks=40, backend="torch")  # once per process
        sx.skyformer_attention(q, k, v, num_landmarks=16, backend="torch")


@pytest.mark.parametrize("option,value,error", [
    ("scale", float("inf"), ValueError), ("scale", float("nan"), ValueError), ("ridge", float("inf"), ValueError),
    ("ridge", float("nan"), ValueError), ("backend", "bogus", ValueError), ("ns_iters", 0, ValueError),
    ("deterministic", 1, TypeError)])
def test_bad_options_fail_at_call_and_at_module_construction(option, value, error):
    from skyformer_ext.nn import SkyformerAttention
    q, k, v = _inputs(torch.float32, 5, 5)
    with pytest.raises(error, match=option):
        sx.skyformer_attention(q, k, v, num_landmarks=4, **{option: value})
    with pytest.raises(error, match=option):
        SkyformerAttention(32, 2, **{option: value})


@pytest.mark.parametrize("offset", [10.0, 30.0])
@pytest.mark.parametrize("backend,bound", [("torch", 4.0), ("triton", 2.0)])
def test_float32_error_on_large_norms_stays_within_the_documented_bound(backend, bound, offset):
    """The exponent's cancellation costs every float32 path ~eps * scale * |x|^2: the fused kernels stay within
    2x of the float32 reference's own error, the tiled torch path within 4x (README, edge cases)."""
    q, k, v = _inputs(torch.float64, 64, 64, batch=1, heads=2, kv_heads=2, p=32)
    q, k = q + offset, k + offset  # |x| ~ offset * sqrt(p): large norms, as after a few unnormalised layers
    idx = sx.sample_landmarks(1, 64, 64, 16, generator=torch.Generator().manual_seed(1))
    options = dict(landmark_indices=idx, inverse="cholesky")
    truth = sx.skyformer_attention(q, k, v, backend="reference", **options)
    low = [x.float() for x in (q, k, v)]
    reference_error = max_error(sx.skyformer_attention(*low, backend="reference", **options), truth)
    assert max_error(sx.skyformer_attention(*low, backend=backend, **options), truth) <= bound * reference_error
