"""Pure-PyTorch references for the fused kernels.

These are the definitions the Triton kernels are tested against; they never change to agree with a kernel.
Bytes moved are annotated per line for a flattened latent of N elements of E bytes per sample and B samples,
as the Triton tutorials do: they are the budget the fused kernel is measured against
(``benchmarks/connector_bandwidth.py``).
"""

from __future__ import annotations

import torch


def connector_forward_reference(
    prediction: torch.Tensor, target: torch.Tensor, with_velocity_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward values of the latent connector.

    Args:
        prediction: x̂, the leap's prediction of the rollout latent, ``[B, ...]``.
        target: x, the rollout latent at the same time, same shape and dtype.
        with_velocity_input: also return the (equal-valued) input of the next leap's velocity call.

    Returns:
        ``(connected, velocity_input, distance)``: ``connected`` and ``velocity_input`` are copies of ``target``
        (bit for bit; gradients are routed by the autograd function, not by arithmetic), ``distance`` is the
        per-sample mean ``|x - x̂|`` in float32, shape ``[B]``.
    """
    connected = target.clone()  # read B·N·E, write B·N·E
    velocity_input = target.clone() if with_velocity_input else None  # read B·N·E, write B·N·E
    # |x - x̂| in float32: read 2·B·N·E, plus float32 temporaries of B·N·4 bytes for the upcast, difference and abs.
    diff = target.detach().flatten(1).float() - prediction.detach().flatten(1).float()
    distance = diff.abs().mean(dim=1)  # read B·N·4, write B·4
    # Total, with the velocity input: ~6·B·N·E moved plus ~4 float32 temporaries. The fused kernel moves 4·B·N·E.
    return connected, velocity_input, distance


def connector_backward_reference(
    grad_connected: torch.Tensor | None, grad_velocity_input: torch.Tensor | None, alpha: float
) -> torch.Tensor | None:
    """Gradient reaching the prediction: ``grad_connected + alpha * grad_velocity_input``.

    The connector passes its gradient straight to x̂ (``x = x̂ + sg(x - x̂)``); the velocity input
    ``alpha·x + (1-alpha)·sg(x)`` passes ``alpha`` of its gradient to x and so to x̂ (gradient discounting).
    """
    if grad_velocity_input is None:
        return grad_connected  # no bytes moved
    scaled = grad_velocity_input * alpha  # read B·N·E, write B·N·E
    if grad_connected is None:
        return scaled
    return grad_connected + scaled  # read 2·B·N·E, write B·N·E  (fused kernel: read 2·B·N·E, write B·N·E)


def similarity_weight_reference(distances: torch.Tensor, tau: float) -> torch.Tensor:
    """Trajectory-similarity weight ``w = 1 / Σ_i max(d_i, τ)`` per sample (LeapAlign, Eq. 12-13).

    Args:
        distances: ``[B, n_leaps]`` per-sample connector distances.
        tau: the clamp τ > 0 that keeps near-identical pairs from dominating.

    Returns:
        ``[B]`` float32 weights, detached (the loss uses ``sg(w)``).
    """
    return 1.0 / distances.detach().float().clamp_min(tau).sum(dim=1)
