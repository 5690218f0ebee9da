"""Public API contract: bad input raises a clear error naming the argument; documented edge behaviour."""

import pytest
import torch

import skyformer_ext as sx

B, H, HK, NQ, NK, P = 2, 4, 2, 9, 11, 8


def inputs(dtype=torch.float32):
    return (torch.randn(B, H, NQ, P, dtype=dtype), torch.randn(B, HK, NK, P, dtype=dtype),
            torch.randn(B, HK, NK, 5, dtype=dtype))


BAD_CALLS = [
    # (description, override of (q, k, v) or kwargs, exception, text the message must contain)
    ("rank", dict(q=torch.randn(H, NQ, P)), ValueError, "q must have shape"),
    ("batch mismatch", dict(k=torch.randn(B + 1, HK, NK, P)), ValueError, "batch"),
    ("head dim mismatch", dict(k=torch.randn(B, HK, NK, P + 1)), ValueError, "head_dim"),
    ("kv heads differ", dict(v=torch.randn(B, HK + 1, NK, 5)), ValueError, "heads"),
    ("heads % kv_heads", dict(k=torch.randn(B, 3, NK, P), v=torch.randn(B, 3, NK, 5)), ValueError, "multiple"),
    ("seq mismatch", dict(v=torch.randn(B, HK, NK + 1, 5)), ValueError, "sequence length"),
    ("dtype mismatch", dict(k=torch.randn(B, HK, NK, P, dtype=torch.float64)), TypeError, "k.dtype"),
    ("int dtype", dict(q=torch.ones(B, H, NQ, P, dtype=torch.int32)), TypeError, "q must be float"),
    ("not a tensor", dict(v=[1.0]), TypeError, "v must be a torch.Tensor"),
    ("mask shape", dict(attn_mask=torch.ones(B, NK + 1, dtype=torch.bool)), ValueError, "attn_mask must have shape"),
    ("mask dtype", dict(attn_mask=torch.ones(B, NK)), TypeError, "attn_mask must have dtype torch.bool"),
    ("num_landmarks < 2", dict(num_landmarks=1), ValueError, "num_landmarks"),
    ("num_landmarks float", dict(num_landmarks=8.0), TypeError, "num_landmarks"),
    ("ridge < 0", dict(ridge=-0.1), ValueError, "ridge"),
    ("ridge nan", dict(ridge=float("nan")), ValueError, "ridge"),
    ("ns_iters < 1", dict(ns_iters=0), ValueError, "ns_iters"),
    ("strategy", dict(landmarks="kmeans"), ValueError, "landmarks"),
    ("inverse", dict(inverse="svd"), ValueError, "inverse"),
    ("backend", dict(backend="cuda"), ValueError, "backend"),
    ("scale <= 0", dict(scale=0.0), ValueError, "scale"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale"),
    ("ridge inf", dict(ridge=float("inf")), ValueError, "ridge"),
    ("indices range", dict(landmark_indices=torch.full((B, 4), NQ + NK)), ValueError, "landmark_indices must lie"),
    ("indices negative", dict(landmark_indices=torch.full((B, 4), -1)), ValueError, "landmark_indices must lie"),
    ("indices shape", dict(landmark_indices=torch.zeros(B + 1, 4, dtype=torch.long)), ValueError,
     "landmark_indices must have shape"),
    ("indices one", dict(landmark_indices=torch.zeros(B, 1, dtype=torch.long)), ValueError, "at least 2"),
    ("indices dtype", dict(landmark_indices=torch.zeros(B, 4)), TypeError, "landmark_indices must have dtype"),
    ("generator type", dict(generator=7), TypeError, "generator"),
]


@pytest.mark.parametrize("what,override,exc,text", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_skyformer_rejects_bad_input(what, override, exc, text):
    q, k, v = inputs()
    tensors = dict(q=q, k=k, v=v)
    kwargs = dict(num_landmarks=4)
    for key, value in override.items():
        (tensors if key in tensors else kwargs)[key] = value
    with pytest.raises(exc, match=text):
        sx.skyformer_attention(tensors["q"], tensors["k"], tensors["v"], **kwargs)


@pytest.mark.parametrize("what,override,exc,text",
                         [c for c in BAD_CALLS if set(c[1]) <= {"q", "k", "v", "attn_mask", "scale", "backend"}])
def test_kernelized_rejects_bad_input(what, override, exc, text):
    q, k, v = inputs()
    tensors = dict(q=q, k=k, v=v)
    kwargs = {}
    for key, value in override.items():
        (tensors if key in tensors else kwargs)[key] = value
    with pytest.raises(exc, match=text):
        sx.kernelized_attention(tensors["q"], tensors["k"], tensors["v"], **kwargs)


def test_sample_landmarks_rejects_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        sx.sample_landmarks(1, 4, 4, 4, strategy="uniform")
    with pytest.raises(ValueError, match="num_landmarks"):
        sx.sample_landmarks(1, 4, 4, 1)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        sx.sample_landmarks(2, 4, 4, 4, attn_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="generator"):
        sx.sample_landmarks(1, 4, 4, 4, generator="seed")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_all_keys_masked_row_gives_zeros(backend):
    q, k, v = inputs()
    mask = torch.ones(B, NK, dtype=torch.bool)
    mask[1] = False
    out = sx.skyformer_attention(q, k, v, attn_mask=mask, num_landmarks=6, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0 and torch.isfinite(out).all()
    ka = sx.kernelized_attention(q, k, v, attn_mask=mask, backend=backend)
    assert torch.equal(ka[1], torch.zeros_like(ka[1])) and ka[0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_input_gives_nan_output_without_crash(backend):
    q, k, v = inputs()
    q[0, 0, 3] = float("nan")
    out = sx.skyformer_attention(q, k, v, num_landmarks=6, backend=backend,
                                 landmark_indices=torch.tensor([[0, 1, NQ, NQ + 1]] * B))
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[1]).all()
    ka = sx.kernelized_attention(q, k, v, backend=backend)
    assert torch.isnan(ka[0, 0, 3]).all() and torch.isfinite(ka[1]).all()


def test_more_landmarks_than_valid_rows_samples_with_replacement():
    q, k, v = inputs(torch.float64)
    mask = torch.zeros(B, NK, dtype=torch.bool)
    mask[:, :3] = True
    idx = sx.sample_landmarks(B, NQ, NK, 64, attn_mask=mask)
    assert ((idx >= NQ) & (idx < NQ + 3) | (idx < NQ)).all()
    out = sx.skyformer_attention(q, k, v, attn_mask=mask, landmark_indices=idx, backend="torch")
    ref = sx.skyformer_attention(q, k, v, attn_mask=mask, landmark_indices=idx, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_output_shape_and_dtype_follow_q():
    q, k, v = inputs(torch.bfloat16)
    out = sx.skyformer_attention(q, k, v, num_landmarks=4)
    assert out.shape == (B, H, NQ, 5) and out.dtype == torch.bfloat16
    assert sx.kernelized_attention(q, k, v).shape == (B, H, NQ, 5)


def test_device_mismatch_is_rejected():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="k is on meta"):
        sx.skyformer_attention(q, k.to("meta"), v, num_landmarks=4)
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        sx.kernelized_attention(q, k, v, attn_mask=torch.ones(B, NK, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("inverse", ["newton_schulz", "cholesky"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_in_a_landmark_row_gives_nan_for_that_batch_row_only(inverse, backend):
    q, k, v = inputs()
    k[0, 1, 2] = float("nan")  # key row 2 of batch 0, kv-head 1, is a landmark below
    idx = torch.tensor([[0, 1, NQ + 2, NQ + 3]] * B)
    out = sx.skyformer_attention(q, k, v, landmark_indices=idx, inverse=inverse, backend=backend)
    assert torch.isnan(out[0, 2:]).all()  # q-heads 2, 3 share kv-head 1
    assert torch.isfinite(out[1]).all()
