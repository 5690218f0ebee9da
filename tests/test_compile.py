"""torch.compile(fullgraph=True) of SkyformerAttention: forward and backward, no graph break, same numbers.

fullgraph=True turns any graph break into an error, so a passing compile is the no-break check. Inductor
normally draws its own random numbers; ``fallback_random`` makes it use eager's generator so that the
training-mode landmark sampling of the compiled module can be compared with eager exactly. On a machine
with CUDA the same tests also run on the GPU (the path that dispatches to the fused kernels there).
"""

import pytest
import torch
import torch._inductor.config as inductor_config

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
