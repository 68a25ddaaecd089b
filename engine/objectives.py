"""Training objectives: LeapAlign and the direct-gradient baselines it is compared with, on the same rollouts.

Every objective works the same way around one no-grad rollout (``engine.rollout``):

1. ``plan()`` draws the objective's random choices (leap anchors, stop steps) from a generator that is identical on
   every rank, and names the grid positions the rollout must cache;
2. the trainer runs the rollout, keeping those positions on CPU;
3. ``forward_backward(batch, plan)`` runs the gradient passes and calls ``batch.backward`` on each loss term
   (a DeepSpeed engine's ``backward`` in training, ``Tensor.backward`` in tests). Each term is freed before the
   next is built, so peak memory is one term's graph.

Grid positions: 0 is the noise x_1, T is x_0; a *level* is T − position (grid steps left before x_0).

All objectives minimise the same hinge criterion ``max(0, λ − r)`` of the same reward, so they differ only in
where the gradient comes from. ``reward`` in each output is the reward of the real generated x_0 of this
rollout, so methods are compared on one metric; baselines that train on a prediction x̂_0 report its reward
as ``reward_trained``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.leap import AnchorSampler, anchor_positions, leap_path, similarity_weight
from engine.models.base import Conditioning, FlowModelAdapter
from engine.rollout import Trajectory

Criterion = Callable[[torch.Tensor, Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
"""``criterion(images, prompts) -> (raw_loss [B], reward [B])``: images ``[B, 3, H, W]`` in [0, 1]; the raw loss
is the hinge ``Σ_i w_i·max(0, λ_i − r_i)`` (``engine.rewards.RewardCriterion``), differentiable w.r.t. the pixels."""


@dataclass
class StepBatch:
    """What one objective step needs besides its plan.

    Attributes:
        adapter: the model adapter (velocity, decode, time grid).
        cond: encoded prompts on the training device.
        prompts: the prompts, for the reward.
        trajectory: the rollout, with the plan's positions cached on CPU.
        criterion: images and prompts → (hinge loss, reward), per sample.
        height, width: image size in pixels.
        guidance_scale: FLUX's distilled guidance / SD3's CFG scale, as in the rollout.
        transformer: the module that runs gradient passes (a DeepSpeed engine in training); None = the adapter's.
        backward: called once per loss term; default ``Tensor.backward``.
        generator: this rank's own noise stream (DRaFT-LV's re-noising); never shared across ranks.
        dtype: dtype of the latents in gradient passes (leap arithmetic is float32 whatever this is).
    """

    adapter: FlowModelAdapter
    cond: Conditioning
    prompts: Sequence[str]
    trajectory: Trajectory
    criterion: Criterion
    height: int
    width: int
    guidance_scale: float
    transformer: nn.Module | None = None
    backward: Callable[[torch.Tensor], None] = field(default=lambda loss: loss.backward())
    generator: torch.Generator | None = None
    dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity with gradient through ``transformer``: x ``[B, ...]``, t ``[B]``."""
        return self.adapter.velocity(
            x,
            t,
            self.cond,
            guidance_scale=self.guidance_scale,
            transformer=self.transformer,
            height=self.height,
            width=self.width,
        )

    def latent(self, position: int) -> torch.Tensor:
        return self.trajectory.latent(position, device=self.device, dtype=torch.float32)

    def time(self, position: int) -> float:
        return float(self.trajectory.times[position])

    def times(self, position: int) -> torch.Tensor:
        """The time of ``position`` as a ``[B]`` float32 tensor on the device."""
        return torch.full((len(self.prompts),), self.time(position), device=self.device, dtype=torch.float32)

    def losses(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw_loss [B], reward [B])`` of latents x0, decoded to pixels; differentiable w.r.t. x0."""
        return self.criterion(self.adapter.decode(x0, self.height, self.width), self.prompts)


@dataclass
class Plan:
    """An objective's draws for one step: the positions the rollout caches and what the objective does there."""

    positions: set[int]
    draws: dict = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    """Detached results of one step, for logging (no host sync here: tensors stay on the device).

    Attributes:
        loss: scalar, the objective's loss value.
        reward: ``[B]`` reward of the rollout's real x_0.
        metrics: extra per-method scalars (tensors or Python numbers).
    """

    loss: torch.Tensor
    reward: torch.Tensor
    metrics: dict = field(default_factory=dict)


class Objective(Protocol):
    """One training method: plan the step's random choices, then run its gradient passes."""

    name: str
    num_steps: int

    def plan(self) -> Plan: ...

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _SharedGenerator:
    """A seeded CPU generator shared by all ranks (the same draws everywhere), with resumable state."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _real_reward(batch: StepBatch) -> torch.Tensor:
    """Reward of the rollout's x_0, without gradient (the common metric of every method)."""
    with torch.no_grad():
        return batch.losses(batch.latent(batch.trajectory.num_steps))[1].detach()


# --------------------------------------------------------------------------------------------------------------------
# LeapAlign


class LeapAlign:
    """LeapAlign (Liang et al., CVPR 2026): reward gradients through an n-step leap trajectory.

    Per step: draw anchors ``k > j > … > 0`` uniformly over the trajectory (shared generator), build the leap path
    through the cached rollout latents (``engine.leap.leap_path``, α-discounted nested gradient), and minimise
    ``L = sg(w)·max(0, λ − r(x_0))`` with ``w = 1 / Σ max(d_i, τ)``. The reward scores the real rollout x_0.

    Reward-gradient decoupling (``decouple_reward``): the connected x_0 has the rollout's value, so
    ``g = ∂L_raw/∂x_0`` does not depend on the leap. It is computed once through decode and reward, that graph is
    freed, then ``Σ_b sg(w_b)·⟨g_b, x̂_0,b⟩ / B`` is backpropagated through the leap passes: the same parameter
    gradient, with peak memory max(reward graph, leap graph) instead of their sum, and one reward evaluation for
    ``pairs_per_rollout`` leap paths (their gradients are averaged).
    """

    name = "leapalign"

    def __init__(
        self,
        num_steps: int,
        *,
        n_leaps: int = 2,
        alpha: float = 0.3,
        tau: float = 0.1,
        use_similarity_weight: bool = True,
        min_level: int = 1,
        max_level: int | None = None,
        fixed_distance: int | None = None,
        pairs_per_rollout: int = 1,
        decouple_reward: bool = True,
        seed: int = 0,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"LeapAlign: alpha={alpha} must lie in [0, 1]")
        if tau <= 0:
            raise ValueError(f"LeapAlign: tau={tau} must be > 0")
        if pairs_per_rollout < 1:
            raise ValueError(f"LeapAlign: pairs_per_rollout={pairs_per_rollout} must be >= 1")
        self.num_steps = num_steps
        self.n_leaps = n_leaps
        self.alpha = alpha
        self.tau = tau
        self.use_similarity_weight = use_similarity_weight
        self.pairs_per_rollout = pairs_per_rollout
        self.decouple_reward = decouple_reward
        self.sampler = AnchorSampler(
            num_steps, n_leaps, min_level=min_level, max_level=max_level, fixed_distance=fixed_distance, seed=seed
        )

    def plan(self) -> Plan:
        level_sets = [self.sampler.sample() for _ in range(self.pairs_per_rollout)]
        positions = {p for levels in level_sets for p in anchor_positions(levels, self.num_steps)}
        return Plan(positions=positions, draws={"levels": level_sets})

    def _path(self, batch: StepBatch, levels: Sequence[int]):
        positions = anchor_positions(levels, self.num_steps)
        latents = [batch.latent(p) for p in positions]
        times = [batch.time(p) for p in positions]
        return leap_path(batch.velocity, latents, times, self.alpha)

    def _weight(self, distances: torch.Tensor) -> torch.Tensor:
        if self.use_similarity_weight:
            return similarity_weight(distances, self.tau)
        return torch.ones(distances.shape[0], device=distances.device)

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput:
        level_sets = plan.draws["levels"]
        pairs = len(level_sets)
        x0 = batch.latent(self.num_steps)
        if self.decouple_reward:
            # Phase 1: g = ∂ max(0, λ − r(x_0)) / ∂x_0 through decode and reward; samples are independent, so the
            # gradient of the sum is each sample's own gradient. The reward graph is freed when this returns.
            x0_leaf = x0.detach().requires_grad_(True)
            raw, reward = batch.losses(x0_leaf)
            (g,) = torch.autograd.grad(raw.sum(), x0_leaf)
            reward, raw = reward.detach(), raw.detach()
        weights, distances = [], []
        for levels in level_sets:
            # Phase 2: one leap graph at a time.
            path = self._path(batch, levels)
            w = self._weight(path.distances)
            if self.decouple_reward:
                surrogate = (w * (g * path.x0).flatten(1).sum(dim=1)).mean()
            else:
                raw_graph, reward = batch.losses(path.x0)
                surrogate = (w * raw_graph).mean()
                reward, raw = reward.detach(), raw_graph.detach()
            batch.backward(surrogate / pairs)
            weights.append(w)
            distances.append(path.distances)
        w = torch.stack(weights).mean(dim=0)
        d = torch.stack(distances).mean(dim=0)  # [B, n_leaps], averaged over pairs
        first = level_sets[0]
        metrics = {
            "w": w.mean(),
            "d_0": d[:, -1].mean(),
            "k": first[0],
            "t_k": batch.time(self.num_steps - first[0]),
            "loss_raw": raw.mean(),
        }
        if self.n_leaps >= 2:
            metrics.update(d_j=d[:, 0].mean(), j=first[1], t_j=batch.time(self.num_steps - first[1]))
        return ObjectiveOutput(loss=(w * raw).mean(), reward=reward, metrics=metrics)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


# --------------------------------------------------------------------------------------------------------------------
# Full-trajectory backprop (and DRaFT-K)


class FullBackprop:
    """Backpropagation through the sampling chain (DRaFT, Clark et al. 2023; AlignProp, Prabhudesai et al. 2023).

    ``truncate_steps=None`` differentiates through all T Euler steps from the noise; ``truncate_steps=K`` starts the
    differentiable chain at the cached rollout latent K steps before x_0 (DRaFT-K). ``checkpoint_steps`` recomputes
    each step's activations in backward (``torch.utils.checkpoint``, non-reentrant), so memory grows with one latent
    per step rather than one model graph per step. The reward scores the differentiable chain's x_0, which equals
    the rollout's x_0 up to the rollout's bf16 rounding.
    """

    name = "full_backprop"

    def __init__(self, num_steps: int, *, truncate_steps: int | None = None, checkpoint_steps: bool = True, seed=0):
        if truncate_steps is not None and not 1 <= truncate_steps <= num_steps:
            raise ValueError(f"FullBackprop: truncate_steps={truncate_steps} must lie in [1, {num_steps}]")
        self.num_steps = num_steps
        self.steps = num_steps if truncate_steps is None else truncate_steps
        self.checkpoint_steps = checkpoint_steps

    def plan(self) -> Plan:
        return Plan(positions={self.num_steps - self.steps, self.num_steps})

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput:
        start = self.num_steps - self.steps
        x = batch.latent(start)

        def euler_step(x: torch.Tensor, position: int) -> torch.Tensor:
            dt = batch.time(position + 1) - batch.time(position)
            return x + dt * batch.velocity(x, batch.times(position))

        for position in range(start, self.num_steps):
            if self.checkpoint_steps:
                x = checkpoint(euler_step, x, position, use_reentrant=False)
            else:
                x = euler_step(x, position)
        raw, reward = batch.losses(x)
        batch.backward(raw.mean())
        return ObjectiveOutput(loss=raw.detach().mean(), reward=reward.detach(), metrics={"steps": self.steps})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------------
# ReFL


class ReFL:
    """ReFL (Xu et al., ImageReward, NeurIPS 2023), adapted to flow matching as in the LeapAlign paper.

    Stop the rollout at a random late step — a level uniform in ``[1, last_steps]`` (paper: one of the last 11 of
    25 steps) — and predict x̂_0 = x_t − t·v(x_t) in one step with gradient; the reward scores x̂_0.
    """

    name = "refl"

    def __init__(self, num_steps: int, *, last_steps: int = 11, seed: int = 0):
        if not 1 <= last_steps <= num_steps:
            raise ValueError(f"ReFL: last_steps={last_steps} must lie in [1, {num_steps}]")
        self.num_steps = num_steps
        self.last_steps = last_steps
        self.generator = _SharedGenerator(seed)

    def plan(self) -> Plan:
        level = self.generator.randint(1, self.last_steps)
        return Plan(positions={self.num_steps - level, self.num_steps}, draws={"level": level})

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput:
        position = self.num_steps - plan.draws["level"]
        x_t = batch.latent(position)
        x0_hat = x_t - batch.time(position) * batch.velocity(x_t, batch.times(position))
        raw, reward_trained = batch.losses(x0_hat)
        batch.backward(raw.mean())
        metrics = {"reward_trained": reward_trained.detach().mean(), "t": batch.time(position)}
        return ObjectiveOutput(loss=raw.detach().mean(), reward=_real_reward(batch), metrics=metrics)

    def state_dict(self) -> dict:
        return self.generator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state)


# --------------------------------------------------------------------------------------------------------------------
# DRaFT-LV


class DRaFTLV:
    """DRaFT-LV (Clark et al., ICLR 2024): gradient through the last sampling step only, with lower variance.

    The last Euler step x_0 = x_{t_1} − t_1·v(x_{t_1}) runs with gradient from the cached rollout latent; then the
    final x_0 is re-noised ``renoise`` times back to the last step's time, ``x' = t_1·ε + (1 − t_1)·sg(x_0)``, and
    denoised again with gradient. The hinge losses of the 1 + n samples are averaged; each term is backpropagated
    and freed on its own (they share no graph: the re-noising starts from sg(x_0)).
    """

    name = "draft_lv"

    def __init__(self, num_steps: int, *, renoise: int = 2, seed: int = 0):
        if renoise < 0:
            raise ValueError(f"DRaFT-LV: renoise={renoise} must be >= 0")
        self.num_steps = num_steps
        self.renoise = renoise

    def plan(self) -> Plan:
        return Plan(positions={self.num_steps - 1, self.num_steps})

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput:
        position = self.num_steps - 1
        t = batch.time(position)
        terms = 1 + self.renoise
        x_t = batch.latent(position)
        x0 = x_t - t * batch.velocity(x_t, batch.times(position))
        raw, reward = batch.losses(x0)
        batch.backward(raw.mean() / terms)
        x0, total = x0.detach(), raw.detach().mean()
        for _ in range(self.renoise):
            noise = torch.randn(x0.shape, generator=batch.generator, dtype=torch.float32).to(x0.device)
            x_renoised = t * noise + (1 - t) * x0
            x0_again = x_renoised - t * batch.velocity(x_renoised, batch.times(position))
            raw_again = batch.losses(x0_again)[0]
            batch.backward(raw_again.mean() / terms)
            total = total + raw_again.detach().mean()
        return ObjectiveOutput(loss=total / terms, reward=reward.detach(), metrics={"t": t})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------------
# DRTune


class DRTune:
    """DRTune (Wu et al., Deep Reward Supervisions, ECCV 2024), adapted to flow matching as in the LeapAlign paper.

    The trajectory stops early at a position ``s`` drawn from the last ``stop_fraction`` of the steps; x̂_0 is
    predicted there in one step. ``train_steps`` (K) steps, equally spaced over ``[0, s)`` with a random offset,
    run with gradient; the model input is detached at every step (``v(sg(x_i))``), so the gradient of x̂_0 is
    ``Σ_i (t_{i+1} − t_i)·∂v(x_i)/∂θ`` with no nested terms. Because every input is detached, the chain's values are
    the rollout's: x̂_0 is built as its rollout value plus ``Σ Δ_i·(v_i − sg(v_i))`` (exactly zero in value). The
    x̂_0 prediction at ``s`` itself runs without gradient; the K training steps carry it.
    """

    name = "drtune"

    def __init__(self, num_steps: int, *, train_steps: int = 2, stop_fraction: float = 0.4, seed: int = 0):
        if not 0 < stop_fraction <= 1:
            raise ValueError(f"DRTune: stop_fraction={stop_fraction} must lie in (0, 1]")
        # Stop positions: the last ⌊fraction·T⌋ positions before x_0 (at least one), e.g. 15..24 of 25.
        self.first_stop = num_steps - max(1, math.floor(stop_fraction * num_steps))
        if train_steps < 1 or train_steps > self.first_stop:
            raise ValueError(
                f"DRTune: train_steps={train_steps} must lie in [1, {self.first_stop}] for {num_steps} steps"
            )
        self.num_steps = num_steps
        self.train_steps = train_steps
        self.generator = _SharedGenerator(seed)

    def plan(self) -> Plan:
        stop = self.generator.randint(self.first_stop, self.num_steps - 1)
        interval = stop / self.train_steps
        offset = self.generator.uniform() * interval
        train = sorted({min(stop - 1, int(offset + i * interval)) for i in range(self.train_steps)})
        return Plan(positions={*train, stop, self.num_steps}, draws={"stop": stop, "train": train})

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput:
        stop, train = plan.draws["stop"], plan.draws["train"]
        x_s = batch.latent(stop)
        with torch.no_grad():
            x0_hat = x_s - batch.time(stop) * batch.velocity(x_s, batch.times(stop))
        for position in train:
            dt = batch.time(position + 1) - batch.time(position)
            v = batch.velocity(batch.latent(position), batch.times(position))  # cached latents: inputs detached
            x0_hat = x0_hat + dt * (v - v.detach())
        raw, reward_trained = batch.losses(x0_hat)
        batch.backward(raw.mean())
        metrics = {"reward_trained": reward_trained.detach().mean(), "t_stop": batch.time(stop)}
        return ObjectiveOutput(loss=raw.detach().mean(), reward=_real_reward(batch), metrics=metrics)

    def state_dict(self) -> dict:
        return self.generator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state)


OBJECTIVES = {cls.name: cls for cls in (LeapAlign, FullBackprop, ReFL, DRaFTLV, DRTune)}


def build_objective(name: str, num_steps: int, **options) -> Objective:
    """Build an objective by name (``leapalign``, ``full_backprop``, ``refl``, ``draft_lv``, ``drtune``)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is unknown; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](num_steps, **options)
