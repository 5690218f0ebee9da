"""Skyformer as a Hugging Face transformers attention implementation (``attn_implementation="skyformer"``).

Needs the ``transformers`` extra (``pip install 'skyformer-ext[transformers]'``; tested with transformers 5.23).
``import skyformer_ext`` never imports transformers; importing this module does.

    import skyformer_ext.integrations.transformers as skyformer_hf
    from transformers import AutoModel

    skyformer_hf.register()                    # registers "skyformer" (default options), returns the name
    model = AutoModel.from_pretrained("bert-base-uncased", attn_implementation="skyformer")
    model.set_attn_implementation("sdpa")      # back to exact softmax attention, and "skyformer" again
    skyformer_hf.register("skyformer-m32", num_landmarks=32)   # several option sets under several names

What ``register(name, **options)`` installs, under ``name``:

- ``transformers.AttentionInterface``: an attention function with the signature transformers calls,
  ``f(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs)``, query
  (batch, heads, n_q, p) and key, value (batch, kv_heads, n_k, p). It runs
  :func:`skyformer_ext.skyformer_attention` and returns ``(output (batch, n_q, heads, p) contiguous, None)``,
  as transformers' ``sdpa_attention_forward`` does: Skyformer forms no attention-weight matrix, so
  ``output_attentions=True`` returns no weights for its layers (with a warning; BERT then reports an empty
  tuple).
- ``transformers.masking_utils.AttentionMaskInterface``: a mask function that hands the attention function
  the 2-D key-padding mask (batch, n_k) bool, True = key takes part, or None when nothing is padded. No
  (n_q, n_k) mask is ever built. Padded keys never reach valid tokens (landmarks are drawn among valid rows
  and padded keys are left out of the key summary). Without this mask function transformers would pass no
  mask at all to a registered attention function, so both are always registered together.

Options (validated by ``register``: TypeError for a wrong type or an unknown option, ValueError for a wrong
value):

    num_landmarks   m, the number of landmarks (default 128, >= 2)
    landmarks       strategy in training mode: "random" (default, the paper) or "strided"
    eval_landmarks  strategy in eval mode: "strided" (default: deterministic, no RNG, repeated eval forwards
                    are bit-identical) or "random"
    ridge           0.1; inverse "newton_schulz" (or "cholesky"); ns_iters 6
    backend         "auto" (default: the fused Triton kernels on CUDA, the tiled PyTorch path on CPU),
                    "triton", "torch" or "reference"
    deterministic   True (default); landmark_refine 0 (Lloyd steps, see the README)

Per-model overrides: any option can be set on a model's config as ``skyformer_<option>`` (for example
``config.skyformer_num_landmarks = 64``, or ``AutoModel.from_pretrained(..., skyformer_num_landmarks=64)``);
a value that is not None wins over the registered one for the attention modules whose ``module.config`` is
that config. The attributes are saved with the config by ``save_pretrained``. They are validated at the
forward that reads them.

Scope and refusals (each a ValueError with the reason):

- Bidirectional attention only: encoder self-attention (BERT, RoBERTa, XLM-R, ...) and cross-attention
  (n_q may differ from n_k; the mask then covers the keys). A causal module (``module.is_causal`` or
  ``is_causal=True`` passed by the model) or a causal / custom mask pattern (a decoder config,
  ``is_decoder=True``) is refused: Skyformer has no causal form.
- Attention dropout: Skyformer forms no attention-weight matrix to drop from, so a non-zero ``dropout`` in
  training mode is refused. BERT-family models pass ``config.attention_probs_dropout_prob`` (0.1 by default)
  in training and 0.0 in eval: set ``attention_probs_dropout_prob=0.0`` (other models:
  ``attention_dropout=0.0``) to train or fine-tune with Skyformer. Eval and inference need nothing.
- A ready-made 4-D mask (batch, 1, n_q, n_k), float additive 2-D masks, packed sequences (``cu_seq_lens_*``)
  and ``softcap`` / ``sliding_window`` / ``position_bias`` / ``s_aux`` arguments are refused rather than
  silently ignored.

``torch.compile`` works on models using it (under compilation the mask function keeps the 2-D mask even
when nothing is padded, as reading the mask's values would break the graph).
"""

from __future__ import annotations

import re
import warnings

import torch

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ModuleNotFoundError("skyformer_ext.integrations.transformers needs transformers: "
                              "pip install 'skyformer-ext[transformers]'") from error

from .. import _checks
from ..api import skyformer_attention

__all__ = ["register", "registered_options", "DEFAULT_OPTIONS", "CONFIG_PREFIX"]

DEFAULT_OPTIONS = {"num_landmarks": 128, "landmarks": "random", "eval_landmarks": "strided", "ridge": 0.1,
                   "inverse": "newton_schulz", "ns_iters": 6, "backend": "auto", "deterministic": True,
                   "landmark_refine": 0}
CONFIG_PREFIX = "skyformer_"

# Names transformers dispatches specially (hub kernels "org/repo", flash / flex / sdpa / paged checks).
_RESERVED_PARTS = ("flash", "flex_attention", "sdpa", "paged")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "sliding_window": "sliding-window attention",
    "position_bias": "an additive position bias",
    "s_aux": "attention sinks",
    "cu_seq_lens_q": "packed sequences (use skyformer_ext.skyformer_attention_varlen directly)",
    "cu_seq_lens_k": "packed sequences (use skyformer_ext.skyformer_attention_varlen directly)",
}
_CAUSAL = ("Skyformer attention is bidirectional: every query sees every valid key, and it has no causal form. "
           "Use it for encoder self-attention (BERT, RoBERTa, XLM-R, ...) and cross-attention; keep decoder "
           "(causal) self-attention on 'sdpa' or 'eager'.")

_registered: dict[str, dict] = {}


def _validated(options: dict, where: str) -> dict:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"{where}: unknown Skyformer option(s) {unknown}; the options are {list(DEFAULT_OPTIONS)}")
    merged = {**DEFAULT_OPTIONS, **options}
    try:
        _checks.check_skyformer_options(merged["num_landmarks"], merged["landmarks"], merged["ridge"],
                                        merged["inverse"], merged["ns_iters"], None, merged["deterministic"],
                                        merged["backend"], merged["landmark_refine"])
        _checks.check_choice("eval_landmarks", merged["eval_landmarks"], _checks.STRATEGIES)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    return merged


def _module_options(module, options: dict) -> dict:
    """The registered options with the ``config.skyformer_<option>`` overrides of the module's config."""
    config = getattr(module, "config", None)
    if config is None:
        return options
    overrides = {}
    for key in DEFAULT_OPTIONS:
        value = getattr(config, CONFIG_PREFIX + key, None)
        if value is not None:
            overrides[key] = value
    if not overrides:
        return options
    return _validated({**options, **overrides}, f"config.{CONFIG_PREFIX}* override")


def _key_padding_mask(attention_mask, query: torch.Tensor, key: torch.Tensor):
    """The (batch, n_k) bool key mask Skyformer takes, from what the model passed as ``attention_mask``."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"Skyformer attention takes a 2-D (batch, n_k) key-padding mask or None as attention_mask, "
                        f"got {type(attention_mask).__name__}")
    batch, n_k = query.shape[0], key.shape[2]
    if attention_mask.dim() != 2:
        raise ValueError(f"Skyformer attention takes a 2-D (batch, n_k) key-padding mask, got a "
                         f"{attention_mask.dim()}-D attention_mask of shape {tuple(attention_mask.shape)}: it forms "
                         "no (n_q, n_k) score matrix to apply it to. Pass the usual 2-D attention_mask "
                         "(1 = token, 0 = padding) to the model instead of a prepared 4-D mask.")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"Skyformer attention takes a bool or 0/1 integer key-padding mask, got "
                            f"{attention_mask.dtype} (an additive float mask cannot be applied without a score matrix)")
        attention_mask = attention_mask != 0
    if attention_mask.shape[0] == 1 and batch != 1:
        attention_mask = attention_mask.expand(batch, -1)
    if tuple(attention_mask.shape) != (batch, n_k):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but Skyformer needs (batch, n_k) = "
                         f"{(batch, n_k)}")
    return attention_mask.to(query.device)


def _attention(options, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if causal:
        raise ValueError(f"{type(module).__name__} is causal (is_causal=True). {_CAUSAL}")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"Skyformer attention does not support {what} (the model passed {name}=...)")
    training = bool(getattr(module, "training", False))
    if training and dropout:
        raise ValueError(
            f"attention dropout {dropout} in training mode: Skyformer forms no attention-weight matrix to drop from. "
            "Set the model's attention dropout to 0 (BERT-family: config.attention_probs_dropout_prob=0.0; "
            "others: config.attention_dropout=0.0); hidden-state dropout is unaffected.")
    if kwargs.get("output_attentions", False):
        warnings.warn("Skyformer attention forms no attention-weight matrix; output_attentions returns no weights "
                      "for its layers",
                      stacklevel=3)
    options = _module_options(module, options)
    mask = _key_padding_mask(attention_mask, query, key)
    out = skyformer_attention(query, key, value, attn_mask=mask, num_landmarks=options["num_landmarks"],
                              landmarks=options["landmarks"] if training else options["eval_landmarks"],
                              ridge=options["ridge"], inverse=options["inverse"], ns_iters=options["ns_iters"],
                              scale=scaling, backend=options["backend"], deterministic=options["deterministic"],
                              landmark_refine=options["landmark_refine"])
    return out.transpose(1, 2).contiguous(), None


def _make_attention(options: dict):
    def skyformer_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                    is_causal=None, **kwargs):
        """transformers AttentionInterface function: Skyformer attention (see
        skyformer_ext.integrations.transformers). Returns (output (batch, n_q, heads, p_v), None)."""
        return _attention(options, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    return skyformer_attention_forward


def skyformer_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                   mask_function=bidirectional_mask_function, attention_mask=None, **kwargs):
    """transformers AttentionMaskInterface function: the 2-D (batch, kv_length) bool key-padding mask (True = key
    takes part), or None when no key is padded. Refuses causal and custom mask patterns."""
    if mask_function is causal_mask_function:
        raise ValueError(f"the model asked for a causal attention mask (a decoder, e.g. is_decoder=True). {_CAUSAL}")
    if mask_function is not bidirectional_mask_function:
        pattern = getattr(mask_function, "__name__", mask_function)
        raise ValueError(f"the model asked for a custom attention-mask pattern ({pattern}); "
                         f"Skyformer applies key-padding masks only. {_CAUSAL}")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length:
        raise ValueError(f"Skyformer needs a 2-D (batch, kv_length={kv_length}) padding mask, got shape "
                         f"{tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(torch.bool)
    # Reading the values (to drop an all-True mask) would break a torch.compile graph or bake a trace.
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and bool(attention_mask.all()):
        return None
    return attention_mask


def register(name: str = "skyformer", **options) -> str:
    """Registers Skyformer attention under ``name`` with transformers' AttentionInterface and
    AttentionMaskInterface and returns ``name``, for ``attn_implementation=name`` in ``from_pretrained`` /
    ``from_config`` and ``model.set_attn_implementation(name)``.

    Options (see the module docstring): num_landmarks=128, landmarks="random" (training), eval_landmarks="strided",
    ridge=0.1, inverse="newton_schulz", ns_iters=6, backend="auto", deterministic=True, landmark_refine=0.
    Registering a name again replaces its options (models look the function up at every forward). Names that
    transformers already uses, or treats specially, are refused.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not _NAME.match(name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.' and '-', got {name!r}")
    if name == "eager" or any(part in name for part in _RESERVED_PARTS):
        raise ValueError(f"name {name!r} is one transformers treats specially ('eager' or containing one of "
                         f"{list(_RESERVED_PARTS)}); choose another, e.g. 'skyformer'")
    if name not in _registered and (name in AttentionInterface._global_mapping
                                    or name in AttentionMaskInterface._global_mapping):
        raise ValueError(f"attention implementation {name!r} is already registered with transformers by someone "
                         "else; choose another name")
    validated = _validated(options, "register")
    AttentionInterface.register(name, _make_attention(dict(validated)))
    AttentionMaskInterface.register(name, skyformer_mask)
    _registered[name] = validated
    return name


def registered_options(name: str = "skyformer") -> dict:
    """A copy of the options registered under ``name`` (KeyError when ``register`` did not register it)."""
    if name not in _registered:
        raise KeyError(f"{name!r} was not registered by skyformer_ext.integrations.transformers.register")
    return dict(_registered[name])
