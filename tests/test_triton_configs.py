"""Launch configurations of the generic kernels (no GPU needed): compile_check enumerates exactly the
autotuning candidates, every candidate tiles the split that the launch plans, and the interpreter runs one
configuration without an autotuner."""

import pytest
import torch

from triton_kernels import compile_check, gaussian_tiles as gt

KERNELS = {"fwd": "gaussian_attention_fwd_kernel", "rows": "gaussian_attention_bwd_rows_kernel",
           "keys": "gaussian_attention_bwd_keys_kernel"}


def _as_config(launch) -> tuple:
    consts = dict(launch.constexprs)
    return consts["BLOCK_R"], consts["BLOCK_K"], consts["PRECISION"], launch.num_warps, launch.num_stages


def _variant(launch) -> tuple:
    """What a stage changes: pointer dtypes, atomic partials, scaled output gradient."""
    consts = dict(launch.constexprs)
    return launch.pointer_dtypes, consts["ATOMIC"], consts.get("SCALED_GRAD")


@pytest.mark.parametrize("dtype", sorted(compile_check.DTYPES))
@pytest.mark.parametrize("block_d", gt.HEAD_DIMS)
@pytest.mark.parametrize("role", gt.KERNEL_ROLES)
def test_compile_check_enumerates_every_candidate(role, block_d, dtype):
    candidates = gt.block_candidates(role, block_d, compile_check.DTYPES[dtype])
    expected = {(c["BLOCK_R"], c["BLOCK_K"], c["PRECISION"], c["num_warps"], c["num_stages"]) for c in candidates}
    launches = compile_check.launches([dtype], [block_d], kernels=[KERNELS[role]])
    assert {_as_config(launch) for launch in launches} == expected
    variants = {config: {_variant(launch) for launch in launches if _as_config(launch) == config}
                for config in expected}
    assert len({frozenset(v) for v in variants.values()}) == 1  # every stage variant with every candidate


@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("block_d", gt.HEAD_DIMS)
@pytest.mark.parametrize("role", gt.KERNEL_ROLES)
def test_every_candidate_tiles_the_planned_split(role, block_d, elem_bytes):
    """The split plan comes from plan_blocks alone, so the partial buffers and the order of their sum do not
    depend on the autotuner's pick; each candidate's streamed tiles cover a split exactly."""
    candidates = gt.block_candidates(role, block_d, elem_bytes)
    tiled, streamed = ("BLOCK_K", "BLOCK_R") if role == "keys" else ("BLOCK_R", "BLOCK_K")
    tile_block, stream_block = gt.plan_blocks(role, block_d, elem_bytes)
    assert tile_block == candidates[0][tiled]
    assert len({c["PRECISION"] for c in candidates}) == 1  # the pick changes speed, not the dot precision
    for n_stream in (1, 17, 256, 1000, 4096, 100_000):
        for programs in (1, 3, 64, 10_000):
            splits, per_split = gt.split_plan(n_stream, stream_block, programs, allow_split=True)
            assert (splits - 1) * per_split < max(n_stream, 1) <= splits * per_split
            for candidate in candidates:
                assert per_split % candidate[streamed] == 0


def test_interpreter_launches_the_default_configuration_without_an_autotuner():
    if not gt.INTERPRETER:
        pytest.skip("the interpreter path")
    x, y, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 70, 64), torch.randn(1, 2, 70, 64)
    partials = gt.gaussian_attention_fwd(x, y, v, None, 0.125, torch.float32, split_keys=True)
    grads = gt.gaussian_attention_bwd(torch.randn(1, 2, 40, 64), x, y, v, None, 0.125, split_keys=True)
    assert partials.shape[0] > 1 and grads[0].shape[0] > 1  # the split path ran
    assert gt._TUNERS == {}


@pytest.mark.parametrize("deterministic", [True, False])
def test_autotuned_launches_agree_with_the_default(monkeypatch, deterministic):
    """The GPU path, run by the interpreter with a stand-in benchmark that makes the last candidate win and
    runs each candidate twice: same split plan, same results up to summation order, and the atomic
    variants' zero-filled buffers are not left holding benchmark sums."""
    if not gt.INTERPRETER:
        pytest.skip("runs the tuner's launches in the interpreter")
    import triton.testing

    timings = iter(range(1000, 0, -1))

    def benchmark(fn, warmup, rep, quantiles):
        fn()
        fn()
        return [float(next(timings))] * len(quantiles)

    torch.manual_seed(0)
    x, y, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 150, 64), torch.randn(1, 2, 150, 64)
    grad_out, mask = torch.randn(1, 2, 40, 64), torch.rand(1, 150) > 0.2
    expected_fwd = gt.gaussian_attention_fwd(x, y, v, mask, 0.125, torch.float32, True, deterministic)
    expected_bwd = gt.gaussian_attention_bwd(grad_out, x, y, v, mask, 0.125, True, True, deterministic)
    monkeypatch.setattr(gt, "INTERPRETER", False)
    monkeypatch.setattr(gt, "_TUNERS", {})
    monkeypatch.setattr(triton.testing, "do_bench", benchmark)
    tuned_fwd = gt.gaussian_attention_fwd(x, y, v, mask, 0.125, torch.float32, True, deterministic)
    tuned_bwd = gt.gaussian_attention_bwd(grad_out, x, y, v, mask, 0.125, True, True, deterministic)
    assert len(gt._TUNERS) == 3
    assert all(tuner.best_config is tuner.configs[-1] for tuner in gt._TUNERS.values())  # not the default
    assert (tuned_fwd.shape[0] == 1) == (not deterministic)  # atomic partials when not deterministic
    for tuned, expected in zip((tuned_fwd, *tuned_bwd), (expected_fwd, *expected_bwd)):
        assert tuned.shape == expected.shape  # the split plan
        torch.testing.assert_close(tuned, expected, rtol=1e-5, atol=1e-5)
