"""The launch budget of backend="triton" (issue 12): a Skyformer call launches a handful of kernels and never
waits for the GPU.

Counted by bench.launches' rule (every Triton launch, every ATen op that computes or writes memory, nested
ones included; host syncs = _local_scalar_dense, nonzero, masked_select, unique) on CPU under Triton's
interpreter, which launches exactly what a CUDA run launches. Counts, never time.
"""

import pytest

from bench.launches import Config, count_skyformer

FORWARD_BUDGET = 6
BACKWARD_BUDGET = 10

# Odd sizes, n_q != n_k, GQA, a key mask: the split reductions of the interpreter's small program target
# are exercised, and must still cost no launch of their own. Four (batch, head) matrices: the interpreter runs
# the landmark solve one matrix at a time, and the counts do not depend on how many there are.
# One Newton-Schulz iteration: the iterations run inside the one solve kernel, so they change no count, only the
# interpreter's time.
BASE = dict(backend="triton", n_q=97, n_k=61, batch=2, heads=2, kv_heads=1, p=80, m=16, dtype="fp16", ns_iters=1)


STAGES = {"landmarks", "landmark_refine", "key_summary", "landmark_solve", "query_apply"}


@pytest.mark.parametrize("options", [
    dict(),  # the default call: random landmarks, key mask, Newton-Schulz, deterministic
    dict(landmarks="given", mask=False, dtype="bf16"),
    dict(deterministic=False, dtype="fp32"),
    dict(inverse="cholesky", dtype="bf16"),
], ids=["default", "given-landmarks-no-mask", "nondeterministic", "cholesky"])
def test_skyformer_call_stays_within_the_launch_budget_without_host_syncs(options):
    config = Config(**{**BASE, **options})
    forward, backward = count_skyformer(config)
    # Given landmark_indices are range-checked before the call by reading their min and max (two reductions,
    # two syncs; skipped under torch.compile and CUDA-graph capture). Nothing else reads a value back, and
    # every other launch belongs to a stage: nothing runs between them (no casts, memsets or reductions).
    validation = {"(unlabelled)": 4} if config.landmarks == "given" else {}
    assert forward.syncs == sum(validation.values()) // 2 and backward.syncs == 0, (forward.sync_ops,
                                                                                      backward.sync_ops)
    assert {s: c for s, c in forward.by_stage.items() if s not in STAGES} == validation, forward.by_stage
    assert set(backward.by_stage) <= STAGES, backward.by_stage
    if config.deterministic:  # deterministic=False zero-fills the buffers its atomics add into
        assert sum(forward.by_stage.get(s, 0) for s in STAGES) <= FORWARD_BUDGET, forward.by_kernel
        assert backward.total <= BACKWARD_BUDGET, backward.by_kernel


def test_default_call_launches_one_kernel_per_stage_pass():
    """Forward: the draws, then one kernel per stage; backward: two per n-sized stage, one for the solve,
    one scatter of the landmark gradients."""
    forward, backward = count_skyformer(Config(**BASE))
    assert forward.by_stage == {"landmarks": 2, "key_summary": 1, "landmark_solve": 1, "query_apply": 1}
    assert backward.by_stage == {"query_apply": 2, "landmark_solve": 1, "key_summary": 2, "landmarks": 1}


def test_landmark_refinement_costs_two_launches_forward_and_one_backward_per_step():
    """Issue 18's budget over the default path: per Lloyd step at most 2 more launches forward and 1 more
    backward, no host sync. Two steps; small head dims (the counts do not depend on them), lengths that still
    split the assignment pass."""
    steps = 2
    config = Config(**{**BASE, "landmark_refine": steps, "dtype": "bf16", "p": 16, "n_q": 45, "n_k": 33})
    forward, backward = count_skyformer(config)
    assert forward.syncs == 0 and backward.syncs == 0, (forward.sync_ops, backward.sync_ops)
    assert forward.by_stage == {"landmarks": 2, "landmark_refine": 2 * steps, "key_summary": 1,
                                "landmark_solve": 1, "query_apply": 1}, forward.by_kernel
    assert backward.by_stage == {"query_apply": 2, "landmark_solve": 1, "key_summary": 2, "landmarks": 1,
                                 "landmark_refine": steps}, backward.by_kernel


def test_packed_call_launches_what_the_dense_call_launches():
    """Issue 14: a packed call of mixed-length sequences runs the dense path's stage kernels, one launch each
    for all sequences (no per-sequence loop, no padded copy, no host sync in any stage). Its only other work
    is the validation of cu_seqlens (unlabelled; one read-back of their values, which the CPU counts do not
    show as a sync; skipped under torch.compile and CUDA-graph capture)."""
    forward, backward = count_skyformer(Config(**{**BASE, "mask": False, "packed": True, "batch": 3}))
    stage_counts = {s: c for s, c in forward.by_stage.items() if s in STAGES}
    # The dense default call's counts (test_default_call_launches_one_kernel_per_stage_pass).
    assert stage_counts == {"landmarks": 2, "key_summary": 1, "landmark_solve": 1, "query_apply": 1}, forward.by_kernel
    assert backward.by_stage == {"query_apply": 2, "landmark_solve": 1, "key_summary": 2, "landmarks": 1}
    assert set(forward.by_stage) - STAGES <= {"(unlabelled)"} and backward.syncs == 0


def test_packed_refinement_launches_what_the_dense_refinement_launches():
    """Issues 14 and 18: Lloyd steps on packed sequences are the dense refine kernels addressed by sequence,
    2 launches per step forward and 1 backward for all sequences, no host sync in any stage."""
    steps = 2
    config = Config(**{**BASE, "mask": False, "packed": True, "batch": 3, "landmark_refine": steps, "p": 16})
    forward, backward = count_skyformer(config)
    stage_counts = {s: c for s, c in forward.by_stage.items() if s in STAGES}
    assert stage_counts == {"landmarks": 2, "landmark_refine": 2 * steps, "key_summary": 1, "landmark_solve": 1,
                            "query_apply": 1}, forward.by_kernel
    assert backward.by_stage == {"query_apply": 2, "landmark_solve": 1, "key_summary": 2, "landmarks": 1,
                                 "landmark_refine": steps}, backward.by_kernel
    assert set(forward.by_stage) - STAGES <= {"(unlabelled)"} and backward.syncs == 0
