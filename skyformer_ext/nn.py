"""``torch.nn`` building blocks: a drop-in multi-head attention layer with a switchable kernel.

:class:`SkyformerAttention` owns the projections (q, k, v, out) and calls one of three attention kernels:

- ``"skyformer"``: :func:`skyformer_ext.skyformer_attention` (Nystrom approximation, m landmarks);
- ``"kernelized"``: :func:`skyformer_ext.kernelized_attention` (the exact Gaussian-kernel model);
- ``"softmax"``: :func:`torch.nn.functional.scaled_dot_product_attention` (the usual transformer).

The kernel choice adds no parameters or buffers, so a state_dict saved with one choice loads into a module
built with any other (and ``module.attention`` may be reassigned on a live module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .api import kernelized_attention, kernelized_attention_varlen, skyformer_attention, skyformer_attention_varlen

__all__ = ["SkyformerAttention", "ATTENTIONS"]

ATTENTIONS = ("skyformer", "kernelized", "softmax")


class SkyformerAttention(nn.Module):
    """Multi-head (self- or cross-) attention with Skyformer, Kernelized or softmax attention.

    Args:
        embed_dim: model width of the input ``x`` and of the output.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA/MQA); default ``num_heads``. Must divide ``num_heads``.
        num_landmarks: m, landmarks per batch row for ``attention="skyformer"`` (ignored otherwise).
        attention: ``"skyformer"`` | ``"kernelized"`` | ``"softmax"``.
        dropout: probability of zeroing elements of the per-head attention output (before the output
            projection), applied in training mode only. It is the same operation for all three kernels,
            because Skyformer and Kernelized attention never form an attention-weight matrix to drop.
        bias: whether the four projections have a bias.
        batch_first: inputs/outputs are (batch, seq, feature) if True, else (seq, batch, feature).
        head_dim: per-head width; default ``embed_dim // num_heads`` (then ``embed_dim`` must divide evenly).
        context_dim: width of the ``context`` input of cross-attention; default ``embed_dim``.
        landmarks: landmark sampling in training mode, ``"random"`` (the paper) or ``"strided"``.
        eval_landmarks: landmark sampling in eval mode. ``"strided"`` (default) makes inference
            deterministic: evenly spaced valid query and key rows. ``"random"`` keeps the paper's sampling
            at test time (outputs then vary from call to call unless a ``generator`` is passed).
        landmark_refine: Lloyd (k-means) steps that move the landmarks to the centres of their clusters before
            the solve (0: the paper's landmarks); see :func:`skyformer_ext.skyformer_attention`.
        ridge, inverse, ns_iters: the landmark solve, see :func:`skyformer_ext.skyformer_attention`.
        scale: the SDPA meaning (multiplies q.k) for all three kernels; default ``head_dim ** -0.5``.
        backend: backend of the Skyformer/Kernelized kernels (``"auto"`` picks the fastest present one).
        deterministic: ``False`` lets the Triton kernels add split partial sums with atomics (bit-level
            run-to-run differences, less memory); no effect on the other backends or on softmax.
        context_parallel_group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``)
            over which the sequence is sharded: each rank passes its contiguous shard of ``x`` (and of
            ``context`` and ``key_padding_mask``) and gets its shard of the output, with Skyformer's
            communication (:func:`skyformer_ext.parallel.context_parallel_attention`). Skyformer only; the
            weights stay replicated (DDP/FSDP as usual).

    Mask convention: ``key_padding_mask`` follows :class:`torch.nn.MultiheadAttention`: a bool tensor of
    shape (batch, n_keys) where **True marks a padded key that is ignored**. (The functional API's
    ``attn_mask`` is the opposite, True = key takes part; the module converts.) In self-attention the
    mask also tells Skyformer which query rows are padding, so no landmark lands on them. Outputs are
    computed for every query row, padded or not; a batch row whose keys are all padded returns zeros
    (the bias of the output projection, after it) for every kernel.

    Shapes (batch_first=True): ``x`` (batch, n_q, embed_dim), ``context`` (batch, n_k, context_dim),
    output (batch, n_q, embed_dim).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 num_landmarks: int = 128, attention: str = "skyformer", dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, head_dim: int | None = None, context_dim: int | None = None,
                 landmarks: str = "random", eval_landmarks: str = "strided", ridge: float = 0.1,
                 inverse: str = "newton_schulz", ns_iters: int = 6, scale: float | None = None,
                 backend: str = "auto", deterministic: bool = True, landmark_refine: int = 0,
                 context_parallel_group=None, device=None, dtype=None):
        super().__init__()
        _checks.check_positive_int("embed_dim", embed_dim, 1)
        _checks.check_positive_int("num_heads", num_heads, 1)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _checks.check_positive_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                                 "unless head_dim is given")
            head_dim = embed_dim // num_heads
        _checks.check_positive_int("head_dim", head_dim, 1)
        context_dim = embed_dim if context_dim is None else context_dim
        _checks.check_positive_int("context_dim", context_dim, 1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        _checks.check_skyformer_options(num_landmarks, landmarks, ridge, inverse, ns_iters, scale, deterministic,
                                        backend, landmark_refine)
        _checks.check_choice("eval_landmarks", eval_landmarks, _checks.STRATEGIES)

        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim, self.context_dim = head_dim, context_dim
        self.num_landmarks = num_landmarks
        self.attention = attention
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.landmarks, self.eval_landmarks = landmarks, eval_landmarks
        self.landmark_refine = landmark_refine
        self.ridge, self.inverse, self.ns_iters = float(ridge), inverse, ns_iters
        self.scale = None if scale is None else float(scale)
        self.backend = backend
        self.deterministic = deterministic
        self.context_parallel_group = context_parallel_group

        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(context_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(context_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, value: str) -> None:
        _checks.check_choice("attention", value, ATTENTIONS)
        self._attention = value

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases, as :class:`torch.nn.MultiheadAttention`."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}",
                 f"num_kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}",
                 f"attention={self.attention!r}"]
        if self.attention == "skyformer":
            parts += [f"num_landmarks={self.num_landmarks}", f"landmarks={self.landmarks!r}",
                      f"eval_landmarks={self.eval_landmarks!r}", f"landmark_refine={self.landmark_refine}",
                      f"inverse={self.inverse!r}"]
        if self.context_dim != self.embed_dim:
            parts.append(f"context_dim={self.context_dim}")
        parts += [f"dropout={self.dropout}", f"batch_first={self.batch_first}"]
        return ", ".join(parts)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
        return t.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, landmark_indices: torch.Tensor | None = None,
                generator: torch.Generator | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, cu_seqlens_k: torch.Tensor | None = None,
                max_seqlen_k: int | None = None) -> torch.Tensor:
        """Attends from ``x`` to ``context`` (default: ``x`` itself, i.e. self-attention).

        Packed sequences: with ``cu_seqlens`` (int32, num_seqs + 1) and ``max_seqlen``, ``x`` is
        (total_tokens, embed_dim) in flash-attn's varlen layout and each sequence attends only to itself (or,
        with ``context`` (total_k, context_dim), ``cu_seqlens_k`` and ``max_seqlen_k``, to its own context
        rows); the output is (total_tokens, embed_dim). ``key_padding_mask`` does not apply (packing has no
        padding); ``landmark_indices`` is then (num_seqs, m), rows of each sequence's own [q; k]. See
        :func:`skyformer_ext.skyformer_attention_varlen`.

        Args:
            x: (batch, n_q, embed_dim), or (n_q, batch, embed_dim) when ``batch_first=False``.
            context: optional (batch, n_k, context_dim) keys/values source for cross-attention.
            key_padding_mask: keyword-only, optional bool (batch, n_k), True = padded key (ignored); see the
                class doc.
            landmark_indices: optional fixed Skyformer landmarks (batch, m), rows of [q; k] (see
                :func:`skyformer_ext.sample_landmarks`); overrides the sampling policy. Validating them
                reads their values, so leave this None inside ``torch.compile(fullgraph=True)``.
            generator: optional torch.Generator for reproducible landmark sampling (eager mode).
        """
        if cu_seqlens is not None or cu_seqlens_k is not None:
            if self.context_parallel_group is not None:
                raise ValueError("context_parallel_group takes sequence shards in the (batch, seq, feature) "
                                 "layout, not packed input (cu_seqlens)")
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask does not apply to packed input (cu_seqlens): packed sequences "
                                 "hold no padding")
            return self._forward_packed(x, context, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k,
                                        landmark_indices, generator)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be a 3-D tensor with last dim embed_dim={self.embed_dim}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if isinstance(context, torch.Tensor) and context.dtype == torch.bool:
            raise TypeError("context is a bool tensor; pass a padding mask as key_padding_mask=... (keyword)")
        source = x if context is None else context
        if not isinstance(source, torch.Tensor) or source.dim() != 3 or source.shape[-1] != self.context_dim:
            raise ValueError(f"context must be a 3-D tensor with last dim context_dim={self.context_dim}, got "
                             f"{tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__}")
        if not self.batch_first:
            x, source = x.transpose(0, 1), source.transpose(0, 1)
        if source.shape[0] != x.shape[0]:
            raise ValueError(f"x and context batch sizes differ: {x.shape[0]} vs {source.shape[0]}")
        key_keep = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = padded key), got "
                                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            if tuple(key_padding_mask.shape) != tuple(source.shape[:2]):
                raise ValueError(f"key_padding_mask must have shape (batch, n_keys) = {tuple(source.shape[:2])}, "
                                 f"got {tuple(key_padding_mask.shape)}")
            key_keep = ~key_padding_mask

        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(source), self.num_kv_heads)
        v = self._heads(self.v_proj(source), self.num_kv_heads)
        out = self._attend(q, k, v, key_keep, landmark_indices, generator)
        out = F.dropout(out, self.dropout, self.training)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out if self.batch_first else out.transpose(0, 1)

    def _forward_packed(self, x, context, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, landmark_indices,
                        generator) -> torch.Tensor:
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError("packed input needs both cu_seqlens and max_seqlen")
        if context is None and cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k is for cross-attention: pass context as well")
        if context is not None and (cu_seqlens_k is None or max_seqlen_k is None):
            raise ValueError("packed cross-attention needs cu_seqlens_k and max_seqlen_k for context")
        source, cu_k, max_k = (x, cu_seqlens, max_seqlen) if context is None else (context, cu_seqlens_k,
                                                                                   max_seqlen_k)
        for name, t, width in (("x", x, self.embed_dim), ("context", source, self.context_dim)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[-1] != width:
                raise ValueError(f"packed {name} must be a 2-D (total_tokens, {width}) tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(source).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(source).unflatten(-1, (self.num_kv_heads, self.head_dim))
        lengths = (cu_seqlens, cu_k, max_seqlen, max_k)
        if self.attention == "skyformer":
            strategy = self.landmarks if self.training else self.eval_landmarks
            out = skyformer_attention_varlen(q, k, v, *lengths, num_landmarks=self.num_landmarks,
                                             landmarks=strategy, landmark_indices=landmark_indices,
                                             generator=generator, ridge=self.ridge, inverse=self.inverse,
                                             ns_iters=self.ns_iters, scale=self.scale, backend=self.backend,
                                             deterministic=self.deterministic, landmark_refine=self.landmark_refine)
        elif self.attention == "kernelized":
            out = kernelized_attention_varlen(q, k, v, *lengths, scale=self.scale, backend=self.backend,
                                              deterministic=self.deterministic)
        else:
            out = _packed_softmax_attention(q, k, v, cu_seqlens, cu_k, self.scale)
        out = F.dropout(out, self.dropout, self.training)
        return self.out_proj(out.flatten(1))

    def _attend(self, q, k, v, key_keep, landmark_indices, generator) -> torch.Tensor:
        if self.context_parallel_group is not None:
            if self.attention != "skyformer":
                raise ValueError(f"context_parallel_group needs attention='skyformer' (exact kernelized and softmax "
                                 f"attention need every key on every rank), got attention={self.attention!r}")
            from .parallel import context_parallel_attention
            return context_parallel_attention(
                q, k, v, group=self.context_parallel_group, attn_mask=key_keep, num_landmarks=self.num_landmarks,
                landmarks=self.landmarks if self.training else self.eval_landmarks,
                landmark_indices=landmark_indices, generator=generator, ridge=self.ridge, inverse=self.inverse,
                ns_iters=self.ns_iters, scale=self.scale, backend=self.backend, deterministic=self.deterministic,
                landmark_refine=self.landmark_refine)
        if self.attention == "skyformer":
            strategy = self.landmarks if self.training else self.eval_landmarks
            return skyformer_attention(q, k, v, num_landmarks=self.num_landmarks, attn_mask=key_keep,
                                       landmarks=strategy, landmark_indices=landmark_indices,
                                       generator=generator, ridge=self.ridge, inverse=self.inverse,
                                       ns_iters=self.ns_iters, scale=self.scale, backend=self.backend,
                                       deterministic=self.deterministic, landmark_refine=self.landmark_refine)
        if self.attention == "kernelized":
            return kernelized_attention(q, k, v, attn_mask=key_keep, scale=self.scale, backend=self.backend,
                                        deterministic=self.deterministic)
        return _softmax_attention(q, k, v, key_keep, self.scale)


def _softmax_attention(q, k, v, key_keep, scale) -> torch.Tensor:
    """SDPA with our key-mask convention; batch rows without any valid key return zeros (SDPA gives NaN)."""
    if key_keep is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    has_key = key_keep.any(dim=1, keepdim=True)
    keep = (key_keep | ~has_key)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out * has_key[:, :, None, None].to(out.dtype)


def _packed_softmax_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale) -> torch.Tensor:
    """The softmax baseline on packed sequences: SDPA per sequence (a Python loop: the baseline kernel, not a
    fused varlen one). A sequence without keys gets zeros, like the other kernels."""
    outputs = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        if k1 == k0:
            outputs.append(q.new_zeros(q1 - q0, q.shape[1], v.shape[-1]))
            continue
        dense = [t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])]
        outputs.append(_softmax_attention(*dense, None, scale)[0].transpose(0, 1))
    return torch.cat(outputs) if outputs else q.new_zeros(0, q.shape[1], v.shape[-1])
