"""What every objective shares: the step batch it trains on, its plan and output, its settings section, and the
``method`` section assembled from the registry (``engine.objectives``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import torch
from torch import nn

from engine.models.base import Conditioning, FlowModelAdapter
from engine.rollout import Trajectory
from engine.sections import ConfigError, Section, fail, setting

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


class GradientGraph(NamedTuple):
    """What one objective step keeps alive for backward, for the memory planner (``engine.memory``).

    Attributes:
        passes: transformer passes alive in one graph.
        with_reward: whether the reward graph (decode + reward) is alive at the same time.
        chained: the passes are the sampling chain itself (full backprop), whose per-step checkpointing keeps one
            latent per step instead of each pass's activations.
    """

    passes: int
    with_reward: bool
    chained: bool = False


class ObjectiveConfig(Section):
    """Base of each objective's own settings section (``method.<objective>``).

    A subclass is a dataclass of :func:`engine.sections.setting` fields with ``_prefix = "method.<name>"``; its
    ``_validate`` checks what needs no other setting, :meth:`check_grid` what depends on the rollout grid.
    ``_moved`` maps the flat ``method.*`` keys of older configs to this section's fields, for a one-line error.
    """

    _moved: ClassVar[dict[str, str]] = {}

    def check_grid(self, num_steps: int) -> None:
        """Raise ConfigError if the settings do not fit a rollout grid of ``num_steps`` steps."""

    def resolve(self, defaults: Mapping[str, Any]) -> None:
        """Fill settings left null from the rewards' defaults (e.g. LeapAlign's α), in place."""

    def gradient_graph(self, num_steps: int) -> GradientGraph:
        """What one step keeps alive for backward (memory planning)."""
        return GradientGraph(1, True)


def grid_error(name: str, value: Any, num_steps: int, fix: str) -> ConfigError:
    """A setting that exceeds the rollout grid, named as ``method.<objective>.<field>``."""
    return ConfigError(f"{name}={value!r} exceeds rollout.num_steps={num_steps}; {fix}")


class Objective(Protocol):
    """One training method: plan the step's random choices, then run its gradient passes."""

    name: str
    num_steps: int
    Config: ClassVar[type[ObjectiveConfig]]

    def plan(self) -> Plan: ...

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SharedGenerator:
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


def real_reward(batch: StepBatch) -> torch.Tensor:
    """Reward of the rollout's x_0, without gradient (the common metric of every method)."""
    with torch.no_grad():
        return batch.losses(batch.latent(batch.trajectory.num_steps))[1].detach()


def method_config(objectives: Mapping[str, Any]) -> type[Section]:
    """The ``method`` section: the chosen ``objective`` and one nested section per objective (its ``Config``).

    Built from the registry, so an objective added to it brings its settings, their checks, ``--help`` lines and
    config-file keys with it. The flat keys of older configs (``method.n_leaps``) are refused with the new key.
    """
    names = tuple(objectives)
    fields: list[tuple[str, Any, Any]] = [
        ("objective", Literal[names], setting(names[0], "training objective: LeapAlign or a direct-gradient baseline"))
    ]
    for name, cls in objectives.items():
        fields.append((name, cls.Config, setting(cls.Config, f"settings of {cls.__name__} (objective: {name})")))
    moved = {old: f"method.{name}.{new}" for name, cls in objectives.items() for old, new in cls.Config._moved.items()}

    def selected(self) -> ObjectiveConfig:
        """The chosen objective's settings section."""
        return getattr(self, self.objective)

    namespace = {"_prefix": "method", "_moved": moved, "selected": selected, "__module__": __name__}
    cls = dataclasses.make_dataclass("MethodConfig", fields, bases=(Section,), namespace=namespace)
    cls.__doc__ = "The training objective, and each objective's own settings (only the chosen one's are used)."
    return cls


__all__ = [
    "ConfigError",
    "Criterion",
    "GradientGraph",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "Plan",
    "SharedGenerator",
    "StepBatch",
    "fail",
    "grid_error",
    "method_config",
    "real_reward",
    "setting",
]
