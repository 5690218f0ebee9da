"""Landmark refinement (landmark_refine, issue 18): Lloyd steps on the seed landmarks.

The reference is checked against a plain loop over points written from the issue's semantics; the torch
backend against the reference in float64 (outputs and every gradient, gradcheck); the triton kernels (the
interpreter here) against the float64 reference in float32 and the 2x rule in bfloat16. Cases: GQA,
n_q != n_k, masks with NaN and huge values under padding, self-attention with a mask, duplicate seeds,
landmarks that end up empty, more landmarks than valid rows, a batch row with no valid key.
"""

import pytest
import torch

import skyformer_ext as sx
from skyformer_ext import reference
from conftest import assert_within_low_precision_rule, max_error


def _lloyd_by_loops(q, k, seeds, steps, attn_mask):
    """The issue's semantics, one point and one landmark at a time, in float64."""
    batch, heads, n_q, _ = q.shape
    n_k, group = k.shape[2], heads // k.shape[1]
    out = seeds.clone().double()
    for b in range(batch):
        has_key = attn_mask is None or bool(attn_mask[b].any())
        for h in range(heads):
            points = []
            for i in range(n_q):
                if has_key and (attn_mask is None or n_q != n_k or attn_mask[b, i]):
                    points.append(q[b, h, i].double())
            for j in range(n_k):
                if has_key and (attn_mask is None or attn_mask[b, j]):
                    points.append(k[b, h // group, j].double())
            landmarks = out[b, h]
            for _ in range(steps):
                sums = torch.zeros_like(landmarks)
                counts = [0] * landmarks.shape[0]
                for x in points:
                    distances = [float(((x - l) ** 2).sum()) for l in landmarks]
                    nearest = distances.index(min(distances))  # the first minimum: the lower index
                    sums[nearest] += x
                    counts[nearest] += 1
                landmarks = torch.stack([sums[j] / counts[j] if counts[j] else landmarks[j]
                                         for j in range(len(counts))])
            out[b, h] = landmarks
    return out


def _case(name):
    """(q, k, v, attn_mask, landmark_indices) in float64 for a named case; padded keys hold garbage."""
    gen = torch.Generator().manual_seed(len(name))
    batch, heads, kv_heads, n_q, n_k, p, p_v, m = 2, 4, 2, 23, 23, 7, 5, 6
    if name == "cross":
        n_q = 17
    if name == "many-landmarks":
        m = 40
    q = torch.randn(batch, heads, n_q, p, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n_k, p, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n_k, p_v, generator=gen, dtype=torch.float64)
    mask = None
    if name in ("self-masked", "cross", "many-landmarks", "keyless-row"):
        mask = torch.rand(batch, n_k, generator=gen) > 0.35
        mask[:, 0] = True
        if name == "keyless-row":
            mask[1] = False
        padded = ~mask[:, None, :, None]
        k = k.masked_fill(padded, float("nan"))
        v = v.masked_fill(padded, 1e30)
    indices = sx.sample_landmarks(batch, n_q, n_k, m, attn_mask=mask, generator=gen)
    if name == "duplicate-seeds":
        indices[:, 1] = indices[:, 0]
        indices[:, 3] = indices[:, 0]
    if name == "empty-landmarks":  # a far-away seed that no point is nearest to: it stays where it is
        q[0, :, 5] += 50.0
        indices[0, 2] = 5
    return q, k, v, mask, indices


CASES = ["plain", "self-masked", "cross", "duplicate-seeds", "empty-landmarks", "many-landmarks", "keyless-row"]


def _seeds(q, k, indices, mask):
    return sx.landmarks.gather_landmarks(q, k, indices, mask)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("steps", [1, 2])
def test_reference_refinement_is_lloyds_algorithm(case, steps):
    q, k, _, mask, indices = _case(case)
    seeds = _seeds(q, k, indices, mask)
    refined = reference.refine_landmarks(q, k, seeds, steps, mask)
    torch.testing.assert_close(refined, _lloyd_by_loops(q, k, seeds, steps, mask), rtol=1e-12, atol=1e-12)
    if case == "empty-landmarks":
        torch.testing.assert_close(refined[0, :, 2], seeds[0, :, 2], rtol=0, atol=0)
    if case == "keyless-row":
        assert torch.equal(refined[1], torch.zeros_like(refined[1]))


def test_duplicate_seeds_keep_one_copy_in_place():
    """Ties go to the lower index: of identical seeds the first takes every point, the others stay."""
    q, k, _, mask, indices = _case("duplicate-seeds")
    seeds = _seeds(q, k, indices, mask)
    refined = reference.refine_landmarks(q, k, seeds, 1, mask)
    assert not torch.equal(refined[:, :, 0], seeds[:, :, 0])
    assert torch.equal(refined[:, :, 1], seeds[:, :, 1]) and torch.equal(refined[:, :, 3], seeds[:, :, 3])


def _run(backend, q, k, v, mask, indices, steps, **options):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = sx.skyformer_attention(q, k, v, attn_mask=mask, landmark_indices=indices, landmark_refine=steps,
                                 backend=backend, **options)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("steps", [1, 2])
def test_torch_backend_matches_reference_float64(case, steps):
    q, k, v, mask, indices = _case(case)
    expected = _run("reference", q, k, v, mask, indices, steps)
    actual = _run("torch", q, k, v, mask, indices, steps)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10, msg=name)
        assert torch.isfinite(a).all(), name


@pytest.mark.parametrize("backend", ["reference", "torch"])
# Two steps: the same code path per step, a minute of gradcheck on two cores: the slow profile.
@pytest.mark.parametrize("steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_gradcheck_float64(backend, steps):
    q, k, v, mask, indices = _case("self-masked")
    mask = mask.clone()
    k, v = k.nan_to_num(0.0), v.clamp(max=10.0)  # gradcheck perturbs every element: finite padding

    def f(q, k, v):
        return sx.skyformer_attention(q, k, v, attn_mask=mask, landmark_indices=indices, landmark_refine=steps,
                                      backend=backend)

    inputs = tuple(x[:1, :2].clone().requires_grad_() if x.shape[1] == 4 else x[:1, :1].clone().requires_grad_()
                   for x in (q, k, v))
    mask, indices = mask[:1], indices[:1]
    assert torch.autograd.gradcheck(f, inputs)


def test_zero_steps_is_the_paper():
    q, k, v, mask, indices = _case("self-masked")
    for backend in ("reference", "torch"):
        plain = sx.skyformer_attention(q, k, v, attn_mask=mask, landmark_indices=indices, backend=backend)
        zero = sx.skyformer_attention(q, k, v, attn_mask=mask, landmark_indices=indices, landmark_refine=0,
                                      backend=backend)
        assert torch.equal(plain, zero)


def test_refinement_improves_the_approximation():
    """One step at m landmarks approximates exact kernelized attention better than the paper's seeds (the
    point of the option; measured 0.93 -> 0.64 relative error here, averaged over four draws)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 512, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = sx.kernelized_attention(q, k, v, backend="reference")
    errors = {}
    for steps in (0, 1):
        errors[steps] = sum((sx.skyformer_attention(q, k, v, num_landmarks=16, landmark_refine=steps,
                                                    generator=torch.Generator().manual_seed(s), backend="torch")
                             - exact).norm() / exact.norm() for s in range(4)) / 4
    assert errors[1] < 0.8 * errors[0], errors


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_nan_in_a_valid_row_makes_its_head_nan_and_padding_nan_changes_nothing(backend):
    q, k, v, mask, indices = _case("cross")
    dtype = torch.float32
    q, k, v = (x.to(dtype)[:, :2, :, :8] if x.shape[1] == 4 else x.to(dtype)[:, :1, :, :8] for x in (q, k, v))
    poisoned = q.clone()
    poisoned[0, 1, 4, 0] = float("nan")
    out = sx.skyformer_attention(poisoned, k, v, attn_mask=mask, landmark_indices=indices, landmark_refine=1,
                                 backend=backend, ns_iters=2)
    assert out[0, 1].isnan().all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, 0]).all()


@pytest.mark.parametrize("dtype,case,steps", [(torch.float32, "self-masked", 2), (torch.bfloat16, "cross", 1),
                                              (torch.float16, "keyless-row", 1)])
def test_triton_matches_reference(dtype, case, steps):
    """fp32: close to the float64 truth; fp16/bf16: within 2x the reference's own same-dtype error. The
    NaN-filled buffers catch unwritten elements, and a rerun must be bit-identical."""
    q, k, v, mask, indices = _case(case)
    solve = dict(ns_iters=2)  # the interpreter's cost is the solve's; refinement is the subject here
    truth = _run("reference", q, k, v, mask, indices, steps, **solve)
    low = [x.to(dtype) for x in (q, k, v)]
    actual = _run("triton", *low, mask, indices, steps, **solve)
    if dtype == torch.float32:
        for name, a, t in zip(("out", "dq", "dk", "dv"), actual, truth):
            assert max_error(a, t) <= 2e-5 * max(1.0, t.abs().max().item()), name
        rerun = _run("triton", *low, mask, indices, steps, **solve)
        for name, a, b in zip(("out", "dq", "dk", "dv"), actual, rerun):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
    else:
        baseline = _run("reference", *low, mask, indices, steps, **solve)
        for name, a, t, base in zip(("out", "dq", "dk", "dv"), actual, truth, baseline):
            assert_within_low_precision_rule(a, t, base, name=name, floor=1e-3 * t.abs().max().item())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_landmark_refine_is_refused(bad):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises((TypeError, ValueError), match="landmark_refine"):
        sx.skyformer_attention(q, q, q, num_landmarks=4, landmark_refine=bad)
    with pytest.raises((TypeError, ValueError), match="landmark_refine"):
        sx.nn.SkyformerAttention(8, 2, landmark_refine=bad)


def test_module_passes_landmark_refine():
    module = sx.nn.SkyformerAttention(16, 2, num_landmarks=4, landmark_refine=1, backend="torch").double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    module.eval()
    out = module(x)
    assert "landmark_refine=1" in repr(module)
    module.landmark_refine = 0
    assert not torch.allclose(out, module(x))


def test_tiled_lloyd_step_op_passes_opcheck():
    q, k, _, mask, indices = _case("self-masked")
    k = k.nan_to_num(0.0)
    seeds = _seeds(q, k, indices, mask)
    args = (q.requires_grad_(), k.requires_grad_(), seeds.detach().requires_grad_(), mask)
    torch.library.opcheck(torch.ops.skyformer_ext.lloyd_step_tiled, args)
