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

Each objective owns its settings: a section next to it (``LeapAlignConfig``, ``ReFLConfig``, ...) that checks every
value once, nested under ``method.<name>`` in the run config (``method: {objective: refl, refl: {last_steps: 11}}``).
Adding an objective means its class and section (in ``leapalign.py``, ``baselines.py`` or a new module), one entry in
:data:`OBJECTIVES`, its tests and a YAML; the config tree, ``--help``, the trainer and the planner follow.
"""

from __future__ import annotations

from typing import Any

from engine.objectives.base import (
    GradientGraph,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    Plan,
    SharedGenerator,
    StepBatch,
    method_config,
    real_reward,
)
from engine.objectives.baselines import (
    DRaFTLV,
    DRaFTLVConfig,
    DRTune,
    DRTuneConfig,
    FullBackprop,
    FullBackpropConfig,
    ReFL,
    ReFLConfig,
)
from engine.objectives.leapalign import LeapAlign, LeapAlignConfig

OBJECTIVES: dict[str, Any] = {cls.name: cls for cls in (LeapAlign, FullBackprop, ReFL, DRaFTLV, DRTune)}

MethodConfig = method_config(OBJECTIVES)


def build_objective(method: Any, num_steps: int, *, seed: int = 0, **settings) -> Objective:
    """Build the configured objective.

    Args:
        method: a ``MethodConfig`` (its ``objective`` and that objective's section are used, resolved), or an
            objective's name, with ``settings`` as keyword names of its section (tests, benchmarks).
        num_steps: steps of the rollout grid.
        seed: seed of the objective's draws, identical on every rank.

    Raises:
        ConfigError: an unknown name or a bad setting (one line naming ``method.<objective>.<field>``).
    """
    if isinstance(method, str):
        if method not in OBJECTIVES:
            raise ValueError(f"objective {method!r} is unknown; choose one of {sorted(OBJECTIVES)}")
        return OBJECTIVES[method](num_steps, seed=seed, **settings)
    return OBJECTIVES[method.objective](num_steps, method.selected(), seed=seed)


def objective_settings(name: str, **given) -> ObjectiveConfig:
    """The section of objective ``name`` with those of ``given`` it has (e.g. ``n_leaps`` only for LeapAlign)."""
    cls = OBJECTIVES[name].Config
    own = {f for f in cls.__dataclass_fields__}
    return cls(**{key: value for key, value in given.items() if key in own})


__all__ = [
    "OBJECTIVES",
    "DRTune",
    "DRTuneConfig",
    "DRaFTLV",
    "DRaFTLVConfig",
    "FullBackprop",
    "FullBackpropConfig",
    "GradientGraph",
    "LeapAlign",
    "LeapAlignConfig",
    "MethodConfig",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "Plan",
    "ReFL",
    "ReFLConfig",
    "SharedGenerator",
    "StepBatch",
    "build_objective",
    "objective_settings",
    "real_reward",
]
