"""skyformer_ext.nn.SkyformerAttention against hand-written float64 compositions of the reference kernels."""

import pytest
import torch
import torch.nn.functional as F

import skyformer_ext as sk
from skyformer_ext.nn import ATTENTIONS, SkyformerAttention

from conftest import max_error


def _softmax_truth(q, k, v, keep, scale):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _truth(module, x, context, pad, landmark_indices):
    """The module's forward written out with F.linear and skyformer_ext.reference (batch_first inputs)."""
    source = x if context is None else context
    heads, kv_heads, d = module.num_heads, module.num_kv_heads, module.head_dim

    def split(t, h):
        return t.unflatten(-1, (h, d)).transpose(1, 2)

    q = split(F.linear(x, module.q_proj.weight, module.q_proj.bias), heads)
    k = split(F.linear(source, module.k_proj.weight, module.k_proj.bias), kv_heads)
    v = split(F.linear(source, module.v_proj.weight, module.v_proj.bias), kv_heads)
    keep = None if pad is None else ~pad
    scale = d ** -0.5 if module.scale is None else module.scale
    if module.attention == "skyformer":
        out = sk.reference.skyformer_attention(q, k, v, landmark_indices, attn_mask=keep, ridge=module.ridge,
                                               inverse=module.inverse, ns_iters=module.ns_iters, scale=scale)
    elif module.attention == "kernelized":
        out = sk.reference.kernelized_attention(q, k, v, attn_mask=keep, scale=scale)
    else:
        out = _softmax_truth(q, k, v, keep, scale)
    return F.linear(out.transpose(1, 2).flatten(2), module.out_proj.weight, module.out_proj.bias)


def _padding(batch, n, lengths):
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


CASES = [  # (num_heads, num_kv_heads, n_q, n_k, cross, masked)
    (2, 2, 37, 37, False, True),
    (4, 2, 29, 41, True, True),   # GQA, cross-attention, n_q != n_k
    (3, 1, 23, 23, False, False),  # MQA, no mask
]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("heads,kv_heads,n_q,n_k,cross,masked", CASES)
def test_forward_and_grads_match_reference(attention, heads, kv_heads, n_q, n_k, cross, masked):
    embed, context_dim, batch = 40, 24, 3
    module = SkyformerAttention(embed, heads, num_kv_heads=kv_heads, head_dim=10, attention=attention,
                                num_landmarks=12, context_dim=context_dim if cross else None,
                                dtype=torch.float64)
    x = torch.randn(batch, n_q, embed, dtype=torch.float64)
    context = torch.randn(batch, n_k, context_dim, dtype=torch.float64) if cross else None
    pad = _padding(batch, n_k, [n_k, n_k - 7, 5]) if masked else None
    keep = None if pad is None else ~pad
    indices = sk.sample_landmarks(batch, n_q, n_k, 12, attn_mask=keep)

    out = module(x, context, key_padding_mask=pad, landmark_indices=indices)
    truth = _truth(module, x, context, pad, indices)
    assert out.shape == (batch, n_q, embed)
    assert max_error(out, truth) < 1e-10

    grad_out = torch.randn_like(out)
    params = list(module.parameters())
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(truth, params, grad_out)
    for (name, _), g, w in zip(module.named_parameters(), got, want):
        assert max_error(g, w) < 1e-9 * max(1.0, w.abs().max().item()), name


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_batch_first_false_is_the_transpose(attention):
    kwargs = dict(attention=attention, num_landmarks=8, dtype=torch.float64)
    first = SkyformerAttention(32, 4, **kwargs).eval()
    second = SkyformerAttention(32, 4, batch_first=False, **kwargs).eval()
    second.load_state_dict(first.state_dict())
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    pad = _padding(2, 19, [19, 11])
    expected = first(x, key_padding_mask=pad)
    actual = second(x.transpose(0, 1), key_padding_mask=pad).transpose(0, 1)
    assert max_error(actual, expected) < 1e-12


def test_state_dict_is_identical_across_attentions():
    modules = {a: SkyformerAttention(48, 4, num_kv_heads=2, attention=a) for a in ATTENTIONS}
    shapes = {a: {k: tuple(t.shape) for k, t in m.state_dict().items()} for a, m in modules.items()}
    assert shapes["skyformer"] == shapes["kernelized"] == shapes["softmax"]
    assert set(shapes["softmax"]) == {f"{p}_proj.{w}" for p in "qkvo" if p != "o" for w in ("weight", "bias")} | {
        "out_proj.weight", "out_proj.bias"}
    # A checkpoint trained with one kernel loads into another, strictly, and switching a live module works.
    modules["kernelized"].load_state_dict(modules["softmax"].state_dict(), strict=True)
    x = torch.randn(2, 9, 48)
    live = modules["softmax"].eval()
    reference_out = live(x)
    live.attention = "kernelized"
    assert torch.equal(live(x), modules["kernelized"].eval()(x))
    live.attention = "softmax"
    assert torch.equal(live(x), reference_out)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padded_keys_do_not_matter(attention):
    module = SkyformerAttention(32, 2, attention=attention, num_landmarks=10, dtype=torch.float64).eval()
    x = torch.randn(3, 25, 32, dtype=torch.float64)
    pad = _padding(3, 25, [25, 14, 0])  # last row: every key padded
    out = module(x, key_padding_mask=pad)
    changed = x.clone()
    changed[pad] = torch.randn(int(pad.sum()), 32, dtype=torch.float64) * 100
    out_changed = module(changed, key_padding_mask=pad)
    valid_queries = ~pad
    assert max_error(out[valid_queries], out_changed[valid_queries]) < 1e-10
    # A row without any valid key returns zeros before the output projection, i.e. its bias.
    assert max_error(out[2], module.out_proj.bias.expand(25, 32)) < 1e-12


def test_eval_landmark_policy():
    torch.manual_seed(1)
    x = torch.randn(2, 64, 32)
    strided = SkyformerAttention(32, 2, num_landmarks=8).eval()
    assert torch.equal(strided(x), strided(x))  # deterministic inference

    randomized = SkyformerAttention(32, 2, num_landmarks=8, eval_landmarks="random").eval()
    randomized.load_state_dict(strided.state_dict())
    assert not torch.equal(randomized(x), randomized(x))  # the paper's sampling at test time
    seeded = [randomized(x, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*seeded)

    # Training mode samples randomly whatever eval_landmarks says; strided eval differs from it.
    strided.train()
    assert not torch.equal(strided(x), strided(x))
    expected = strided(x, landmark_indices=sk.sample_landmarks(2, 64, 64, 8, strategy="strided"))
    assert torch.equal(strided.eval()(x), expected)


def test_dropout_acts_on_the_attention_output_in_training_only():
    module = SkyformerAttention(32, 2, attention="softmax", dropout=0.5)
    x = torch.randn(2, 16, 32)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    torch.manual_seed(5)
    dropped = module(x)
    torch.manual_seed(5)
    heads_out = F.scaled_dot_product_attention(*(module._heads(p(x), 2) for p in (
        module.q_proj, module.k_proj, module.v_proj)))
    expected = module.out_proj(F.dropout(heads_out, 0.5, True).transpose(1, 2).flatten(2))
    assert max_error(dropped, expected) < 1e-6
    assert max_error(dropped, module.eval()(x)) > 1e-3


def test_extra_repr():
    text = repr(SkyformerAttention(64, 4, num_kv_heads=2, num_landmarks=32))
    for piece in ("embed_dim=64", "num_heads=4", "num_kv_heads=2", "head_dim=16", "attention='skyformer'",
                  "num_landmarks=32", "eval_landmarks='strided'", "batch_first=True"):
        assert piece in text
    assert "num_landmarks" not in repr(SkyformerAttention(64, 4, attention="softmax"))


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(attention="linear"), ValueError, "attention"),
    (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(num_heads=5), ValueError, "divisible"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(num_landmarks=1), ValueError, "num_landmarks"),
    (dict(eval_landmarks="fixed"), ValueError, "eval_landmarks"),
    (dict(inverse="lu"), ValueError, "inverse"),
    (dict(deterministic=0), TypeError, "deterministic"),
    (dict(backend="bogus"), ValueError, "backend"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(ridge=float("nan")), ValueError, "ridge"),
])
def test_constructor_errors(kwargs, error, word):
    args = dict(embed_dim=32, num_heads=4) | kwargs
    with pytest.raises(error, match=word):
        SkyformerAttention(args.pop("embed_dim"), args.pop("num_heads"), **args)


@pytest.mark.parametrize("attention", ["skyformer", "kernelized"])
def test_deterministic_reaches_the_functional_call(attention, monkeypatch):
    import skyformer_ext.nn as module

    seen = {}
    real = getattr(module, f"{attention}_attention")

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, f"{attention}_attention", recording)
    layer = SkyformerAttention(32, 4, attention=attention, num_landmarks=8, deterministic=False)
    layer(torch.randn(2, 11, 32))
    assert seen["deterministic"] is False


def test_forward_errors():
    module = SkyformerAttention(32, 4)
    x = torch.randn(2, 10, 32)
    with pytest.raises(TypeError, match="key_padding_mask"):
        module(x, torch.zeros(2, 10, dtype=torch.bool))  # positional mask
    with pytest.raises(TypeError, match="key_padding_mask"):
        module(x, key_padding_mask=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(x, key_padding_mask=torch.zeros(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must"):
        module(torch.randn(2, 10, 31))
    with pytest.raises(ValueError, match="context"):
        module(x, torch.randn(2, 10, 16))
    with pytest.raises(ValueError, match="batch"):
        module(x, torch.randn(3, 10, 32))
    with pytest.raises(ValueError, match="attention"):
        module.attention = "performer"
