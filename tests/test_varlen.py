"""Packed variable-length sequences (issue 14), backends "torch" and "reference": a packed call equals a loop
of dense calls with the same landmarks (outputs and every gradient), for mixed lengths in one pack with every
edge case (a query or key sequence of length 1, sequences shorter than m, a sequence without keys, empty
sequences), GQA and n_q != n_k; bad inputs raise naming the argument."""

import pytest
import torch

import skyformer_ext as sx
from skyformer_ext import varlen
from conftest import assert_within_low_precision_rule, max_error

# (len_q, len_k) per sequence: cross lengths, length 1, shorter than m, no keys, no queries, empty, long.
LENGTHS = [(5, 3), (1, 1), (0, 4), (300, 260), (7, 0), (0, 0), (2, 9), (140, 140)]
M = 6
# Sequences shorter than m are part of the pack on purpose; the dense calls warn about them once.
pytestmark = pytest.mark.filterwarnings("ignore:.*landmarks repeat:RuntimeWarning")


def _packed(dtype=torch.float64, lengths=LENGTHS, heads=4, kv_heads=2, p=7, p_v=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lq, lk = (torch.tensor([length[i] for length in lengths]) for i in (0, 1))
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), lq.cumsum(0)]).int()
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), lk.cumsum(0)]).int()
    q = torch.randn(int(lq.sum()), heads, p, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(int(lk.sum()), kv_heads, p, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(int(lk.sum()), kv_heads, p_v, generator=gen, dtype=torch.float64).to(dtype)
    indices = varlen.sample_packed_landmarks(cu_q, cu_k, M, "random", torch.rand(len(lengths), M, generator=gen,
                                                                                  dtype=torch.float64))
    return q, k, v, cu_q, cu_k, int(lq.max()), int(lk.max()), indices


def _grads(fn, q, k, v, seed=1):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _dense_loop(fn_name, backend, q, k, v, cu_q, cu_k, indices, **options):
    """The same problem as one dense call per sequence (zeros where a sequence has no keys)."""
    outs = []
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if q1 == q0:
            continue
        if k1 == k0:
            outs.append(0 * q[q0:q1, :, :1].sum(-1, keepdim=True) * v[:0].sum() + q.new_zeros(q1 - q0, q.shape[1],
                                                                                              v.shape[2]))
            continue
        dense = [x.transpose(0, 1)[None] for x in (q[q0:q1], k[k0:k1], v[k0:k1])]
        if fn_name == "skyformer":
            out = sx.skyformer_attention(*dense, landmark_indices=indices[s:s + 1], backend=backend, **options)
        else:
            out = sx.kernelized_attention(*dense, backend=backend, **options)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _packed_call(fn_name, backend, cu_q, cu_k, max_q, max_k, indices, **options):
    def call(q, k, v):
        if fn_name == "skyformer":
            return sx.skyformer_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, landmark_indices=indices,
                                                 backend=backend, **options)
        return sx.kernelized_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, **options)
    return call


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("fn_name", ["skyformer", "kernelized"])
def test_packed_call_equals_a_loop_of_dense_calls_float64(backend, fn_name):
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _packed()
    packed = _grads(_packed_call(fn_name, backend, cu_q, cu_k, max_q, max_k, indices), q, k, v)
    dense = _grads(lambda q, k, v: _dense_loop(fn_name, backend, q, k, v, cu_q, cu_k, indices), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), packed, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=name)
    out, dq, dk, dv = packed
    keyless_rows = slice(int(cu_q[4]), int(cu_q[5]))  # sequence 4 has queries and no key: zeros
    assert torch.equal(out[keyless_rows], torch.zeros_like(out[keyless_rows]))
    assert torch.equal(dq[keyless_rows], torch.zeros_like(dq[keyless_rows]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn_name", ["skyformer", "kernelized"])
def test_torch_packed_low_precision_against_float64(dtype, fn_name):
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _packed()
    low = [x.to(dtype) for x in (q, k, v)]
    truth = _grads(_packed_call(fn_name, "reference", cu_q, cu_k, max_q, max_k, indices), *[x.double() for x in low])
    got = _grads(_packed_call(fn_name, "torch", cu_q, cu_k, max_q, max_k, indices), *low)
    if dtype == torch.float32:
        for name, a, t in zip(("out", "dq", "dk", "dv"), got, truth):
            assert max_error(a, t) <= 1e-5 * max(1.0, t.abs().max().item()), name
        return
    baseline = _grads(_packed_call(fn_name, "reference", cu_q, cu_k, max_q, max_k, indices), *low)
    for name, a, t, base in zip(("out", "dq", "dk", "dv"), got, truth, baseline):
        assert a.dtype == dtype
        assert_within_low_precision_rule(a, t, base, name=name, floor=torch.finfo(dtype).eps * t.abs().max().item())


def test_sampled_landmarks_follow_the_dense_rule_per_sequence():
    """Random and strided landmarks of a pack are the dense sampler's, sequence by sequence."""
    lengths_q, lengths_k = torch.tensor([5, 0, 30, 1]), torch.tensor([3, 4, 26, 2])
    cu_q, cu_k = (torch.cat([torch.zeros(1, dtype=torch.int64), x.cumsum(0)]).int() for x in (lengths_q, lengths_k))
    draws = torch.rand(4, 8, dtype=torch.float64)
    packed = varlen.sample_packed_landmarks(cu_q, cu_k, 8, "random", draws)
    strided = varlen.sample_packed_landmarks(cu_q, cu_k, 8, "strided", None)
    for s in range(4):
        n_q, n_k = int(lengths_q[s]), int(lengths_k[s])
        # The dense sampler with the same draws (a generator that replays them is not available: map directly).
        dense_strided = sx.sample_landmarks(1, n_q, n_k, 8, strategy="strided")
        assert torch.equal(strided[s], dense_strided[0])
        m_q = 4 if n_q else 0
        expected = [min(int(u * n_q), n_q - 1) if j < m_q else n_q + min(int(u * n_k), n_k - 1)
                    for j, u in enumerate(draws[s].tolist())]
        assert packed[s].tolist() == expected


def test_random_landmarks_are_reproducible_with_a_generator():
    q, k, v, cu_q, cu_k, max_q, max_k, _ = _packed(torch.float32)

    def call(seed):
        return sx.skyformer_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, num_landmarks=M,
                                             generator=torch.Generator().manual_seed(seed))
    assert torch.equal(call(3), call(3)) and not torch.equal(call(3), call(4))
    strided = sx.skyformer_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, num_landmarks=M, landmarks="strided")
    assert torch.isfinite(strided).all()


def test_no_python_loop_over_sequences(monkeypatch):
    """The torch backend's stage calls depend on the packed tokens, not on the number of sequences."""
    from skyformer_ext import torch_backend

    calls = []
    real = torch_backend.gaussian_attention
    monkeypatch.setattr(torch_backend, "gaussian_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    counts = []
    for lengths in ([(400, 400)] * 2, [(20, 20)] * 40):
        q, k, v, cu_q, cu_k, max_q, max_k, indices = _packed(torch.float32, lengths=lengths)
        calls.clear()
        sx.skyformer_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, landmark_indices=indices)
        counts.append(len(calls))
    assert counts[0] == counts[1] == 2, counts


def _bad(**changes):
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _packed(torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    args.update(changes)
    return args


def _decreasing(cu):
    out = cu.clone()
    out[2] = out[1] - 1
    return out


def _shifted(cu, delta):
    out = cu.clone()
    out[-1] += delta
    return out


@pytest.mark.parametrize("changes,error,match", [
    (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q"),
    (lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"].float()), TypeError, "cu_seqlens_k"),
    (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].to("meta")), ValueError, "cu_seqlens_q"),
    (lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"] + 1), ValueError, "cu_seqlens_q must start at 0"),
    (lambda a: dict(cu_seqlens_k=_decreasing(a["cu_seqlens_k"])), ValueError, "cu_seqlens_k must be non-decreasing"),
    (lambda a: dict(cu_seqlens_q=_shifted(a["cu_seqlens_q"], -1)), ValueError, "cu_seqlens_q must end"),
    (lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][:-1]), ValueError, "same number of sequences"),
    (lambda a: dict(max_seqlen_q=10), ValueError, "max_seqlen_q"),
    (lambda a: dict(max_seqlen_k=2.5), TypeError, "max_seqlen_k"),
    (lambda a: dict(q=a["q"][None]), ValueError, "q must have shape"),
])
def test_bad_packed_inputs_are_refused(changes, error, match):
    args = _bad()
    args.update(changes(args))
    for fn in (sx.skyformer_attention_varlen, sx.kernelized_attention_varlen):
        with pytest.raises(error, match=match):
            fn(**args)


def test_bad_landmark_indices_and_backends_are_refused():
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _packed(torch.float32)
    call = lambda **kw: sx.skyformer_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw)  # noqa: E731
    outside = indices.clone()
    outside[0, 0] = 8  # sequence 0 has 5 queries + 3 keys: rows 0..7
    with pytest.raises(ValueError, match="landmark_indices of sequence 0"):
        call(landmark_indices=outside)
    with pytest.raises(ValueError, match="landmark_indices"):
        call(landmark_indices=indices[:3])
    with pytest.raises(TypeError, match="backend='triton'"):
        sx.skyformer_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, max_q, max_k, backend="triton")
    with pytest.raises(ValueError, match="landmark_refine"):
        call(landmark_refine=-1)


@pytest.mark.parametrize("steps", [1, 2])
def test_landmark_refinement_per_sequence_matches_the_reference(steps):
    """Lloyd steps over each sequence's own rows (torch: tiles of the tile table) equal the reference's loop
    of dense refinements, outputs and every gradient."""
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _packed()
    expected = _grads(_packed_call("skyformer", "reference", cu_q, cu_k, max_q, max_k, indices,
                                   landmark_refine=steps), q, k, v)
    actual = _grads(_packed_call("skyformer", "torch", cu_q, cu_k, max_q, max_k, indices, landmark_refine=steps),
                    q, k, v)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11, msg=name)


def test_packed_lloyd_step_op_passes_opcheck():
    q, k, _, cu_q, cu_k, _, _, indices = _packed(lengths=[(5, 3), (0, 4), (7, 0), (20, 17)])
    seeds = varlen.gather_packed_landmarks(q, k, cu_q, cu_k, indices)
    torch.library.opcheck(torch.ops.skyformer_ext.lloyd_step_packed,
                          (q.requires_grad_(), k.requires_grad_(), seeds.detach().requires_grad_(), cu_q, cu_k))


@pytest.mark.parametrize("attention", ["skyformer", "kernelized", "softmax"])
def test_module_takes_packed_input_equal_to_padded_calls(attention):
    """nn.SkyformerAttention(x packed, cu_seqlens=..., max_seqlen=...) equals the module on each sequence
    alone (eval mode: strided landmarks, the same per sequence), forward and backward."""
    torch.manual_seed(0)
    module = sx.nn.SkyformerAttention(16, 4, num_kv_heads=2, num_landmarks=4, attention=attention).double().eval()
    lengths = [5, 1, 30, 9]
    x = torch.randn(sum(lengths), 16, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 36, 45], dtype=torch.int32)
    packed = module(x, cu_seqlens=cu, max_seqlen=30)
    pieces = [module(x[int(cu[s]):int(cu[s + 1])][None])[0] for s in range(len(lengths))]
    torch.testing.assert_close(packed, torch.cat(pieces), rtol=1e-10, atol=1e-12)
    grad_packed, = torch.autograd.grad(packed.square().sum(), x)
    grad_loop, = torch.autograd.grad(torch.cat(pieces).square().sum(), x)
    torch.testing.assert_close(grad_packed, grad_loop, rtol=1e-10, atol=1e-12)


def test_module_packed_cross_attention_and_refusals():
    module = sx.nn.SkyformerAttention(16, 2, num_landmarks=4, context_dim=8, backend="torch").double().eval()
    x, context = torch.randn(7, 16, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
    out = module(x, context, cu_seqlens=cu_q, max_seqlen=4, cu_seqlens_k=cu_k, max_seqlen_k=5)
    first = module(x[None, :3], context[None, :4])[0]
    torch.testing.assert_close(out[:3], first, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        module(x, context, cu_seqlens=cu_q, max_seqlen=4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(x, cu_seqlens=cu_q, max_seqlen=4, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seqlen"):
        module(x, cu_seqlens=cu_q)


# ---- backend="triton" (Triton's interpreter here): the dense kernels, addressed by sequence --------------------

# Every edge case of LENGTHS at sizes the interpreter runs quickly; 37 and 29 rows span several tiles and splits.
TRITON_LENGTHS = [(5, 3), (1, 1), (0, 4), (37, 29), (7, 0), (0, 0), (2, 9)]


def _triton_pack(dtype=torch.float32):
    return _packed(dtype, TRITON_LENGTHS, heads=2, kv_heads=1, p=20, p_v=12)


@pytest.mark.parametrize("fn_name,options", [
    ("skyformer", dict(ns_iters=2)),
    ("skyformer", dict(inverse="cholesky", deterministic=False)),
    ("skyformer", dict(ns_iters=2, landmark_refine=2)),
    ("kernelized", dict()),
    ("kernelized", dict(deterministic=False)),
], ids=["skyformer", "skyformer-cholesky-atomic", "skyformer-refine2", "kernelized", "kernelized-atomic"])
def test_triton_packed_call_equals_dense_triton_calls_and_the_reference(fn_name, options, nan_poisoned_empty):
    """Outputs and every gradient of one packed launch set equal the loop of dense triton calls and the float64
    reference; buffers start as NaN, so an element no program writes fails."""
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _triton_pack()
    packed = _grads(_packed_call(fn_name, "triton", cu_q, cu_k, max_q, max_k, indices, **options), q, k, v)
    dense = _grads(lambda q, k, v: _dense_loop(fn_name, "triton", q, k, v, cu_q, cu_k, indices, **options), q, k, v)
    truth = _grads(_packed_call(fn_name, "reference", cu_q, cu_k, max_q, max_k, indices,
                                **{key: value for key, value in options.items() if key != "deterministic"}),
                   *(x.double() for x in (q, k, v)))
    for name, a, d, t in zip(("out", "dq", "dk", "dv"), packed, dense, truth):
        bound = 1e-5 * max(1.0, t.abs().max().item())
        assert a.dtype == torch.float32 and max_error(a, d) <= bound and max_error(a, t) <= bound, name
    keyless_rows = slice(int(cu_q[4]), int(cu_q[5]))  # sequence 4 has queries and no key: zeros
    assert torch.equal(packed[0][keyless_rows], torch.zeros_like(packed[0][keyless_rows]))


# float16 runs the same kernels as bfloat16 (the interpreter's time is the cost): the slow profile.
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", ["skyformer", "skyformer-refine", "kernelized"])
def test_triton_packed_low_precision_within_twice_the_torch_path_error(dtype, variant):
    q, k, v, cu_q, cu_k, max_q, max_k, indices = _triton_pack()
    low = [x.to(dtype) for x in (q, k, v)]
    fn_name = variant.split("-")[0]
    options = {"skyformer": dict(ns_iters=2), "skyformer-refine": dict(ns_iters=2, landmark_refine=1)}.get(variant, {})
    truth = _grads(_packed_call(fn_name, "reference", cu_q, cu_k, max_q, max_k, indices, **options),
                   *(x.double() for x in low))
    got = _grads(_packed_call(fn_name, "triton", cu_q, cu_k, max_q, max_k, indices, **options), *low)
    baseline = _grads(_packed_call(fn_name, "torch", cu_q, cu_k, max_q, max_k, indices, **options), *low)
    for name, a, t, base in zip(("out", "dq", "dk", "dv"), got, truth, baseline):
        assert a.dtype == dtype
        assert_within_low_precision_rule(a, t, base, name=name, floor=torch.finfo(dtype).eps * t.abs().max().item())


@pytest.mark.parametrize("landmarks", ["random", "strided"])
def test_triton_samples_packed_landmarks_by_the_torch_rule(landmarks):
    """The landmark kernel draws each sequence's landmarks from the same uniform draws by the same rule as
    sample_packed_landmarks (torch backend), also when max_seqlen overstates the longest sequence."""
    q, k, v, cu_q, cu_k, max_q, max_k, _ = _triton_pack()

    def call(backend, extra):
        return sx.skyformer_attention_varlen(q, k, v, cu_q, cu_k, max_q + extra, max_k + extra, num_landmarks=M,
                                             landmarks=landmarks, ns_iters=2, backend=backend,
                                             generator=torch.Generator().manual_seed(5))
    expected = call("torch", 0)
    for extra in (0, 40):
        assert max_error(call("triton", extra), expected) <= 1e-5 * max(1.0, expected.abs().max().item()), extra


# ---- fuzzed: any pack of sequences equals the loop of dense reference calls ---------------------------------

from hypothesis import given, strategies as st  # noqa: E402

from test_fuzz import fuzz_settings  # noqa: E402  (the suite's profiles: derandomized in CI)


@st.composite
def packs(draw):
    num_seqs = draw(st.integers(1, 5))
    lengths = [(draw(st.integers(0, 30)), draw(st.integers(0, 30))) for _ in range(num_seqs)]
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 2))
    p, p_v = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from((torch.float64, torch.float32)))
    q, k, v, cu_q, cu_k, max_q, max_k, _ = _packed(dtype, lengths, heads, kv_heads, p, p_v,
                                                   seed=draw(st.integers(0, 2**31)))
    m = draw(st.integers(2, 40))
    options = dict(num_landmarks=m, landmarks=draw(st.sampled_from(("random", "strided"))),
                   landmark_refine=draw(st.integers(0, 2)), inverse=draw(st.sampled_from(("newton_schulz",
                                                                                          "cholesky"))),
                   ridge=draw(st.floats(0.05, 1.0)), ns_iters=draw(st.integers(1, 6)))
    return q, k, v, cu_q, cu_k, max_q, max_k, options, draw(st.integers(0, 2**31))


@fuzz_settings(ci_examples=40)
@given(packs())
def test_fuzzed_packs_match_the_reference(pack):
    q, k, v, cu_q, cu_k, max_q, max_k, options, seed = pack
    draws = torch.rand(len(cu_q) - 1, options["num_landmarks"], generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    indices = varlen.sample_packed_landmarks(cu_q, cu_k, options.pop("num_landmarks"),
                                             options.pop("landmarks"), draws)
    truth = _grads(_packed_call("skyformer", "reference", cu_q, cu_k, max_q, max_k, indices, **options),
                   *(x.double() for x in (q, k, v)))
    got = _grads(_packed_call("skyformer", "torch", cu_q, cu_k, max_q, max_k, indices, **options), q, k, v)
    tolerance = 1e-9 if q.dtype == torch.float64 else 1e-4
    for name, a, t in zip(("out", "dq", "dk", "dv"), got, truth):
        assert a.dtype == q.dtype, name
        magnitude = t.abs().max().item() if t.numel() else 0.0
        assert max_error(a, t) <= tolerance * max(1.0, magnitude), name
