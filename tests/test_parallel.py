"""Context-parallel Skyformer (issue 15): P = 2 and 4 spawned gloo processes, each holding a contiguous shard
of the sequence, equal the single-process call on the whole sequence with the same landmarks (float64:
outputs and q/k/v gradients, to rounding; float32: the single-process call of the same backend; bfloat16 /
float16: within the low-precision rule), on the torch backend and on the Triton kernels (the interpreter on
CPU); the collectives and the bytes each rank sends per forward + backward do not depend on n.

One spawn per world size runs every case; the parent compares each rank's shard with the single-process
result.
"""

import socket
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import skyformer_ext as sx
from bench.context_parallel import CollectiveCounter
from conftest import assert_within_low_precision_rule, max_error

M = 6
TIMEOUT_S = 240
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Case:
    """A global problem and how it is sharded: q_sizes / k_sizes are the rows of each rank, in rank order."""
    q_sizes: list
    k_sizes: list
    heads: int = 4
    kv_heads: int = 2
    p: int = 5
    p_v: int = 3
    batch: int = 2
    valid_keys: list | None = None  # per batch row: keys 0..valid - 1 take part (None: no mask)
    landmarks: str = "given"  # "given" (drawn once, global), "random" (rank 0's generator), "strided"
    given_rows: tuple | None = None  # (low, high): given landmarks drawn from global rows [low, high) of [Q; K]
    options: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float64


def _cases(world: int) -> dict:
    if world == 2:
        return {
            "even": Case([20, 20], [20, 20]),
            "uneven-masked-random": Case([29, 11], [29, 11], valid_keys=[35, 18], landmarks="random"),
            "cross-strided": Case([9, 21], [14, 3], landmarks="strided", options=dict(inverse="cholesky")),
            # Two Lloyd steps over the whole sequence (the masked query rows of self-attention take no part).
            "refine-masked-random": Case([29, 11], [29, 11], valid_keys=[35, 18], landmarks="random",
                                         options=dict(landmark_refine=2)),
        }
    return {
        # Padding confined to the last ranks, the last shard fully padded, rank 0 without rows; batch row 1 has
        # no valid key at all (zeros).
        "uneven-padded": Case([0, 17, 12, 6], [0, 17, 12, 6], valid_keys=[29, 0], landmarks="random"),
        # Every landmark among rank 2's rows (global rows 17..28 of [Q; K]).
        "landmarks-on-one-rank": Case([5, 12, 12, 3], [5, 12, 12, 3], given_rows=(17, 29)),
        "cross-gqa": Case([3, 0, 10, 4], [6, 6, 0, 9], heads=6, kv_heads=2, landmarks="random"),
        "nondeterministic": Case([8, 8, 8, 8], [8, 8, 8, 8], options=dict(deterministic=False)),
        # Refinement with a rank without rows, a fully padded shard and a batch row without keys; cross GQA.
        "refine-uneven-padded": Case([0, 17, 12, 6], [0, 17, 12, 6], valid_keys=[29, 0], landmarks="random",
                                     options=dict(landmark_refine=1)),
        "refine-cross-gqa": Case([3, 0, 10, 4], [6, 6, 0, 9], heads=6, kv_heads=2, given_rows=(0, 17),
                                 options=dict(landmark_refine=2)),
    }


def _global(case: Case):
    gen = torch.Generator().manual_seed(11)
    n_q, n_k = sum(case.q_sizes), sum(case.k_sizes)
    q = torch.randn(case.batch, case.heads, n_q, case.p, generator=gen, dtype=torch.float64)
    k = torch.randn(case.batch, case.kv_heads, n_k, case.p, generator=gen, dtype=torch.float64)
    v = torch.randn(case.batch, case.kv_heads, n_k, case.p_v, generator=gen, dtype=torch.float64)
    grad = torch.randn(case.batch, case.heads, n_q, case.p_v, generator=gen, dtype=torch.float64)
    q, k, v, grad = (t.to(case.dtype) for t in (q, k, v, grad))
    mask = None
    if case.valid_keys is not None:
        mask = torch.arange(n_k)[None, :] < torch.tensor(case.valid_keys)[:, None]
    kwargs = dict(num_landmarks=M, **case.options)
    if case.landmarks == "given":
        low, high = case.given_rows or (0, n_q + n_k)
        kwargs["landmark_indices"] = torch.randint(low, high, (case.batch, M), generator=gen)
    else:
        kwargs["landmarks"] = case.landmarks
    if case.options.get("backend") == "triton":  # CUDA when present (gloo takes CUDA tensors), else the interpreter
        q, k, v, grad = (t.to(TRITON_DEVICE) for t in (q, k, v, grad))
        mask = None if mask is None else mask.to(TRITON_DEVICE)
        if "landmark_indices" in kwargs:
            kwargs["landmark_indices"] = kwargs["landmark_indices"].to(TRITON_DEVICE)
    return q, k, v, grad, mask, kwargs


def _shard(t, sizes, rank, dim=2):
    start = sum(sizes[:rank])
    return t.narrow(dim, start, sizes[rank])


def _run_case(case: Case, rank: int):
    q, k, v, grad, mask, kwargs = _global(case)
    local = [_shard(t, sizes, rank).clone().requires_grad_()
             for t, sizes in ((q, case.q_sizes), (k, case.k_sizes), (v, case.k_sizes))]
    if case.landmarks == "random":
        kwargs["generator"] = torch.Generator().manual_seed(5 + rank)  # only rank 0's is used
    local_mask = None if mask is None else _shard(mask, case.k_sizes, rank, dim=1)
    out = sx.parallel.context_parallel_attention(*local, attn_mask=local_mask, **kwargs)
    out.backward(_shard(grad, case.q_sizes, rank))
    return [out.detach(), *(t.grad for t in local)]


def _traffic(rank: int, world: int, n: int, dtype=torch.float64, **options) -> tuple[int, int]:
    """(collectives, bytes sent) of one forward + backward with n global tokens, split evenly."""
    sizes = [n // world] * world
    case = Case(sizes, sizes, valid_keys=[n - 3, n // 2], landmarks="random", dtype=dtype, options=options)
    with CollectiveCounter() as counter:
        _run_case(case, rank)
    return counter.calls, counter.bytes


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {name: _run_case(case, rank) for name, case in _cases(world).items()}
        results["rerun"] = _run_case(_cases(world)[next(iter(_cases(world)))], rank)
        if world == 2:
            results["traffic"] = {n: _traffic(rank, world, n) for n in (256, 4096)}
            results["refine traffic"] = {n: _traffic(rank, world, n, landmark_refine=2) for n in (256, 4096)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_worker(worker, world, tmp_path):
    context = mp.start_processes(worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                                 start_method="spawn")
    while not context.join(timeout=TIMEOUT_S):
        pass
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


def _spawn(world, tmp_path):
    return _spawn_worker(_worker, world, tmp_path)


def _single_process(case: Case):
    q, k, v, grad, mask, kwargs = _global(case)
    if case.landmarks == "random":
        kwargs["generator"] = torch.Generator().manual_seed(5)  # rank 0's generator
    kwargs.pop("deterministic", None)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = sx.skyformer_attention(q, k, v, attn_mask=mask, backend="reference", **kwargs)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_calls_equal_the_single_process_call(world, tmp_path):
    results = _spawn(world, tmp_path)
    for name, case in _cases(world).items():
        expected = _single_process(case)
        for rank in range(world):
            sizes = (case.q_sizes, case.q_sizes, case.k_sizes, case.k_sizes)
            for what, got, full, shard_sizes in zip(("out", "dq", "dk", "dv"), results[rank][name], expected, sizes):
                torch.testing.assert_close(got, _shard(full, shard_sizes, rank), rtol=1e-9, atol=1e-11,
                                           msg=f"{name} rank {rank} {what}")
    first = next(iter(_cases(world)))
    for rank in range(world):  # deterministic=True: a rerun is bit-identical
        assert all(torch.equal(a, b) for a, b in zip(results[rank]["rerun"], results[rank][first]))
    if world == 2:
        for rank in range(world):
            traffic = results[rank]["traffic"]
            assert traffic[256] == traffic[4096], traffic  # collectives and bytes sent do not grow with n
            calls, sent = traffic[256]
            # sizes/counts, draws, L, Z forward; dZ, dL backward
            assert calls == 6, traffic
            case = Case([1], [1])
            numbers = 2 * case.batch * case.heads * M * (case.p + case.p_v)
            assert sent == 8 * (numbers + 2 * (case.batch + 1) + case.batch * M), traffic
            refine_traffic = results[rank]["refine traffic"]
            assert refine_traffic[256] == refine_traffic[4096], refine_traffic
            # Per Lloyd step: the sums and counts (m * (p + 1) per head) forward, dL (m * p) backward.
            per_step = case.batch * case.heads * M * (2 * case.p + 1)
            assert refine_traffic[256] == (calls + 2 * 2, sent + 8 * 2 * per_step), (refine_traffic, traffic)


def test_refuses_without_a_process_group_and_bad_shards():
    q = torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="torch.distributed"):
        sx.parallel.context_parallel_attention(q, q, q)


# ---- the Triton backend on every rank, and every dtype --------------------------------------------------

def _dtype_cases() -> dict:
    # Two Newton-Schulz steps or Cholesky: the interpreter runs the solve kernels slowly.
    triton, torch_backend = dict(backend="triton", ns_iters=2), dict(backend="torch")
    cross_without_keys = dict(q_sizes=[15, 8], k_sizes=[0, 19], p=16, p_v=8)  # rank 0 holds no key
    return {
        "triton-float32-cross": Case(**cross_without_keys, dtype=torch.float32, options=triton),
        "triton-float32-masked-random": Case([29, 11], [29, 11], valid_keys=[35, 18], landmarks="random",
                                             dtype=torch.float32, options=triton),
        "triton-bfloat16-cholesky": Case(**cross_without_keys, dtype=torch.bfloat16,
                                         options=dict(triton, inverse="cholesky")),
        "triton-float16-masked-cholesky": Case([13, 20], [13, 20], valid_keys=[30, 21], dtype=torch.float16,
                                               options=dict(triton, inverse="cholesky")),
        # Lloyd steps on the Triton kernels: self-attention with a mask (padded queries take no part) and
        # cross-attention with a mask whose rank 0 holds as many queries as keys (its queries all take part).
        "triton-float32-refine-masked-random": Case([29, 11], [29, 11], valid_keys=[35, 18], landmarks="random",
                                                    dtype=torch.float32, options=dict(triton, landmark_refine=2)),
        "triton-float32-refine-cross-masked": Case([10, 10], [10, 9], valid_keys=[6, 3], dtype=torch.float32,
                                                   options=dict(triton, inverse="cholesky", landmark_refine=1)),
        "torch-float32-masked-random": Case([29, 11], [29, 11], valid_keys=[35, 18], landmarks="random",
                                            dtype=torch.float32, options=torch_backend),
        "torch-bfloat16-cross": Case(**cross_without_keys, dtype=torch.bfloat16, options=torch_backend),
        "torch-float16-masked": Case([13, 20], [13, 20], valid_keys=[30, 21], dtype=torch.float16,
                                     options=torch_backend),
    }


def _dtype_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {name: _run_case(case, rank) for name, case in _dtype_cases().items()}
        results["rerun"] = _run_case(_dtype_cases()["triton-float16-masked-cholesky"], rank)
        results["traffic"] = {n: _traffic(rank, world, n, torch.float32, backend="triton", inverse="cholesky")
                              for n in (32, 128)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _whole(results, name, case):
    """The ranks' shards of (out, dq, dk, dv) put back together along the sequence."""
    return [torch.cat([results[rank][name][i] for rank in range(len(results))], 2) for i in range(4)]


def _single_process_in(case: Case, backend: str, dtype: torch.dtype):
    """The single-process call on the whole sequence: inputs rounded to case.dtype, computed in dtype."""
    q, k, v, grad, mask, kwargs = _global(case)
    if case.landmarks == "random":
        kwargs["generator"] = torch.Generator().manual_seed(5)  # rank 0's generator
    kwargs = {**kwargs, "backend": backend}
    if backend == "reference":
        kwargs.pop("deterministic", None)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = sx.skyformer_attention(q, k, v, attn_mask=mask, **kwargs)
    out.backward(grad.to(dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def test_sharded_calls_on_each_backend_and_dtype(tmp_path):
    results = _spawn_worker(_dtype_worker, 2, tmp_path)
    for name, case in _dtype_cases().items():
        got = _whole(results, name, case)
        backend = case.options["backend"]
        if case.dtype == torch.float32:
            # The same backend on one process; only the split of the sums differs.
            expected = _single_process_in(case, backend, torch.float32)
            for what, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
                assert a.dtype == torch.float32
                assert max_error(a, e) <= 1e-5 * max(1.0, e.abs().max().item()), f"{name} {what}"
            continue
        truth = _single_process_in(case, "reference", torch.float64)
        baseline = _single_process_in(case, "torch", case.dtype)  # the PyTorch path in the same dtype
        for what, a, t, base in zip(("out", "dq", "dk", "dv"), got, truth, baseline):
            assert a.dtype == case.dtype
            assert_within_low_precision_rule(a, t, base, name=f"{name} {what}",
                                             floor=torch.finfo(case.dtype).eps * t.abs().max().item())
    for rank in range(2):  # deterministic=True: a rerun is bit-identical
        assert all(torch.equal(a, b) for a, b in zip(results[rank]["rerun"],
                                                     results[rank]["triton-float16-masked-cholesky"]))
        traffic = results[rank]["traffic"]
        assert traffic[32] == traffic[128], traffic
        calls, sent = traffic[32]
        case = Case([1], [1])
        # L, Z, dZ and dL in float32; the sizes/counts and draws in int64 / float64.
        numbers = 2 * case.batch * case.heads * M * (case.p + case.p_v)
        assert calls == 6 and sent == 4 * numbers + 8 * (2 * (case.batch + 1) + case.batch * M), traffic


# ---- the weights under DDP and FSDP ---------------------------------------------------------------------

MODULE_SHARDS = [18, 12]
MODULE_LANDMARKS = torch.tensor([[0, 5, 20, 33, 40, 59], [1, 2, 29, 30, 45, 58]])  # global rows of [Q; K]


def _module():
    torch.manual_seed(3)
    return sx.nn.SkyformerAttention(24, 4, num_kv_heads=2, num_landmarks=M, dtype=torch.float64)


def _module_data():
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(2, sum(MODULE_SHARDS), 24, generator=gen, dtype=torch.float64),
            torch.randn(2, sum(MODULE_SHARDS), 24, generator=gen, dtype=torch.float64))


def _wrapped_module_worker(rank, world, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, grad = (t.narrow(1, sum(MODULE_SHARDS[:rank]), MODULE_SHARDS[rank]) for t in _module_data())
        results = {}
        for wrapper in ("ddp", "fsdp"):
            model = _module()
            model.context_parallel_group = dist.group.WORLD
            wrapped = (torch.nn.parallel.DistributedDataParallel(model) if wrapper == "ddp"
                       else fully_shard(model, mesh=init_device_mesh("cpu", (world,))))
            out = wrapped(x, landmark_indices=MODULE_LANDMARKS)
            out.backward(grad)
            results[wrapper] = {"out": out.detach(), **{
                name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                for name, p in model.named_parameters()}}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_weights_under_ddp_and_fsdp(tmp_path):
    """nn.SkyformerAttention(context_parallel_group=...) inside DDP and FSDP2 (fully_shard) over the same ranks:
    each rank's loss covers its shard, the wrappers average the weight gradients over the ranks, so P times
    the averaged gradient is the single-process gradient of the whole sequence's loss."""
    results = _spawn_worker(_wrapped_module_worker, 2, tmp_path)
    model = _module()
    x, grad = _module_data()
    out = model(x, landmark_indices=MODULE_LANDMARKS)
    out.backward(grad)
    for wrapper in ("ddp", "fsdp"):
        torch.testing.assert_close(torch.cat([results[rank][wrapper]["out"] for rank in range(2)], 1),
                                   out.detach(), rtol=1e-9, atol=1e-11, msg=f"{wrapper} output")
        for name, p in model.named_parameters():
            for rank in range(2):
                torch.testing.assert_close(2 * results[rank][wrapper][name], p.grad, rtol=1e-9, atol=1e-11,
                                           msg=f"{wrapper} rank {rank} {name}")
