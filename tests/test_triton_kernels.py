"""The fused Triton kernels (backend="triton") against the readable reference.

On GPU-less machines these run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton). Every buffer the library allocates with torch.empty is
pre-filled with NaN, so an element a kernel forgets to write fails the comparison. Truth is the float64
reference on the same (rounded) inputs and the same landmarks; float16/bfloat16 results must be within 2x
the error of the reference run in that same dtype (the flash-attention rule), float32 within a small
absolute tolerance.
"""

import pytest
import torch

import skyformer_ext as sky
from skyformer_ext import api, reference, triton_backend
from skyformer_ext.landmarks import gather_landmarks, landmark_draws
from triton_kernels import gaussian_tiles, key_summary, query_apply
from triton_kernels import landmarks as landmark_stage
from conftest import assert_within_low_precision_rule, max_error

FLOAT32_TOL = 2e-5


pytestmark = pytest.mark.usefixtures("nan_poisoned_empty")  # unwritten outputs and gradients cannot pass


def _inputs(batch, heads, kv_heads, n_q, n_k, p, p_v, dtype, mask_kind):
    """Rows of norm ~p^(1/4), so that with the default scale p^-1/2 kappa spans (0, 1] instead of ~0."""
    spread = 0.6 * p ** -0.25
    q = (spread * torch.randn(batch, heads, n_q, p, dtype=torch.float64)).to(dtype)
    k = (spread * torch.randn(batch, kv_heads, n_k, p, dtype=torch.float64)).to(dtype)
    v = torch.randn(batch, kv_heads, n_k, p_v, dtype=torch.float64).to(dtype)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(batch, n_k) > 0.3
        mask[:, 0] = True
        if mask_kind == "with_empty_row":
            mask[-1] = False  # a batch row whose keys are all padded: output and key gradients must be 0
    return q, k, v, mask


def _run(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check_close(got, truth, base, dtype, name):
    assert not got.isnan().any(), f"{name}: NaN (an element was never written)"
    if dtype == torch.float32:
        err = max_error(got, truth)
        assert err <= FLOAT32_TOL * (1 + truth.abs().max().item()), f"{name}: error {err:.3e}"
    else:
        assert_within_low_precision_rule(got, truth, base, name=name)


def _check_against_reference(triton_fn, reference_fn, tensors, dtype, names):
    out_shape = reference_fn(*[t.double() for t in tensors]).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64)
    results = _run(triton_fn, tensors, grad_out)
    truths = _run(reference_fn, [t.double() for t in tensors], grad_out)
    baselines = _run(reference_fn, tensors, grad_out) if dtype != torch.float32 else truths
    for got, truth, base, name in zip(results, truths, baselines, names):
        assert got.dtype == dtype, name
        _check_close(got, truth, base, dtype, name)
    return results


# (dtype, batch, heads, kv_heads, n_q, n_k, p, p_v, mask): every axis is covered, not the full product.
KA_CASES = [
    (torch.float32, 2, 2, 2, 97, 97, 64, 64, "with_empty_row"),
    (torch.float32, 1, 4, 2, 17, 256, 80, 80, "none"),
    (torch.float32, 2, 2, 1, 1, 33, 16, 16, "random"),
    (torch.float32, 1, 2, 1, 17, 33, 192, 160, "with_empty_row"),  # float32's head-dim bucket 256
    (torch.float32, 1, 2, 2, 33, 17, 256, 256, "random"),
    (torch.float16, 2, 4, 2, 97, 61, 80, 80, "with_empty_row"),
    (torch.float16, 1, 2, 2, 256, 17, 16, 16, "none"),
    (torch.bfloat16, 2, 4, 1, 33, 97, 64, 64, "random"),
    (torch.bfloat16, 1, 2, 2, 1, 97, 80, 48, "with_empty_row"),
]


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,n_q,n_k,p,p_v,mask_kind", KA_CASES)
def test_kernelized_attention_matches_reference(dtype, batch, heads, kv_heads, n_q, n_k, p, p_v, mask_kind):
    q, k, v, mask = _inputs(batch, heads, kv_heads, n_q, n_k, p, p_v, dtype, mask_kind)
    results = _check_against_reference(
        lambda q, k, v: sky.kernelized_attention(q, k, v, attn_mask=mask, backend="triton"),
        lambda q, k, v: reference.kernelized_attention(q, k, v, attn_mask=mask),
        (q, k, v), dtype, ("out", "dq", "dk", "dv"))
    if mask_kind == "with_empty_row":
        out, _, grad_k, grad_v = results
        assert out[-1].abs().max() == 0 and grad_k[-1].abs().max() == 0 and grad_v[-1].abs().max() == 0


# (dtype, batch, heads, kv_heads, n_q, n_k, p, m, mask, inverse, ns_iters)
# The interpreter runs the landmark solve one (batch, head) matrix at a time, so the cases keep (batch * heads)
# small and GQA (heads > kv_heads) wherever it was. The default ns_iters (6) runs once per dtype (the first
# Newton-Schulz case of each); the shape edge cases (n_q = 1, n_k = 1, m = 2, p = 256) iterate twice: the solve's
# accuracy for every iteration count is tests/test_triton_solve.py's subject (ns_iters 1, 2, 3 and 6 there).
SKYFORMER_CASES = [
    (torch.float32, 2, 2, 2, 97, 97, 64, 16, "with_empty_row", "newton_schulz", 6),
    (torch.float32, 1, 2, 1, 256, 97, 80, 64, "none", "cholesky", 6),
    (torch.float32, 2, 2, 1, 1, 17, 16, 2, "random", "newton_schulz", 2),
    (torch.float32, 1, 2, 2, 17, 256, 16, 64, "random", "cholesky", 6),
    (torch.float32, 1, 2, 1, 33, 17, 256, 16, "with_empty_row", "newton_schulz", 2),
    (torch.float32, 1, 2, 2, 17, 33, 160, 16, "random", "cholesky", 6),
    (torch.float16, 2, 2, 1, 97, 61, 80, 16, "with_empty_row", "newton_schulz", 6),
    (torch.float16, 1, 2, 2, 256, 256, 64, 64, "none", "cholesky", 6),
    (torch.float16, 1, 2, 1, 17, 1, 16, 2, "none", "newton_schulz", 2),
    (torch.bfloat16, 1, 4, 1, 61, 97, 64, 16, "random", "newton_schulz", 6),
    (torch.bfloat16, 1, 2, 2, 1, 97, 80, 64, "with_empty_row", "cholesky", 6),
]


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,n_q,n_k,p,m,mask_kind,inverse,ns_iters", SKYFORMER_CASES)
def test_skyformer_matches_reference(dtype, batch, heads, kv_heads, n_q, n_k, p, m, mask_kind, inverse, ns_iters):
    q, k, v, mask = _inputs(batch, heads, kv_heads, n_q, n_k, p, p, dtype, mask_kind)
    idx = sky.sample_landmarks(batch, n_q, n_k, m, attn_mask=mask)
    _check_against_reference(
        lambda q, k, v: sky.skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, inverse=inverse,
                                                ns_iters=ns_iters, backend="triton"),
        lambda q, k, v: reference.skyformer_attention(q, k, v, idx, attn_mask=mask, inverse=inverse,
                                                      ns_iters=ns_iters),
        (q, k, v), dtype, ("out", "dq", "dk", "dv"))


def _power_of_two_split(grad: torch.Tensor, dtype):
    """(grad / f in dtype, f): the scaled form in which the landmark solve hands dZ to the key summary."""
    amax = grad.abs().amax((-1, -2)).float()
    factor = torch.exp2(torch.ceil(torch.log2(amax)))
    return (grad / factor[..., None, None]).to(dtype), factor


def _stage_truths(reference_fn, tensors, grad, dtype):
    """(float64 truth, same-dtype baseline) of the outputs and input gradients of a reference stage."""
    truth = _run(reference_fn, [t.double() for t in tensors], grad)
    return truth, (_run(reference_fn, tensors, grad) if dtype != torch.float32 else truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_key_summary_and_query_apply_stages_match_their_references(dtype):
    """The two n-sized stages on their own, forward and backward, gradients wrt every input (L included):
    split partials summed as their consumers do, dZ handed over scaled by per-head powers of two."""
    scale = 0.125
    q, k, v, mask = _inputs(2, 4, 2, 45, 97, 64, 32, dtype, "with_empty_row")
    landmarks = (0.6 * 64 ** -0.25 * torch.randn(2, 4, 24, 64)).to(dtype)

    grad_scaled, factor = _power_of_two_split(300 * torch.randn(2, 4, 24, 32, dtype=torch.float64), dtype)
    grad = grad_scaled.double() * factor.double()[..., None, None]  # exactly the gradient the kernels see
    truth, base = _stage_truths(lambda k, v, l: reference.key_summary(k, v, l, mask, scale), [k, v, landmarks],
                                grad, dtype)
    partials = key_summary.forward(k, v, landmarks, mask, scale)
    grad_k, grad_v, grad_l = key_summary.backward(grad_scaled, factor, k, v, landmarks, mask, scale)
    assert partials.dtype == grad_l.dtype == torch.float32 and grad_k.dtype == grad_v.dtype == dtype
    got = [partials.sum(0), grad_k, grad_v, grad_l.sum(0)]
    for g, t, b, name in zip(got, truth, base, ("summary", "dk", "dv", "dL")):
        _check_close(g, t, b, dtype, name)

    values = torch.randn(2, 4, 24, 32).to(dtype)
    grad = torch.randn(2, 4, 45, 32, dtype=torch.float64)
    truth, base = _stage_truths(lambda q, l, y: reference.query_apply(q, l, y, scale), [q, landmarks, values],
                                grad, dtype)
    out = query_apply.forward(q, landmarks, values, scale)
    grad_q, grad_l, grad_y = query_apply.backward(grad.to(dtype), q, landmarks, values, scale)
    assert out.dtype == grad_q.dtype == dtype and grad_l.dtype == grad_y.dtype == torch.float32
    for g, t, b, name in zip([out, grad_q, grad_l.sum(0), grad_y.sum(0)], truth, base, ("out", "dq", "dL", "dY")):
        _check_close(g, t, b, dtype, name)


# (batch, heads, kv_heads, n_q, n_k, m, p, mask, strategy): self- and cross-attention, GQA, m > n, no queries
LANDMARK_CASES = [
    (2, 4, 2, 97, 97, 16, 80, "random", "random"),
    (2, 2, 1, 33, 61, 33, 19, "random", "random"),
    (3, 2, 2, 40, 40, 8, 16, "with_empty_row", "strided"),
    (2, 2, 2, 10, 10, 50, 16, "with_empty_row", "random"),
    (1, 2, 1, 0, 17, 5, 16, "none", "random"),
    (2, 1, 1, 7, 300, 12, 16, "random", "strided"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,m,p,mask_kind,strategy", LANDMARK_CASES)
def test_landmark_stage_matches_sample_and_gather(batch, heads, kv_heads, n_q, n_k, m, p, mask_kind, strategy,
                                                  dtype):
    """Forward: the kernel turns the draws of one generator state (or the strided grid, or given indices)
    into exactly sample_landmarks' indices and gathers gather_landmarks' rows. Backward: the three dL parts
    (split partials included) land in dq / dk like gather_landmarks' autograd scatter-add."""
    q, k, _, mask = _inputs(batch, heads, kv_heads, n_q, n_k, p, p, dtype, mask_kind)
    expected = sky.sample_landmarks(batch, n_q, n_k, m, attn_mask=mask, strategy=strategy,
                                    generator=torch.Generator().manual_seed(7))
    draws = landmark_draws(batch, m, torch.Generator().manual_seed(7), "cpu") if strategy == "random" else None
    for given, chosen_draws in ((None, draws), (expected, None)):
        rows, indices = landmark_stage.forward(q, k, mask, m, given, chosen_draws)
        assert torch.equal(indices, expected)
        assert torch.equal(rows, gather_landmarks(q, k, expected, mask))  # zero rows for a row without keys

    parts = [torch.randn(2, batch, heads, m, p), torch.randn(3, batch, heads, m, p), torch.randn(batch, heads, m, p)]
    grad_q, grad_k = torch.randn_like(q, dtype=torch.float32), torch.randn_like(k, dtype=torch.float32)
    leaves = [q.double().requires_grad_(), k.double().requires_grad_()]
    gather_landmarks(*leaves, expected, mask).backward(parts[0].sum(0) + parts[1].sum(0) + parts[2])
    scattered = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # no queries: no q grad
    truth = [grad_q.double() + scattered[0], grad_k.double() + scattered[1]]
    grad_q, grad_k = grad_q.to(dtype), grad_k.to(dtype)
    base = [grad_q.double() + scattered[0], grad_k.double() + scattered[1]]
    landmark_stage.backward_into(grad_q, grad_k, indices, mask, *parts)
    for got, t, b, name in zip((grad_q, grad_k), truth, base, ("dq", "dk")):
        tolerance = 1e-5 if dtype == torch.float32 else 2 * max_error(b.to(dtype), t) + 1e-6
        assert max_error(got, t) <= tolerance * (1 + max_error(t, torch.zeros_like(t))), name


@pytest.fixture
def atomic_launches(monkeypatch):
    """Records, per buffer the host wrappers allocate, whether its launch adds into it atomically."""
    seen = []
    real_buffer = gaussian_tiles._buffer

    def recording(splits, shape, dtype, device, split_capable, atomic):
        seen.append(atomic)
        return real_buffer(splits, shape, dtype, device, split_capable, atomic)

    monkeypatch.setattr(gaussian_tiles, "_buffer", recording)
    return seen


# (dtype, batch, heads, kv_heads, n_q, n_k, p, m, mask): masks and GQA, fp32 and fp16
NONDETERMINISTIC_CASES = [
    (torch.float32, 2, 2, 1, 61, 40, 32, 16, "with_empty_row"),
    (torch.float16, 1, 4, 2, 97, 61, 80, 16, "random"),
]


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,n_q,n_k,p,m,mask_kind", NONDETERMINISTIC_CASES)
def test_deterministic_false_adds_split_partials_atomically_and_matches_reference(
        dtype, batch, heads, kv_heads, n_q, n_k, p, m, mask_kind, atomic_launches):
    q, k, v, mask = _inputs(batch, heads, kv_heads, n_q, n_k, p, p, dtype, mask_kind)
    idx = sky.sample_landmarks(batch, n_q, n_k, m, attn_mask=mask)
    # One Newton-Schulz iteration: the atomics are in the split n-sized stages, the solve has no splits.
    _check_against_reference(
        lambda q, k, v: sky.skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="triton",
                                                deterministic=False, ns_iters=1),
        lambda q, k, v: reference.skyformer_attention(q, k, v, idx, attn_mask=mask, ns_iters=1),
        (q, k, v), dtype, ("out", "dq", "dk", "dv"))
    assert any(atomic_launches), atomic_launches  # (few programs under the interpreter: the key summary splits)
    atomic_launches.clear()
    _check_against_reference(
        lambda q, k, v: sky.kernelized_attention(q, k, v, attn_mask=mask, backend="triton", deterministic=False),
        lambda q, k, v: reference.kernelized_attention(q, k, v, attn_mask=mask),
        (q, k, v), dtype, ("out", "dq", "dk", "dv"))
    assert any(atomic_launches), atomic_launches  # dK, dV split over the query rows


def test_deterministic_must_be_a_bool():
    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 16, 16, torch.float32, "none")
    for backend in ("triton", "torch"):
        with pytest.raises(TypeError, match="deterministic"):
            sky.skyformer_attention(q, k, v, num_landmarks=2, backend=backend, deterministic=1)
        with pytest.raises(TypeError, match="deterministic"):
            sky.kernelized_attention(q, k, v, backend=backend, deterministic="no")


def test_same_input_gives_bit_identical_outputs_and_gradients():
    """Split reductions add partial sums in a fixed order: no atomics, no run-to-run variation."""
    q, k, v, mask = _inputs(1, 4, 2, 61, 97, 32, 32, torch.float16, "random")
    idx = sky.sample_landmarks(1, 61, 97, 16, attn_mask=mask)
    grad = torch.randn(1, 4, 61, 32)

    def once(fn):
        return _run(fn, (q, k, v), grad)

    # One Newton-Schulz iteration: the split reductions are in the n-sized stages (one program per matrix solves).
    for fn in (lambda q, k, v: sky.skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask,
                                                       backend="triton", ns_iters=1),
               lambda q, k, v: sky.kernelized_attention(q, k, v, attn_mask=mask, backend="triton",
                                                        deterministic=True)):
        first, second = once(fn), once(fn)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    scale = 0.25
    q, k, v, mask = _inputs(1, 2, 1, 19, 23, 16, 16, torch.float32, "random")
    indices = sky.sample_landmarks(1, 19, 23, 5, attn_mask=mask)
    draws = landmark_draws(1, 5, None, "cpu")
    cases = []
    # ns_iters = 1: opcheck runs each op several times, and checks registration (schema, fake, autograd, AOT
    # dispatch), which the iteration count does not change (a runtime int of the same kernels).
    for deterministic in (True, False):
        cases += [
            (torch.ops.skyformer_ext.kernelized_attention, (q, k, v, mask, scale, deterministic)),
            (torch.ops.skyformer_ext.skyformer_attention,
             (q, k, v, mask, indices, None, 5, scale, 0.1, "newton_schulz", 1, deterministic, 0)),
            (torch.ops.skyformer_ext.skyformer_attention,  # with one landmark refinement step
             (q, k, v, mask, None, draws, 5, scale, 0.1, "newton_schulz", 1, deterministic, 1)),
        ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.dtype != torch.float64 else a for a in args)
        torch.library.opcheck(op, args)


def test_torch_compile_keeps_the_fused_ops_in_one_graph():
    q, k, v, mask = _inputs(1, 2, 1, 17, 23, 16, 16, torch.float32, "random")
    idx = sky.sample_landmarks(1, 17, 23, 4, attn_mask=mask)

    # The backend entry points, past api.py's argument checks (check_landmark_indices reads index values,
    # a data-dependent guard that torch.compile cannot trace).
    def both(q, k, v):
        return (triton_backend.skyformer_attention(q, k, v, mask, 4, idx, None, 0.1, "newton_schulz", 6, 0.25)
                + triton_backend.kernelized_attention(q, k, v, mask, 0.25))

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(q, k, v), both(q, k, v))


def test_backend_choice_and_errors(monkeypatch):
    def cuda_like(dtype, head_dim):  # "auto" only looks at the device, dtype and head dims
        return type("FakeCudaTensor", (), {"is_cuda": True, "dtype": dtype, "shape": (1, 1, 8, head_dim)})()

    for dtype, head_dim, expected in ((torch.float16, 256, "triton"), (torch.bfloat16, 80, "triton"),
                                      (torch.float32, 160, "triton"), (torch.float32, 256, "triton"),
                                      (torch.float16, 257, "torch"), (torch.float32, 320, "torch"),
                                      (torch.float64, 64, "torch")):
        fake = cuda_like(dtype, head_dim)
        assert api._resolve_backend("auto", fake, fake) == expected, (dtype, head_dim)
    cpu = torch.zeros(1, 1, 1, 16)
    assert api._resolve_backend("auto", cpu, cpu) == "torch"

    q, k, v, _ = _inputs(1, 1, 1, 4, 4, 16, 16, torch.float64, "none")
    with pytest.raises(TypeError, match="float64"):
        sky.kernelized_attention(q, k, v, backend="triton")
    wide = torch.zeros(1, 1, 4, 272)
    with pytest.raises(ValueError, match="head dims up to 256"):
        sky.kernelized_attention(wide, wide, wide, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        sky.skyformer_attention(q.float(), k.float(), v.float(), num_landmarks=2, backend="triton")
