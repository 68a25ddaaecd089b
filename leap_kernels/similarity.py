"""Fused trajectory-similarity weight (LeapAlign, Eq. 12-13): ``w = 1 / Σ_i max(d_i, τ)`` per sample.

The distances ``d_i`` come out of the connector kernel already reduced to ``[B, n_leaps]``; this kernel fuses the
clamp, the sum over connection points and the reciprocal into one pass (one read of B·n_leaps floats, one write
of B floats) instead of three PyTorch launches with two temporaries. The weight is a constant of the loss
(``sg(w)``): no gradient flows through it.
"""

from __future__ import annotations

import torch

from leap_kernels.dispatch import Backend, use_triton
from leap_kernels.reference import similarity_weight_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

ROWS_PER_PROGRAM = 64

if triton is not None:

    @triton.jit
    def _similarity_weight_kernel(distance_ptr, weight_ptr, B, L, tau, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_L)
        mask = (rows[:, None] < B) & (cols[None, :] < L)
        d = tl.load(distance_ptr + rows[:, None] * L + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        clamped = tl.where(mask, tl.maximum(d, tau), 0.0)
        total = tl.where(rows < B, tl.sum(clamped, axis=1), 1.0)  # padded rows: avoid 1/0
        tl.store(weight_ptr + rows, 1.0 / total, mask=rows < B)

else:  # pragma: no cover
    _similarity_weight_kernel = None


def similarity_weight_triton(distances: torch.Tensor, tau: float) -> torch.Tensor:
    """Launch the kernel; same contract as :func:`leap_kernels.reference.similarity_weight_reference`."""
    distances = distances.detach().contiguous()
    batch, leaps = distances.shape
    weight = torch.empty(batch, device=distances.device, dtype=torch.float32)
    if batch > 0:
        block_l = max(triton.next_power_of_2(leaps), 1)
        grid = (triton.cdiv(batch, ROWS_PER_PROGRAM),)
        _similarity_weight_kernel[grid](
            distances, weight, batch, leaps, float(tau), BLOCK_B=ROWS_PER_PROGRAM, BLOCK_L=block_l
        )
    return weight


def similarity_weight(distances: torch.Tensor, tau: float = 0.1, *, backend: Backend = "auto") -> torch.Tensor:
    """Trajectory-similarity weight per sample, detached.

    Args:
        distances: ``[B, n_leaps]`` per-sample mean ``|x - x̂|`` at each connection point.
        tau: clamp τ > 0 (paper: 0.1) so that near-identical leaps do not get unbounded weight.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see ``leap_kernels.dispatch``).

    Returns:
        ``[B]`` float32 weights ``1 / Σ_i max(d_i, τ)``.
    """
    if distances.dim() != 2 or distances.shape[1] < 1:
        raise ValueError(f"similarity_weight: distances must be [B, n_leaps], got {tuple(distances.shape)}")
    if not float(tau) > 0.0:
        raise ValueError(f"similarity_weight: tau={tau} must be > 0 (the paper uses 0.1)")
    if use_triton(backend, _similarity_weight_kernel, distances):
        return similarity_weight_triton(distances, tau)
    return similarity_weight_reference(distances, tau)
