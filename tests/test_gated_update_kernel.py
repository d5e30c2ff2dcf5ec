"""The fused gated update (``salgl.layers._FusedGatedUpdate`` on the native kernels) against the
plain PyTorch ops of ``GatedPropagation.update_with_torch_ops`` in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from salgl import native
from salgl.layers import GatedPropagation
from tests._native import cpu_path, needs_compiler  # noqa: F401 (cpu_path is a fixture)

B, N = 3, 5


def _outputs_and_grads(prop: GatedPropagation, h: Tensor, graph: Tensor, grad: Tensor, *, fused: bool,
                       monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """One forward + backward, on the fused update or (``SALGL_NATIVE_KERNELS=0``) the torch ops."""
    monkeypatch.setenv("SALGL_NATIVE_KERNELS", "1" if fused else "0")
    prop.zero_grad()
    h = h.detach().clone().requires_grad_()
    out = prop(h, graph)
    out.backward(grad.to(out.dtype))
    return [out.detach(), h.grad, *(p.grad for p in prop.parameters())]


def _case(dim: int, steps: int, message: str, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = GatedPropagation(dim, steps=steps, message=message).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(scale)
    h = torch.randn(B, N, dim, generator=gen, dtype=torch.float64)
    graph = torch.rand(B, N, N, generator=gen, dtype=torch.float64)
    grad = torch.randn(B, N, dim, generator=gen, dtype=torch.float64)
    single = GatedPropagation(dim, steps=steps, message=message)
    single.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    return reference, single, h, graph, grad


@needs_compiler
@pytest.mark.parametrize("message", ["in", "out", "both"])
@pytest.mark.parametrize("dim, steps", [(37, 3), (64, 1), (1, 2)])  # vector tails, whole vectors, scalar
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_matches_float64_torch_ops(message: str, dim: int, steps: int, threads: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs and every gradient within 1e-5 of the magnitude of the float64 values: float32's
    rounding, as the float32 PyTorch ops have (checked alongside)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reference, single, h, graph, grad = _case(dim, steps, message, scale=2.0)
        expected = _outputs_and_grads(reference, h, graph, grad, fused=False, monkeypatch=monkeypatch)
        fused = _outputs_and_grads(single, h.float(), graph.float(), grad, fused=True, monkeypatch=monkeypatch)
        assert native.usable(h.float())  # the fused path really ran: the build did not fall back
        plain = _outputs_and_grads(single, h.float(), graph.float(), grad, fused=False, monkeypatch=monkeypatch)
    finally:
        torch.set_num_threads(previous)
    for e, f, p in zip(expected, fused, plain, strict=True):
        tolerance = 1e-5 * e.abs().max().item()
        torch.testing.assert_close(f.double(), e, atol=tolerance, rtol=0)
        torch.testing.assert_close(p.double(), e, atol=tolerance, rtol=0)


def test_saturated_gates_and_nan(cpu_path: str) -> None:
    """Pre-activations far beyond the logistic's range give gates of exactly 0 or 1 (h' = h or
    h' = c); a NaN in one image's node state poisons that node only, not another image's."""
    prop = GatedPropagation(4, steps=1, message="in")
    with torch.no_grad():
        for p in prop.parameters():
            p.zero_()
        prop.input_proj.bias[:4] = torch.tensor([1e4, -1e4, 1e30, -1e30])  # z: 1, 0, 1, 0
        prop.input_proj.bias[8:] = 1e4  # c = tanh(large) = 1
    h = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[float("nan"), 0.5, 0.5, 0.5]]])  # (2, 1, 4): one node each
    out = prop(h, torch.ones(2, 1, 1))
    assert out[0, 0].tolist() == [1.0, 0.5, 1.0, 0.5]
    assert out[1, 0].isnan().all()


def test_frozen_parameters_and_state_without_grad(cpu_path: str) -> None:
    """Gradients only where asked: a frozen propagation still passes the gradient to its input."""
    _, single, h, graph, grad = _case(8, 2, "both", seed=1)
    single.requires_grad_(False)
    h32 = h.float().requires_grad_()
    single(h32, graph.float()).backward(grad.float())
    assert h32.grad is not None and h32.grad.abs().sum() > 0
    assert all(p.grad is None for p in single.parameters())
    with torch.no_grad():
        assert single(h.float(), graph.float()).shape == h.shape


@pytest.mark.parametrize("batch", [0, 1])
def test_empty_and_single_node_batches(batch: int, cpu_path: str) -> None:
    prop = GatedPropagation(8, steps=2, message="both")
    h = torch.randn(batch, 1, 8, requires_grad=True)
    out = prop(h, torch.ones(batch, 1, 1))
    out.sum().backward()
    assert out.shape == h.shape and h.grad.shape == h.shape


@needs_compiler
def test_autocast_uses_the_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU autocast the matmuls would run in bfloat16, which the float32 kernels cannot read."""
    monkeypatch.setenv("SALGL_NATIVE_KERNELS", "1")
    assert native.usable(torch.zeros(1))
    prop = GatedPropagation(8, steps=1, message="in")
    h, graph = torch.randn(2, 3, 8), torch.rand(2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prop(h, graph)
        expected = prop.update_with_torch_ops(prop.gather(h, graph), h)
    torch.testing.assert_close(out, expected)
