"""skyformer_ext.integrations.transformers: Skyformer as a transformers ``attn_implementation``.

Tiny random BERT / RoBERTa / XLM-R configs (no download), float32 on CPU, the tiled PyTorch backend.
"""

import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModel, BertConfig, RobertaConfig, XLMRobertaConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertCrossAttention

import skyformer_ext
import skyformer_ext.integrations.transformers as skyformer_hf

from conftest import max_error

M = 8
NAME = skyformer_hf.register(num_landmarks=M, backend="torch")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99,
            max_position_embeddings=64)


def _config(cls=BertConfig, **overrides):
    return cls(**{**TINY, **overrides})


def _model(attn=NAME, cls=BertConfig, **overrides):
    return AutoModel.from_config(_config(cls, **overrides), attn_implementation=attn).eval()


def _padded_batch(lengths, n, pad_id=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (len(lengths), n), generator=gen)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, pad_id), mask.long()


def test_import_skyformer_ext_does_not_import_transformers():
    code = ("import sys, skyformer_ext, skyformer_ext.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_returns_name_and_validates_options():
    assert skyformer_hf.register("skyformer-test-opts", num_landmarks=4, ridge=0.5) == "skyformer-test-opts"
    assert "skyformer-test-opts" in transformers.AttentionInterface()
    assert skyformer_hf.registered_options("skyformer-test-opts")["num_landmarks"] == 4
    assert skyformer_hf.registered_options(NAME) == {**skyformer_hf.DEFAULT_OPTIONS, "num_landmarks": M,
                                                      "backend": "torch"}
    for bad, error, match in [(dict(num_landmarks=1), ValueError, "num_landmarks"),
                              (dict(num_landmarks="8"), TypeError, "num_landmarks"),
                              (dict(landmarks="kmeans"), ValueError, "landmarks"),
                              (dict(eval_landmarks="best"), ValueError, "eval_landmarks"),
                              (dict(ridge=-1.0), ValueError, "ridge"),
                              (dict(inverse="lu"), ValueError, "inverse"),
                              (dict(ns_iters=0), ValueError, "ns_iters"),
                              (dict(backend="cuda"), ValueError, "backend"),
                              (dict(deterministic=1), TypeError, "deterministic"),
                              (dict(dropout=0.1), TypeError, "unknown Skyformer option")]:
        with pytest.raises(error, match=match):
            skyformer_hf.register("skyformer-test-bad", **bad)
    assert "skyformer-test-bad" not in transformers.AttentionInterface()
    for name in ("sdpa", "eager", "flash_attention_2", "org/kernel", ""):
        with pytest.raises(ValueError, match="name"):
            skyformer_hf.register(name)
    with pytest.raises(TypeError, match="name"):
        skyformer_hf.register(3)


def test_padding_never_reaches_valid_tokens_eval():
    model = _model()
    lengths, n = [20, 13, 6], 20
    ids, mask = _padded_batch(lengths, n)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        junk = model(ids.masked_fill(mask == 0, 42), attention_mask=mask).last_hidden_state
        for row, length in enumerate(lengths):
            alone = model(ids[row:row + 1, :length]).last_hidden_state[0]
            assert max_error(out[row, :length], alone) < 1e-5, row
            # Strided landmarks are chosen among valid rows, so padding changes nothing beyond rounding.
            assert torch.equal(out[row, :length], junk[row, :length]), row


def test_eval_forwards_are_bit_identical():
    model = _model()
    ids, mask = _padded_batch([18, 9], 18)
    with torch.no_grad():
        first = model(ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(123)  # eval landmarks are strided: no random numbers drawn
        second = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(first, second)


def test_training_gradients_finite_and_landmarks_random():
    model = _model(attention_probs_dropout_prob=0.0).train()
    ids, mask = _padded_batch([16, 10], 16)

    def run(seed):
        torch.manual_seed(seed)
        return model(ids, attention_mask=mask)

    out = run(0)
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(run(1).last_hidden_state, run(1).last_hidden_state)
        assert not torch.equal(run(1).last_hidden_state, run(2).last_hidden_state)  # random landmarks


def test_attention_dropout_is_refused_in_training_only():
    model = _model()  # attention_probs_dropout_prob=0.1, BERT's default
    ids, mask = _padded_batch([12, 7], 12)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # eval: BERT passes dropout=0.0
        with pytest.raises(ValueError, match="attention_probs_dropout_prob=0.0"):
            model.train()(ids, attention_mask=mask)


def test_switch_sdpa_skyformer_sdpa():
    model = _model("sdpa")
    ids, mask = _padded_batch([15, 11], 15)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation(NAME)
        assert model.config._attn_implementation == NAME
        skyformer = model(ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("sdpa")
        back = model(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(skyformer).all() and not torch.equal(skyformer, reference)
    assert torch.equal(back, reference)


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.config.skyformer_num_landmarks = 4  # per-model override, saved with the config
    ids, mask = _padded_batch([14, 9], 14)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation=NAME).eval()
    assert loaded.config._attn_implementation == NAME
    assert loaded.config.skyformer_num_landmarks == 4
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, before)


def test_config_overrides():
    model = _model()
    ids, mask = _padded_batch([16, 10], 16)
    with torch.no_grad():
        default = model(ids, attention_mask=mask).last_hidden_state
        model.config.skyformer_num_landmarks = 4
        fewer = model(ids, attention_mask=mask).last_hidden_state
        model.config.skyformer_num_landmarks = 1
        with pytest.raises(ValueError, match="config.skyformer_.*num_landmarks"):
            model(ids, attention_mask=mask)
        model.config.skyformer_num_landmarks = None  # None: the registered value again
        assert torch.equal(model(ids, attention_mask=mask).last_hidden_state, default)
    assert not torch.equal(default, fewer)


def test_causal_use_is_refused():
    decoder = _model(is_decoder=True)
    ids, mask = _padded_batch([10, 10], 10)
    with torch.no_grad(), pytest.raises(ValueError, match="bidirectional"):
        decoder(ids, attention_mask=mask)
    attention = skyformer_hf.AttentionInterface()[NAME]
    module = torch.nn.Module().eval()
    q = torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="bidirectional"):
        attention(module, q, q, q, None, is_causal=True)
    module.is_causal = True
    with pytest.raises(ValueError, match="bidirectional"):
        attention(module, q, q, q, None)


def test_prepared_4d_mask_is_refused():
    model = _model()
    ids, mask = _padded_batch([10, 6], 10)
    mask4d = mask.bool()[:, None, None, :].expand(2, 1, 10, 10)
    with torch.no_grad(), pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=mask4d)


def test_cross_attention():
    """n_q != n_k through the registered function: BERT's cross-attention module, and the mask transformers builds
    for it (a decoder's self-attention is causal, so a whole BERT decoder is refused; see above)."""
    config = _config()
    config._attn_implementation = NAME
    module = BertCrossAttention(config).eval()
    hidden = torch.randn(2, 7, 32)
    encoder = torch.randn(2, 19, 32)
    lengths = torch.tensor([19, 11])
    encoder_mask = (torch.arange(19)[None, :] < lengths[:, None]).long()
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=encoder_mask,
                                     encoder_hidden_states=encoder)
    assert mask.dtype == torch.bool and mask.shape == (2, 19)  # the 2-D key mask, never (7, 19)
    assert create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=torch.ones(2, 19),
                                     encoder_hidden_states=encoder) is None
    with torch.no_grad():
        out, weights = module(hidden, encoder_hidden_states=encoder, attention_mask=mask)
        assert out.shape == (2, 7, 32) and weights is None
        for row in range(2):  # padded encoder states do not matter
            alone, _ = module(hidden[row:row + 1], encoder_hidden_states=encoder[row:row + 1, :lengths[row]])
            assert max_error(out[row], alone[0]) < 1e-5, row

    # The function itself: transformers' layout in and out, equal to skyformer_attention.
    attention = skyformer_hf.AttentionInterface()[NAME]
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)  # GQA too
    out, weights = attention(module, q, k, v, mask[:, :12], scaling=0.3, dropout=0.0)
    want = skyformer_ext.skyformer_attention(q, k, v, attn_mask=mask[:, :12], num_landmarks=M, landmarks="strided",
                                             scale=0.3, backend="torch")
    assert weights is None and out.shape == (2, 5, 4, 8) and out.is_contiguous()
    assert torch.equal(out, want.transpose(1, 2))


@pytest.mark.parametrize("cls", [RobertaConfig, XLMRobertaConfig])
def test_roberta_family(cls):
    model = _model(cls=cls, pad_token_id=1, attention_probs_dropout_prob=0.0)
    ids, mask = _padded_batch([14, 8], 14, pad_id=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[1:, :8]).last_hidden_state[0]
    assert max_error(out[1, :8], alone) < 1e-5
    model.train()
    out = model(ids, attention_mask=mask)
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_compile_matches_eager():
    """fullgraph=True: no graph break (the mask function keeps the 2-D mask under compilation). Eval on dynamo's
    eager backend; training (random landmarks from eager's generator, forward and backward) on aot_eager."""
    model = _model(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    ids, mask = _padded_batch([16, 9], 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        for kwargs in (dict(attention_mask=mask), {}):
            want = model(ids, **kwargs).last_hidden_state
            assert max_error(compiled(ids, **kwargs).last_hidden_state, want) < 1e-5

    def train_step(forward, seed):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        out = forward(ids, attention_mask=mask).last_hidden_state
        out.square().mean().backward()
        return out.detach(), model.encoder.layer[0].attention.self.query.weight.grad.clone()

    model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got, want = train_step(compiled, 5), train_step(model, 5)
    assert max_error(got[0], want[0]) < 1e-5 and max_error(got[1], want[1]) < 1e-5


def test_output_attentions_warns_and_returns_no_weights():
    model = _model()
    ids, mask = _padded_batch([9, 5], 9)
    with torch.no_grad(), pytest.warns(UserWarning, match="no attention-weight matrix"):
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert not out.attentions  # BERT drops the None weights: an empty tuple
