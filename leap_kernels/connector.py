"""Fused latent connector for leap trajectories (LeapAlign, Eq. 5, 7, 9, 12).

At a connection point the leap's prediction x̂ meets the rollout latent x. LeapAlign needs three things there:

- the connected latent ``x̂ + sg(x - x̂)``: the value of x, the gradient of x̂;
- the next leap's velocity input ``α·x_c + (1-α)·sg(x_c)``: the value of x again, ``α`` of the gradient;
- the per-sample distance ``d = mean|x - x̂|`` for the trajectory-similarity weight.

Written as PyTorch arithmetic this is several full-size passes and temporaries, and ``x̂ + (x - x̂)`` is not x
bit for bit in floating point. The forward kernel reads x̂ and x once, writes x twice (exact copies) and a
per-block partial sum of ``|x - x̂|`` (float32). The backward kernel reads the two incoming gradients and writes
``grad_connected + α·grad_velocity_input``: the only gradient the connector has is to x̂ (x is a constant of the
rollout).

Budget per call, N elements of E bytes per sample, B samples: forward moves 4·B·N·E (the reference ~6·B·N·E plus
float32 temporaries), backward 3·B·N·E.
"""

from __future__ import annotations

import torch

from leap_kernels.dispatch import Backend, use_triton
from leap_kernels.reference import connector_backward_reference, connector_forward_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# Elements per program. 4096 keeps ≥ 32 programs per sample at FLUX 720² (90·90·16 = 129,600 elements) and the
# partial-sum buffer at B·N/4096 floats.
FORWARD_BLOCK = 4096
BACKWARD_BLOCK = 4096


if triton is not None:

    @triton.jit
    def _connector_fwd_kernel(
        prediction_ptr,
        target_ptr,
        connected_ptr,
        velocity_input_ptr,
        partial_ptr,
        N,
        num_blocks,
        WRITE_VELOCITY_INPUT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Grid (B, cdiv(N, BLOCK)): one program per block of one sample, so the distance reduction never mixes
        # samples and the partial sums are summed in a fixed order (deterministic, unlike atomics).
        row = tl.program_id(0)
        block = tl.program_id(1)
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        base = row.to(tl.int64) * N
        x_hat = tl.load(prediction_ptr + base + offsets, mask=mask, other=0.0)
        x = tl.load(target_ptr + base + offsets, mask=mask, other=0.0)
        tl.store(connected_ptr + base + offsets, x, mask=mask)
        if WRITE_VELOCITY_INPUT:
            tl.store(velocity_input_ptr + base + offsets, x, mask=mask)
        abs_diff = tl.abs(x.to(tl.float32) - x_hat.to(tl.float32))  # masked lanes are 0 - 0
        tl.store(partial_ptr + row * num_blocks + block, tl.sum(abs_diff, axis=0))

    @triton.jit
    def _connector_bwd_kernel(
        grad_connected_ptr,
        grad_velocity_input_ptr,
        grad_prediction_ptr,
        numel,
        alpha,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        grad_connected = tl.load(grad_connected_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_velocity_input = tl.load(grad_velocity_input_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = grad_connected + alpha * grad_velocity_input  # one rounding, in float32
        tl.store(grad_prediction_ptr + offsets, grad.to(grad_prediction_ptr.dtype.element_ty), mask=mask)

else:  # pragma: no cover
    _connector_fwd_kernel = _connector_bwd_kernel = None


def connector_forward_triton(
    prediction: torch.Tensor, target: torch.Tensor, with_velocity_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel; same contract as :func:`leap_kernels.reference.connector_forward_reference`."""
    batch = target.shape[0]
    prediction_2d = prediction.detach().reshape(batch, -1).contiguous()
    target_2d = target.detach().reshape(batch, -1).contiguous()
    n = target_2d.shape[1]
    num_blocks = triton.cdiv(n, FORWARD_BLOCK)
    connected = torch.empty_like(target_2d)
    velocity_input = torch.empty_like(target_2d) if with_velocity_input else connected  # unused pointer if off
    partial = torch.empty(batch, num_blocks, device=target.device, dtype=torch.float32)
    if batch > 0 and n > 0:
        _connector_fwd_kernel[(batch, num_blocks)](
            prediction_2d,
            target_2d,
            connected,
            velocity_input,
            partial,
            n,
            num_blocks,
            WRITE_VELOCITY_INPUT=with_velocity_input,
            BLOCK=FORWARD_BLOCK,
        )
    distance = partial.sum(dim=1) / n  # [B]: B·num_blocks floats, negligible
    return (
        connected.view(target.shape),
        velocity_input.view(target.shape) if with_velocity_input else None,
        distance,
    )


def connector_backward_triton(
    grad_connected: torch.Tensor | None, grad_velocity_input: torch.Tensor | None, alpha: float
) -> torch.Tensor | None:
    """Launch the backward kernel where both gradients exist; a single gradient needs no kernel."""
    if grad_connected is None or grad_velocity_input is None:
        return connector_backward_reference(grad_connected, grad_velocity_input, alpha)
    grad_connected = grad_connected.contiguous()
    grad_velocity_input = grad_velocity_input.contiguous()
    grad_prediction = torch.empty_like(grad_connected)
    numel = grad_connected.numel()
    if numel > 0:
        grid = (triton.cdiv(numel, BACKWARD_BLOCK),)
        _connector_bwd_kernel[grid](
            grad_connected, grad_velocity_input, grad_prediction, numel, float(alpha), BLOCK=BACKWARD_BLOCK
        )
    return grad_prediction


class LeapConnectorFunction(torch.autograd.Function):
    """``(x̂, x) -> (x, x, mean|x - x̂|)`` with the gradient of both latent outputs routed to x̂ (α for the second)."""

    @staticmethod
    def forward(ctx, prediction, target, alpha: float, with_velocity_input: bool, triton_kernels: bool):
        forward_impl = connector_forward_triton if triton_kernels else connector_forward_reference
        connected, velocity_input, distance = forward_impl(prediction, target, with_velocity_input)
        ctx.alpha = alpha
        ctx.triton_kernels = triton_kernels
        ctx.prediction_dtype = prediction.dtype
        ctx.mark_non_differentiable(distance)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors, no work
        return connected, velocity_input, distance

    @staticmethod
    def backward(ctx, grad_connected, grad_velocity_input, grad_distance):
        backward_impl = connector_backward_triton if ctx.triton_kernels else connector_backward_reference
        grad_prediction = backward_impl(grad_connected, grad_velocity_input, ctx.alpha)
        return grad_prediction, None, None, None, None


def leap_connector(
    prediction: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    *,
    with_velocity_input: bool = True,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Connect a leap prediction to the rollout latent.

    Args:
        prediction: x̂ ``[B, ...]``, differentiable (the leap's output).
        target: x ``[B, ...]``, the rollout latent at the same time; same shape and dtype. Treated as a constant.
        alpha: gradient discount α ∈ [0, 1] applied through ``velocity_input`` (Eq. 9).
        with_velocity_input: return the next leap's velocity input; ``False`` at the last connection (x_0),
            which feeds no further leap, saves one write of the latent.
        backend: ``"auto"`` (Triton on CUDA, or on CPU under ``TRITON_INTERPRET=1``; the reference otherwise),
            ``"triton"`` (error if it cannot run) or ``"reference"``.

    Returns:
        ``connected`` (value of ``target`` bit for bit, gradient straight to ``prediction``), ``velocity_input``
        (value of ``target`` bit for bit, ``alpha`` times its gradient to ``prediction``; ``None`` when not asked
        for) and ``distance`` ``[B]`` float32, the per-sample mean ``|target - prediction|`` (no gradient).
    """
    if prediction.shape != target.shape or prediction.dtype != target.dtype or prediction.device != target.device:
        raise ValueError(
            f"leap_connector: prediction {tuple(prediction.shape)} {prediction.dtype} {prediction.device} and target "
            f"{tuple(target.shape)} {target.dtype} {target.device} must match in shape, dtype and device; "
            "cast the rollout latent to the prediction's dtype and device first"
        )
    if prediction.dim() < 1:
        raise ValueError("leap_connector: tensors need a leading batch dimension [B, ...]")
    # alpha is checked once, where users set it (method.leapalign.alpha) and where the maths takes it (leap_path).
    triton_kernels = use_triton(backend, _connector_fwd_kernel, prediction, target)
    return LeapConnectorFunction.apply(prediction, target, float(alpha), with_velocity_input, triton_kernels)
