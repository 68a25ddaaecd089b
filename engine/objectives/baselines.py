"""The direct-gradient baselines LeapAlign is compared with, on the same rollouts: full backprop (and DRaFT-K),
ReFL, DRaFT-LV and DRTune, each with its own settings section (``method.<name>``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from engine.objectives.base import (
    GradientGraph,
    ObjectiveConfig,
    ObjectiveOutput,
    Plan,
    SharedGenerator,
    StepBatch,
    fail,
    grid_error,
    real_reward,
    setting,
)


@dataclass
class FullBackpropConfig(ObjectiveConfig):
    """Full backprop's settings (``method.full_backprop``)."""

    _prefix: ClassVar[str] = "method.full_backprop"
    _moved: ClassVar[dict[str, str]] = {"truncate_steps": "truncate_steps", "checkpoint_steps": "checkpoint_steps"}

    truncate_steps: int | None = setting(None, "gradient through the last K steps only (DRaFT-K); null = all")
    checkpoint_steps: bool = setting(True, "recompute each sampling step in backward")

    def _validate(self) -> None:
        self._positive("truncate_steps")

    def check_grid(self, num_steps: int) -> None:
        if self.truncate_steps is not None and self.truncate_steps > num_steps:
            raise grid_error(self._name("truncate_steps"), self.truncate_steps, num_steps,
                             f"set it <= {num_steps} or null")  # fmt: skip

    def gradient_graph(self, num_steps: int) -> GradientGraph:
        return GradientGraph(num_steps if self.truncate_steps is None else self.truncate_steps, True, chained=True)


@dataclass
class ReFLConfig(ObjectiveConfig):
    """ReFL's settings (``method.refl``)."""

    _prefix: ClassVar[str] = "method.refl"
    _moved: ClassVar[dict[str, str]] = {"refl_last_steps": "last_steps"}

    last_steps: int = setting(11, "the training step is drawn from the last this-many grid steps (paper: 11 of 25)")

    def _validate(self) -> None:
        self._positive("last_steps")

    def check_grid(self, num_steps: int) -> None:
        if self.last_steps > num_steps:
            raise grid_error(self._name("last_steps"), self.last_steps, num_steps, f"set it <= {num_steps}")


@dataclass
class DRaFTLVConfig(ObjectiveConfig):
    """DRaFT-LV's settings (``method.draft_lv``)."""

    _prefix: ClassVar[str] = "method.draft_lv"
    _moved: ClassVar[dict[str, str]] = {"draft_lv_renoise": "renoise"}

    renoise: int = setting(2, "re-noise/denoise loops of the last step")

    def _validate(self) -> None:
        self._positive("renoise", minimum=0)


@dataclass
class DRTuneConfig(ObjectiveConfig):
    """DRTune's settings (``method.drtune``)."""

    _prefix: ClassVar[str] = "method.drtune"
    _moved: ClassVar[dict[str, str]] = {"drtune_train_steps": "train_steps", "drtune_stop_fraction": "stop_fraction"}

    train_steps: int = setting(2, "grid steps trained per trajectory")
    stop_fraction: float = setting(0.4, "fraction in (0, 1] of the trajectory trained (from x_1)")

    def _validate(self) -> None:
        self._positive("train_steps")
        if not 0.0 < self.stop_fraction <= 1.0:
            fail(self._name("stop_fraction"), self.stop_fraction, "must lie in (0, 1]")

    def first_stop(self, num_steps: int) -> int:
        """Stop positions are the last ⌊fraction·T⌋ positions before x_0 (at least one), e.g. 15..24 of 25."""
        return num_steps - max(1, math.floor(self.stop_fraction * num_steps))

    def check_grid(self, num_steps: int) -> None:
        if self.train_steps > num_steps:
            raise grid_error(self._name("train_steps"), self.train_steps, num_steps, f"set it <= {num_steps}")
        first_stop = self.first_stop(num_steps)
        if self.train_steps > first_stop:
            fail(
                self._name("train_steps"),
                self.train_steps,
                f"exceeds the {first_stop} steps before DRTune's earliest stop (rollout.num_steps={num_steps}, "
                f"stop_fraction={self.stop_fraction}); set it <= {first_stop} or raise rollout.num_steps",
            )

    def gradient_graph(self, num_steps: int) -> GradientGraph:
        return GradientGraph(self.train_steps, True)


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
    Config = FullBackpropConfig

    def __init__(self, num_steps: int, config: FullBackpropConfig | None = None, *, seed: int = 0, **settings):
        config = _checked(config, FullBackpropConfig, settings, num_steps)
        self.num_steps = num_steps
        self.steps = num_steps if config.truncate_steps is None else config.truncate_steps
        self.checkpoint_steps = config.checkpoint_steps

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
    Config = ReFLConfig

    def __init__(self, num_steps: int, config: ReFLConfig | None = None, *, seed: int = 0, **settings):
        config = _checked(config, ReFLConfig, settings, num_steps)
        self.num_steps = num_steps
        self.last_steps = config.last_steps
        self.generator = SharedGenerator(seed)

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
        return ObjectiveOutput(loss=raw.detach().mean(), reward=real_reward(batch), metrics=metrics)

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
    Config = DRaFTLVConfig

    def __init__(self, num_steps: int, config: DRaFTLVConfig | None = None, *, seed: int = 0, **settings):
        config = _checked(config, DRaFTLVConfig, settings, num_steps)
        self.num_steps = num_steps
        self.renoise = config.renoise

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
    Config = DRTuneConfig

    def __init__(self, num_steps: int, config: DRTuneConfig | None = None, *, seed: int = 0, **settings):
        config = _checked(config, DRTuneConfig, settings, num_steps)
        self.first_stop = config.first_stop(num_steps)
        self.num_steps = num_steps
        self.train_steps = config.train_steps
        self.generator = SharedGenerator(seed)

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
        return ObjectiveOutput(loss=raw.detach().mean(), reward=real_reward(batch), metrics=metrics)

    def state_dict(self) -> dict:
        return self.generator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state)


def _checked(config, cls: type[ObjectiveConfig], settings: dict, num_steps: int):
    """The objective's settings: ``config``, or built from keyword ``settings`` (checked there), fitted to the grid."""
    config = config if config is not None else cls(**settings)
    config.check_grid(num_steps)
    return config
