"""SkyformerAttention under DistributedDataParallel (gloo, 2 local processes) equals one process on all data.

Each rank trains on its half of a fixed global batch with the Skyformer landmarks of its rows fixed
(indices drawn once for the global batch, then sliced), so the only difference from a single process is
DDP's gradient all-reduce. The loss is a per-rank mean; DDP averages over the 2 ranks, which with equal
shards is the mean over the global batch, i.e. exactly the single-process loss's gradient.
"""

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import skyformer_ext as sk
from skyformer_ext.nn import ATTENTIONS, SkyformerAttention

from conftest import max_error

WORLD_SIZE = 2
BATCH, SEQ, EMBED, LANDMARKS, STEPS = 4, 33, 16, 8, 3
TIMEOUT_S = 60


def _global_data():
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, SEQ, EMBED, generator=generator, dtype=torch.float64)
    target = torch.randn(BATCH, SEQ, EMBED, generator=generator, dtype=torch.float64)
    pad = torch.arange(SEQ)[None, :] >= torch.tensor([33, 20, 27, 9])[:, None]
    landmarks = sk.sample_landmarks(BATCH, SEQ, SEQ, LANDMARKS, attn_mask=~pad, generator=generator)
    return x, target, pad, landmarks


def _train(model, rows, module):
    """STEPS of SGD on the given rows of the global batch; returns the gradients of each step."""
    x, target, pad, landmarks = (t[rows] for t in _global_data())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        out = model(x, key_padding_mask=pad, landmark_indices=landmarks)
        loss = ((out - target) ** 2).mean()
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in module.named_parameters()})
        optimizer.step()
    return grads


def _fresh_module(attention):
    torch.manual_seed(7)
    return SkyformerAttention(EMBED, 2, attention=attention, num_landmarks=LANDMARKS, dtype=torch.float64)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        for attention in ATTENTIONS:
            module = _fresh_module(attention)
            model = DistributedDataParallel(module)
            grads = _train(model, shard, module)
            results[attention] = {"grads": grads, "params": dict(module.state_dict())}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    for attention in ATTENTIONS:
        module = _fresh_module(attention)
        single = _train(module, slice(0, BATCH), module)
        for step in range(STEPS):
            for name, grad in single[step].items():
                for rank, result in enumerate(ranks):
                    err = max_error(result[attention]["grads"][step][name], grad)
                    assert err < 1e-12 * max(1.0, grad.abs().max().item()), (attention, step, name, rank, err)
        for name, value in module.state_dict().items():
            for result in ranks:
                assert max_error(result[attention]["params"][name], value) < 1e-12, (attention, name)
