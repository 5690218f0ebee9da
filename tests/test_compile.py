"""torch.compile(fullgraph=True) of SkyformerAttention: forward and backward, no graph break, same numbers.

fullgraph=True turns any graph break into an error, so a passing compile is the no-break check. Inductor
normally draws its own random numbers; ``fallback_random`` makes it use eager's generator so that the
training-mode landmark sampling of the compiled module can be compared with eager exactly. On a machine
with CUDA the same tests also run on the GPU (the path that dispatches to the fused kernels there).
"""

import pytest
import torch
import torch._inductor.config as inductor_config

from skyformer_ext import skyformer_attention
from skyformer_ext.nn import ATTENTIONS, SkyformerAttention

from conftest import max_error

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(forward, module, x, pad, seed):
    """forward is the module or its compiled wrapper (which shares the module's parameters)."""
    torch.manual_seed(seed)
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = forward(x, key_padding_mask=pad)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_compiled_module_matches_eager(attention, device):
    torch._dynamo.reset()
    module = SkyformerAttention(32, 4, num_kv_heads=2, attention=attention, num_landmarks=8, dropout=0.25,
                                device=device)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(3, 45, 32, device=device)
    pad = torch.arange(45, device=device)[None, :] >= torch.tensor([45, 30, 17], device=device)[:, None]
    for training in (True, False):  # random landmarks + dropout, then strided landmarks, no dropout
        module.train(training)
        with inductor_config.patch(fallback_random=True):
            got = _run(compiled, module, x, pad, seed=11)
        want = _run(module, module, x, pad, seed=11)
        assert max_error(got[0], want[0]) < 1e-4, f"output, training={training}"
        assert max_error(got[1], want[1]) < 1e-4, f"x.grad, training={training}"
        for name, grad in want[2].items():
            assert max_error(got[2][name], grad) < 1e-4 * max(1.0, grad.abs().max().item()), name


BACKENDS = ["torch", "reference", "triton"]


def _functional_run(fn, q, k, v, mask, idx, seed):
    torch.manual_seed(seed)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, mask, idx)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), *(x.grad for x in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_call_follows_changing_sequence_lengths(backend, compiler):
    """A new sequence length recompiles (dynamic=None: then with symbolic sizes) or reuses the symbolic graph
    (dynamic=True): random landmarks (drawn from eager's generator even when compiled) and given
    landmark_indices, forward and backward, equal to eager. fullgraph=True: no graph break on any backend.
    CI traces with dynamo and AOTAutograd (aot_eager, where symbolic sizes meet the code); inductor's code
    generation on top takes minutes on two cores and runs with `make test-slow`. Both dynamic modes are
    compared with one set of eager runs (the interpreter's triton calls are the cost here)."""
    # Two Newton-Schulz iterations through torch and reference (a loop traced more than once); one for triton,
    # whose op is one opaque graph node whatever the count.
    ns_iters = 1 if backend == "triton" else 2

    def attention(q, k, v, mask, idx):
        if idx is None:
            return skyformer_attention(q, k, v, num_landmarks=8, attn_mask=mask, backend=backend, ns_iters=ns_iters)
        return skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend=backend,
                                   ns_iters=ns_iters)

    calls = []  # (n, inputs, idx, eager result) in the order the compiled function sees them
    for n in (17, 29, 40):
        q, k, v = (torch.randn(2, 1, n, 16) for _ in range(3))  # few heads: the interpreter is slow
        mask = torch.arange(n)[None, :] < torch.tensor([n, n - 5])[:, None]
        for idx in (None, torch.tensor([[0, 3, n, n + 2], [1, 2, n + 1, n + 7]])):
            calls.append((n, (q, k, v, mask), idx, _functional_run(attention, q, k, v, mask, idx, seed=n)))
    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(attention, dynamic=dynamic, fullgraph=True, backend=compiler)
        for n, inputs, idx, want in calls:
            got = _functional_run(compiled, *inputs, idx, seed=n)
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                assert max_error(a, b) < 1e-5 * max(1.0, b.abs().max().item()), (dynamic, n, idx is None, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_module_eval_follows_changing_sequence_lengths(backend):
    torch._dynamo.reset()
    # One Newton-Schulz iteration on triton (one opaque op in the graph whatever the count; the interpreter's
    # cost per call); the torch path's loop keeps the default count.
    ns_iters = 1 if backend == "triton" else 6
    module = SkyformerAttention(32, 2, num_landmarks=8, backend=backend, ns_iters=ns_iters).eval()
    compiled = torch.compile(module, dynamic=True)
    for n in (17, 29):
        x = torch.randn(2, n, 32)
        pad = torch.arange(n)[None, :] >= torch.tensor([n, n - 4])[:, None]
        with torch.no_grad():
            assert max_error(compiled(x, key_padding_mask=pad), module(x, key_padding_mask=pad)) < 1e-5
