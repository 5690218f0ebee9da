"""Landmark stage: choose m rows of X = [q; k] and gather them.

Landmark indices index the rows of X per batch element: 0..n_q-1 are queries, n_q..n_q+n_k-1 keys. The same
indices serve every head of a batch element (the paper's choice); for GQA the key rows of q-head h come from
kv-head h // (heads // kv_heads).
"""

from __future__ import annotations

import torch

from . import _checks


def _valid_positions(valid: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Maps draws in [0, 1) to positions of valid rows, uniformly.

    valid: (batch, n) bool; draws: (batch, count) float in [0, 1). A row with no valid entry is treated as
    all-valid, so its draws spread over every position (its output is zero anyway: see skyformer_attention).
    """
    valid = valid | ~valid.any(dim=1, keepdim=True)
    n_valid = valid.sum(dim=1, keepdim=True)
    # Stable sort puts the valid positions first, in increasing order.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    rank = (draws * n_valid).long().minimum(n_valid - 1)
    return order.gather(1, rank)


def sample_landmarks(batch: int, n_q: int, n_k: int, num_landmarks: int, *, attn_mask=None,
                     strategy: str = "random", generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """Landmark row indices into [q; k], shape (batch, num_landmarks), int64.

    - ``"random"`` (the paper): uniform with replacement, ``num_landmarks // 2`` among the valid query rows
      and the rest among the valid key rows. ``generator`` makes it reproducible.
    - ``"strided"``: deterministic, evenly spaced over the valid query rows and the valid key rows.

    ``attn_mask`` (batch, n_k) bool, True = key takes part. Landmarks never land on padded keys; when
    ``n_q == n_k`` (self-attention) the mask also marks the valid query rows. A batch row whose keys are all
    masked draws its landmarks from all rows (its output is zero whatever they are; gather_landmarks turns them
    into zero rows, so that padding garbage cannot reach the solve). With fewer
    valid rows than landmarks, rows repeat (sampling with replacement, as in the paper).
    """
    _checks.check_positive_int("batch", batch, 1)
    _checks.check_positive_int("n_q", n_q, 0)
    _checks.check_positive_int("n_k", n_k, 1)
    _checks.check_positive_int("num_landmarks", num_landmarks, 2)
    _checks.check_choice("strategy", strategy, _checks.STRATEGIES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device is None:
        device = attn_mask.device if isinstance(attn_mask, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    _checks.check_key_mask(attn_mask, batch, n_k, device)

    key_valid = (torch.ones(batch, n_k, dtype=torch.bool, device=device) if attn_mask is None else attn_mask)
    query_valid = (key_valid if attn_mask is not None and n_q == n_k
                   else torch.ones(batch, n_q, dtype=torch.bool, device=device))
    m_q = num_landmarks // 2 if n_q > 0 else 0
    if strategy == "strided":
        def grid(count: int) -> torch.Tensor:
            return ((torch.arange(count, device=device, dtype=torch.float64) + 0.5) / count).expand(batch, count)

        query_draws, key_draws = grid(m_q), grid(num_landmarks - m_q)
    else:
        draws = landmark_draws(batch, num_landmarks, generator, device)
        query_draws, key_draws = draws[:, :m_q], draws[:, m_q:]

    parts = []
    if m_q:
        parts.append(_valid_positions(query_valid, query_draws))
    parts.append(_valid_positions(key_valid, key_draws) + n_q)
    return torch.cat(parts, dim=1)


@torch.library.custom_op("skyformer_ext::landmark_draws", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _default_generator_draws(batch: int, num_landmarks: int, device: torch.device) -> torch.Tensor:
    """torch.rand on the default generator as an opaque op, so that under torch.compile the draws still come
    from the eager random stream (compiled code would otherwise generate its own random numbers), and the
    seeded-nondeterministic tag keeps two calls from being merged."""
    return torch.rand(batch, num_landmarks, device=device, dtype=torch.float64)


@_default_generator_draws.register_fake
def _(batch, num_landmarks, device):
    return torch.empty(batch, num_landmarks, device=device, dtype=torch.float64)


def landmark_draws(batch: int, num_landmarks: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The uniform draws behind random landmarks: (batch, num_landmarks) float64 in [0, 1), one
    ``torch.rand`` call (the first num_landmarks // 2 columns pick query rows when there are queries, the
    rest key rows). The Triton path maps the same draws to the same indices inside its landmark kernel."""
    if generator is None:
        return _default_generator_draws(batch, num_landmarks, torch.device(device))
    return torch.rand(batch, num_landmarks, generator=generator, device=generator.device,
                      dtype=torch.float64).to(device)


def gather_landmarks(q: torch.Tensor, k: torch.Tensor, landmark_indices: torch.Tensor,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L = X[idx] per q-head, shape (batch, heads, m, p), in the inputs' (unscaled) units and dtype.

    A batch row whose keys ``attn_mask`` masks all gets zero landmark rows: its output is zero whatever the
    landmarks are, and rows drawn from its padding could hold NaN or Inf. Differentiable: gradients
    scatter-add back into q and k (repeated landmarks accumulate; the zeroed rows pass none).
    """
    batch, heads, n_q, p = q.shape
    group = heads // k.shape[1]
    m = landmark_indices.shape[1]
    idx = landmark_indices.long()
    is_query = (idx < n_q)[:, None, :, None]
    q_rows = idx.clamp(max=max(n_q - 1, 0))
    k_rows = (idx - n_q).clamp(min=0)
    from_q = q.gather(2, q_rows[:, None, :, None].expand(batch, heads, m, p)) if n_q else None
    from_k = k.gather(2, k_rows[:, None, :, None].expand(batch, k.shape[1], m, p))
    from_k = from_k.repeat_interleave(group, dim=1) if group > 1 else from_k
    rows = from_k if from_q is None else torch.where(is_query, from_q, from_k)
    if attn_mask is not None:
        rows = rows.masked_fill(~attn_mask.any(1)[:, None, None, None], 0.0)
    return rows
