"""Fused connector and similarity-weight kernels against their PyTorch references.

Run on CPU under TRITON_INTERPRET=1 (set by tests/conftest.py) with small irregular shapes; bf16 numerics on
compiled kernels and large shapes are GPU tests.
"""

from __future__ import annotations

import pytest
import torch

import leap_kernels.connector as connector
from leap_kernels import leap_connector, similarity_weight
from leap_kernels.dispatch import is_interpreted
from leap_kernels.reference import connector_forward_reference, similarity_weight_reference

# dtype -> (rtol, atol) for values that are computed (not copied). The backward kernel adds in float32 and rounds
# once; the reference rounds α·g to the dtype, then the sum: up to one ulp apart (bf16 ulp = 2^-8 relative).
TOLERANCE = {
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}
# Odd batch, odd spatial sizes, lengths below, at and across the block (4096), not multiples of it.
SHAPES = [(1, 7), (3, 5, 7), (5, 3, 11, 13), (2, 4097), (3, 2, 4096 + 1000)]

pytestmark = pytest.mark.skipif(
    not is_interpreted(connector._connector_fwd_kernel) and not torch.cuda.is_available(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)",
)


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    a, e = actual.float(), expected.float()
    bad = (a - e).abs() > atol + rtol * e.abs()
    if bad.any():
        diff = (a - e).abs()
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): max diff {diff.max():.3e}, mean diff {diff.mean():.3e}, first mismatch at {first}: "
            f"kernel {a[first].item():.6g} vs reference {e[first].item():.6g} (rtol {rtol}, atol {atol})"
        )


def make_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g).to(dtype)
    prediction = (target.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    return prediction, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_velocity_input", [True, False])
def test_forward_matches_reference(dtype, shape, with_velocity_input):
    prediction, target = make_inputs(shape, dtype)
    c_k, v_k, d_k = connector.connector_forward_triton(prediction, target, with_velocity_input)
    c_r, v_r, d_r = connector_forward_reference(prediction, target, with_velocity_input)
    # Latent outputs are copies of the rollout latent: bit for bit, in both implementations.
    assert torch.equal(c_k, target) and torch.equal(c_r, target)
    if with_velocity_input:
        assert torch.equal(v_k, target) and torch.equal(v_r, target)
    else:
        assert v_k is None and v_r is None
    assert d_k.dtype == torch.float32 and d_k.shape == (shape[0],)
    # Distances are float32 sums in a different order: float32 tolerance whatever the input dtype.
    assert_close_report(d_k, d_r, torch.float32, "distance")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_prediction_gradient_matches_reference(dtype, shape, alpha):
    prediction, target = make_inputs(shape, dtype)
    g = torch.Generator().manual_seed(1)
    grad_connected = torch.randn(shape, generator=g).to(dtype)
    grad_velocity_input = torch.randn(shape, generator=g).to(dtype)
    grads = {}
    for backend in ("triton", "reference"):
        p = prediction.clone().requires_grad_(True)
        connected, velocity_input, _ = leap_connector(p, target, alpha, backend=backend)
        torch.autograd.backward([connected, velocity_input], [grad_connected, grad_velocity_input])
        grads[backend] = p.grad
    assert_close_report(grads["triton"], grads["reference"], dtype, "grad_prediction")
    expected = (grad_connected.double() + alpha * grad_velocity_input.double()).to(dtype)
    assert_close_report(grads["reference"], expected, dtype, "grad_prediction vs formula")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_single_used_output_gives_its_gradient(backend):
    prediction, target = make_inputs((3, 9), torch.float32)
    p = prediction.clone().requires_grad_(True)
    _, velocity_input, _ = leap_connector(p, target, 0.3, backend=backend)
    (2.0 * velocity_input).sum().backward()  # only the velocity input is used: 0.3 · 2
    torch.testing.assert_close(p.grad, torch.full_like(p, 0.6))
    p.grad = None
    connected, _, distance = leap_connector(p, target, 0.3, with_velocity_input=False, backend=backend)
    connected.sum().backward()
    torch.testing.assert_close(p.grad, torch.ones_like(p))
    assert not distance.requires_grad


def test_reference_gradcheck_float64():
    """gradcheck where the straight-through gradient is the true one: the rollout latent tracks x̂ (x = x̂ + c).

    ``target`` is recomputed from the perturbed x̂ at every finite difference, so numerically both latent outputs
    move with x̂ at rate 1 — exactly the identity Jacobian the connector's backward claims (α = 1).
    """
    offset = torch.randn(3, 5, dtype=torch.float64)

    def fn(prediction):
        connected, velocity_input, _ = leap_connector(
            prediction, prediction.detach() + offset, 1.0, backend="reference"
        )
        return connected, velocity_input

    assert torch.autograd.gradcheck(fn, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_velocity_input_jacobian_is_the_discounted_expression(alpha):
    """velocity_input has the Jacobian of α·x_c + (1-α)·sg(x_c) with x_c = x̂ + sg(x - x̂): α·I."""
    target = torch.randn(3, 5, dtype=torch.float64)
    prediction = torch.randn(3, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda p: leap_connector(p, target, alpha)[1], prediction)

    def expression(p):
        connected = p + (target - p).detach()
        return alpha * connected + (1 - alpha) * connected.detach()

    expected = torch.autograd.functional.jacobian(expression, prediction)
    torch.testing.assert_close(jac, expected)
    torch.testing.assert_close(jac.reshape(15, 15), alpha * torch.eye(15, dtype=torch.float64))


@pytest.mark.parametrize("batch", [1, 5, 64, 130])
@pytest.mark.parametrize("leaps", [1, 2, 3])
def test_similarity_weight_kernel_matches_reference(batch, leaps):
    g = torch.Generator().manual_seed(batch * 10 + leaps)
    distances = 0.2 * torch.rand(batch, leaps, generator=g)  # straddles τ = 0.1: both clamp branches
    got = similarity_weight(distances, 0.1, backend="triton")
    assert_close_report(got, similarity_weight_reference(distances, 0.1), torch.float32, "similarity weight")


def test_triton_backend_refuses_what_it_cannot_run():
    p = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        leap_connector(p, p, 0.3, backend="triton")
    with pytest.raises(ValueError, match="backend='fast'"):
        leap_connector(p, p, 0.3, backend="fast")
    with pytest.raises(ValueError, match="must match in shape, dtype and device"):
        leap_connector(p, p.float(), 0.3)
    with pytest.raises(ValueError, match="tau=0"):
        similarity_weight(torch.ones(2, 2), 0.0)


def test_auto_dispatch_uses_triton_here_and_reference_for_float64(monkeypatch):
    calls = []

    def fake_forward(prediction, target, with_velocity_input):
        calls.append("triton")
        return connector_forward_reference(prediction, target, with_velocity_input)

    monkeypatch.setattr(connector, "connector_forward_triton", fake_forward)
    p = torch.zeros(2, 3)
    leap_connector(p, p, 0.3)
    assert calls == ["triton"]
    leap_connector(p.double(), p.double(), 0.3)  # no float64 kernel: reference, silently and correctly
    assert calls == ["triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4096, 64), (2, 8100, 64), (2, 16, 90, 90)], ids=str)
def test_compiled_kernels_at_model_sizes(dtype, shape):
    prediction, target = (t.cuda() for t in make_inputs(shape, dtype))
    c_k, v_k, d_k = connector.connector_forward_triton(prediction, target, True)
    c_r, _, d_r = connector_forward_reference(prediction, target, True)
    assert torch.equal(c_k, target) and torch.equal(v_k, target)
    assert_close_report(d_k, d_r, torch.float32, "distance")
