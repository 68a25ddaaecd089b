"""Leap trajectories: the LeapAlign maths on a velocity callable, with no model or diffusers dependency.

Conventions (rectified flow): ``x_t = t·ε + (1-t)·x_data`` with t=1 noise and t=0 data; the model predicts
``v ≈ ε - x_data``; an Euler step from t to t' is ``x_{t'} = x_t + (t' - t)·v``, so a one-step leap from t_prev
down to t_next predicts ``x̂ = x_prev - (t_prev - t_next)·v(x_prev, t_prev)``.

The paper's two-step leap (Liang et al., CVPR 2026, Eq. 4-9) from rollout latents x_k, x_j, x_0:

    x̂_{j|k} = x_k - (k - j)·v(x_k)                      one-step leap
    x_j     = x̂_{j|k} + sg(x_j - x̂_{j|k})                latent connector (value x_j, gradient of x̂)
    x̂_{0|j} = x_j - j·v(α·x_j + (1-α)·sg(x_j))           one-step leap, nested gradient discounted by α
    x_0     = x̂_{0|j} + sg(x_0 - x̂_{0|j})                latent connector

:func:`leap_path` builds the same chain through any number of anchors (1, 2 or 3 leaps), with the connectors
computed by the fused kernel :func:`leap_kernels.leap_connector` (exact values: the connected latent *is* the rollout
latent bit for bit, which ``x̂ + (x - x̂).detach()`` is not in floating point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import leap_kernels

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity(x, t) -> v``: x ``[B, ...]`` latents, t ``[B]`` float per-sample times; v has x's shape."""

TimeLike = float | torch.Tensor


@dataclass(frozen=True)
class LeapPath:
    """A leap trajectory through rollout anchors.

    Attributes:
        x0: connected x_0 ``[B, ...]``: equal in value to the rollout's x_0, gradient through the leaps.
        predictions: x̂ at each connection point, in order (``x̂_{j|k}, x̂_{0|j}`` for two leaps).
        connected: the connected latent at each connection point (``connected[-1] is x0``).
        distances: ``[B, n_leaps]`` float32 per-sample mean ``|x - x̂|`` at each connection point, no gradient.
    """

    x0: torch.Tensor
    predictions: tuple[torch.Tensor, ...]
    connected: tuple[torch.Tensor, ...]
    distances: torch.Tensor

    @property
    def n_leaps(self) -> int:
        return len(self.predictions)


def _time_dtype(latent: torch.Tensor) -> torch.dtype:
    # Times are never held in bf16/fp16: 1 - 1/25 is not representable in bf16. float64 latents get float64 times
    # so that float64 checks of the gradient identity stay exact.
    return torch.float64 if latent.dtype == torch.float64 else torch.float32


def _batch_times(t: TimeLike, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(device=device, dtype=dtype) if torch.is_tensor(t) else torch.tensor(float(t), dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(batch).clone()
    if t.shape != (batch,):
        raise ValueError(f"leap_path: a time tensor must be a scalar or [B]=[{batch}], got {tuple(t.shape)}")
    return t


def _broadcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


def leap_path(
    velocity: Velocity,
    latents: Sequence[torch.Tensor],
    times: Sequence[TimeLike],
    alpha: float = 1.0,
    *,
    backend: leap_kernels.dispatch.Backend = "auto",
) -> LeapPath:
    """Build a leap trajectory through rollout anchors (LeapAlign, Eq. 4-9, generalised to n leaps).

    Args:
        velocity: ``velocity(x, t)`` with x ``[B, ...]`` and t ``[B]`` float; called once per leap, in order.
        latents: rollout latents at the anchors, first the start (x_k), last x_0 — ``n_leaps + 1`` tensors
            ``[B, ...]``. Treated as constants (the rollout ran without gradient).
        times: the anchors' times, strictly decreasing, the last one 0. Python floats, 0-d tensors or ``[B]``
            per-sample tensors; any grid works (FLUX's shifted schedule included).
        alpha: gradient discount α ∈ [0, 1] on every leap after the first: its velocity sees
            ``α·x + (1-α)·sg(x)``. α=1 is plain backprop through the leaps, α=0 drops the nested terms.
        backend: connector kernel backend, see :mod:`leap_kernels.dispatch`.

    Returns:
        :class:`LeapPath` with ``x0`` equal in value to ``latents[-1]`` (cast to the leap dtype) and the
        predictions, connected latents and distances of every connection point.

    The leap arithmetic runs in float32 (float64 for float64 latents) whatever the latents' dtype: the rollout
    latents of a bf16 rollout enter exactly, the predictions are not rounded to bf16.
    """
    if len(latents) != len(times):
        raise ValueError(f"leap_path: {len(latents)} latents but {len(times)} times; give one time per anchor")
    if len(latents) < 2:
        raise ValueError("leap_path: need at least 2 anchors (start and x_0) for one leap")
    start = latents[0].detach()
    batch, device = start.shape[0], start.device
    time_dtype = _time_dtype(start)
    # Checked on the host before the times move to the latents' device (times usually arrive as Python floats).
    ts = [_batch_times(t, batch, torch.device("cpu"), time_dtype) for t in times]
    for i, (t_prev, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        if not bool((t_prev > t_next).all()):
            raise ValueError(f"leap_path: times must be strictly decreasing; anchor {i} -> {i + 1} is not")
    if not bool((ts[-1] == 0).all()):
        raise ValueError("leap_path: the last anchor must be x_0 at time 0")
    ts = [t.to(device) for t in ts]
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"leap_path: alpha={alpha} must lie in [0, 1] (the paper uses 0.3 for HPSv2.1)")

    x = start  # the current anchor as the leap sees it: value of the rollout latent
    velocity_input = start
    predictions, connected, distances = [], [], []
    n_leaps = len(latents) - 1
    for i in range(n_leaps):
        t_prev, t_next = ts[i], ts[i + 1]
        v = velocity(velocity_input, t_prev)
        prediction = x - _broadcast(t_prev - t_next, v) * v  # x̂ = x_prev - (t_prev - t_next)·v
        target = latents[i + 1].detach().to(device=prediction.device, dtype=prediction.dtype)
        last = i == n_leaps - 1
        x, velocity_input, distance = leap_kernels.leap_connector(
            prediction, target, alpha, with_velocity_input=not last, backend=backend
        )
        predictions.append(prediction)
        connected.append(x)
        distances.append(distance)
    return LeapPath(
        x0=x, predictions=tuple(predictions), connected=tuple(connected), distances=torch.stack(distances, dim=1)
    )


def similarity_weight(distances: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Trajectory-similarity weight ``sg(1 / Σ_i max(d_i, τ))`` per sample ``[B]`` (Eq. 12-13, fused kernel)."""
    return leap_kernels.similarity_weight(distances, tau)


def hinge(reward: torch.Tensor, lam: float) -> torch.Tensor:
    """Hinge objective ``max(0, λ - r)`` per sample (Eq. 11): no push once the reward reaches λ."""
    # relu, not clamp: at r = λ its gradient is 0 on every torch (torch 2.6's clamp gives −1 there).
    return torch.relu(lam - reward)


# ----------------------------------------------------------------------------------------------------------------
# Anchor sampling


def anchor_times(levels: Sequence[int], grid: torch.Tensor) -> list[float]:
    """Times of anchor ``levels`` on a rollout ``grid`` ``[T+1]`` (position 0 = noise, position T = x_0).

    A level counts grid steps before x_0: level ℓ is grid position ``T - ℓ``, so level 0 is x_0 and level T the
    initial noise.
    """
    num_steps = grid.numel() - 1
    return [float(grid[num_steps - level]) for level in levels]


def anchor_positions(levels: Sequence[int], num_steps: int) -> list[int]:
    """Grid positions (0 = noise, T = x_0) of anchor ``levels``."""
    return [num_steps - level for level in levels]


def anchor_problem(num_steps: int, n_leaps: int, min_level: int, max_level: int, fixed: int | None) -> str | None:
    """What is wrong with an anchor range, as ``setting=value ...; fix`` (the names of LeapAlign's settings), or None.

    The one place the anchor range is checked: the config (``method.leapalign``) and the sampler both ask here.
    """
    if num_steps < 1:
        return f"num_steps={num_steps} must be >= 1"
    if n_leaps < 1:
        return f"n_leaps={n_leaps} must be >= 1"
    if min_level < 1:
        return f"min_level={min_level} must be >= 1 (level 0 is x_0 itself)"
    if max_level > num_steps:
        return f"max_level={max_level} exceeds rollout.num_steps={num_steps}; set max_level <= {num_steps} or null"
    if min_level > max_level:
        return f"min_level={min_level} leaves the anchor range [{min_level}, {max_level}] empty; set it <= {max_level}"
    available = max_level - min_level + 1
    if n_leaps > available:
        return (
            f"n_leaps={n_leaps}: {n_leaps} leaps need {n_leaps} grid levels but [{min_level}, {max_level}] has "
            f"{available}; widen min_level/max_level, raise rollout.num_steps or use fewer leaps"
        )
    if fixed is not None:
        if n_leaps < 2:
            return f"fixed_distance={fixed} spaces consecutive anchors; it needs n_leaps >= 2"
        widest = (max_level - min_level) // (n_leaps - 1)
        if fixed < 1 or fixed > widest:
            return (
                f"fixed_distance={fixed} does not fit {n_leaps} anchors in [{min_level}, {max_level}]; "
                f"use 1 <= fixed_distance <= {widest}"
            )
    return None


class AnchorSampler:
    """Draws leap anchors on a rollout grid of T steps from a generator shared by every rank.

    Anchors are *levels*: the number of grid steps before x_0 (level T is the noise x_1, level 0 is x_0). A draw
    is ``n_leaps`` distinct levels ``k > j > …`` in ``[min_level, max_level]`` followed by 0.

    Modes (LeapAlign, Sec. 4.4 ablations):
        - default: a uniformly random set of distinct levels over the whole trajectory (levels 1..T) — "randomly
          select two timesteps k > j", the paper's choice;
        - restricted range: ``min_level``/``max_level`` narrow it (e.g. ``max_level=T//2`` keeps anchors in the
          later half of the trajectory);
        - fixed distance: consecutive anchors exactly ``fixed_distance`` levels apart, the top one uniform.

    The generator is a private ``torch.Generator`` seeded identically on every rank and untouched by the global RNG:
    every rank draws the same anchors and so makes the same sequence of transformer calls (ZeRO-3 needs it).
    """

    def __init__(
        self,
        num_steps: int,
        n_leaps: int = 2,
        *,
        min_level: int = 1,
        max_level: int | None = None,
        fixed_distance: int | None = None,
        seed: int = 0,
    ):
        max_level = num_steps if max_level is None else max_level
        problem = anchor_problem(num_steps, n_leaps, min_level, max_level, fixed_distance)
        if problem:
            raise ValueError(f"anchor sampling: {problem}")
        self.num_steps = num_steps
        self.n_leaps = n_leaps
        self.min_level = min_level
        self.max_level = max_level
        self.fixed_distance = fixed_distance
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def sample(self) -> tuple[int, ...]:
        """Next anchor levels, strictly decreasing and ending with 0 (x_0): ``(k, j, 0)`` for two leaps."""
        if self.fixed_distance is None:
            available = self.max_level - self.min_level + 1
            picks = torch.randperm(available, generator=self.generator)[: self.n_leaps] + self.min_level
            levels = sorted(picks.tolist(), reverse=True)
        else:
            span = (self.n_leaps - 1) * self.fixed_distance
            low = self.min_level + span
            top = int(torch.randint(low, self.max_level + 1, (1,), generator=self.generator))
            levels = [top - i * self.fixed_distance for i in range(self.n_leaps)]
        return (*levels, 0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
