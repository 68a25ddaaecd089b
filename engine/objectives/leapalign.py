"""LeapAlign (Liang et al., CVPR 2026): its settings and its gradient passes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from engine.leap import AnchorSampler, anchor_positions, anchor_problem, leap_path, similarity_weight
from engine.objectives.base import (
    ConfigError,
    GradientGraph,
    ObjectiveConfig,
    ObjectiveOutput,
    Plan,
    StepBatch,
    fail,
    setting,
)


@dataclass
class LeapAlignConfig(ObjectiveConfig):
    """LeapAlign's settings (``method.leapalign``)."""

    _prefix: ClassVar[str] = "method.leapalign"

    n_leaps: int = setting(2, "leaps per trajectory, 1 to 3 (paper: 2)")
    alpha: float | None = setting(None, "nested-gradient discount in [0, 1]; null = the reward's default")
    tau: float = setting(0.1, "floor of the leap distances in the similarity weight (paper: 0.1)")
    similarity_weight: bool = setting(True, "weight each trajectory by its similarity to the rollout")
    min_level: int = setting(1, "lowest anchor level (grid steps before x_0)")
    max_level: int | None = setting(None, "highest anchor level; null = rollout.num_steps")
    fixed_distance: int | None = setting(None, "consecutive anchors exactly this many levels apart")
    pairs_per_rollout: int = setting(1, "anchor draws trained per rollout (needs decouple_reward)")
    decouple_reward: bool = setting(True, "compute ∂reward/∂x_0 once, apart from the leap graph (exact; less memory)")

    # Every field was a flat ``method.<field>`` key before the method section was nested.
    _moved: ClassVar[dict[str, str]] = {
        name: name
        for name in ("n_leaps", "alpha", "tau", "similarity_weight", "min_level", "max_level", "fixed_distance",
                     "pairs_per_rollout", "decouple_reward")
    }  # fmt: skip

    def _validate(self) -> None:
        if not 1 <= self.n_leaps <= 3:
            fail(self._name("n_leaps"), self.n_leaps, "must be 1, 2 or 3 (paper: 2)")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            fail(self._name("alpha"), self.alpha, "must lie in [0, 1] (paper: 0.3 HPSv2.1, 0.1 PickScore/HPSv3)")
        if self.tau <= 0:
            fail(self._name("tau"), self.tau, "must be > 0 (paper: 0.1)")
        self._positive("min_level", "max_level", "fixed_distance", "pairs_per_rollout")
        if self.pairs_per_rollout > 1 and not self.decouple_reward:
            fail(
                self._name("pairs_per_rollout"),
                self.pairs_per_rollout,
                "> 1 reuses one reward gradient for several leap draws; set method.leapalign.decouple_reward=true",
            )

    def check_grid(self, num_steps: int) -> None:
        # The anchor range is checked in one place, engine.leap; its message names these settings.
        max_level = num_steps if self.max_level is None else self.max_level
        problem = anchor_problem(num_steps, self.n_leaps, self.min_level, max_level, self.fixed_distance)
        if problem:
            raise ConfigError(f"{self._prefix}.{problem}")

    def sampler(self, num_steps: int, seed: int = 0) -> AnchorSampler:
        return AnchorSampler(
            num_steps,
            self.n_leaps,
            min_level=self.min_level,
            max_level=self.max_level,
            fixed_distance=self.fixed_distance,
            seed=seed,
        )

    def resolve(self, defaults: Mapping[str, Any]) -> None:
        if self.alpha is None:
            self.alpha = float(defaults["alpha"])

    def gradient_graph(self, num_steps: int) -> GradientGraph:
        # The reward gradient is decoupled: its graph is freed before the n-pass leap graph is built.
        return GradientGraph(self.n_leaps, not self.decouple_reward)


class LeapAlign:
    """LeapAlign: reward gradients through an n-step leap trajectory.

    Per step: draw anchors ``k > j > … > 0`` uniformly over the trajectory (shared generator), build the leap path
    through the cached rollout latents (``engine.leap.leap_path``, α-discounted nested gradient), and minimise
    ``L = sg(w)·max(0, λ − r(x_0))`` with ``w = 1 / Σ max(d_i, τ)``. The reward scores the real rollout x_0.

    Reward-gradient decoupling (``decouple_reward``): the connected x_0 has the rollout's value, so
    ``g = ∂L_raw/∂x_0`` does not depend on the leap. It is computed once through decode and reward, that graph is
    freed, then ``Σ_b sg(w_b)·⟨g_b, x̂_0,b⟩ / B`` is backpropagated through the leap passes: the same parameter
    gradient, with peak memory max(reward graph, leap graph) instead of their sum, and one reward evaluation for
    ``pairs_per_rollout`` leap paths (their gradients are averaged).

    Args:
        num_steps: the rollout grid's steps.
        config: the settings; None = built from ``settings`` (keyword names of :class:`LeapAlignConfig`, which checks
            them). α must be resolved (not null) here: the trainer fills it from the reward's default.
        seed: seed of the anchor draws, the same on every rank.
    """

    name = "leapalign"
    Config = LeapAlignConfig

    def __init__(self, num_steps: int, config: LeapAlignConfig | None = None, *, seed: int = 0, **settings):
        config = config if config is not None else LeapAlignConfig(**{"alpha": 0.3, **settings})
        if config.alpha is None:
            raise ConfigError("method.leapalign.alpha is null; resolve it (config.resolve) before building LeapAlign")
        config.check_grid(num_steps)
        self.config = config
        self.num_steps = num_steps
        self.n_leaps = config.n_leaps
        self.alpha = config.alpha
        self.sampler = config.sampler(num_steps, seed)

    def plan(self) -> Plan:
        level_sets = [self.sampler.sample() for _ in range(self.config.pairs_per_rollout)]
        positions = {p for levels in level_sets for p in anchor_positions(levels, self.num_steps)}
        return Plan(positions=positions, draws={"levels": level_sets})

    def _path(self, batch: StepBatch, levels: Sequence[int]):
        positions = anchor_positions(levels, self.num_steps)
        latents = [batch.latent(p) for p in positions]
        times = [batch.time(p) for p in positions]
        return leap_path(batch.velocity, latents, times, self.alpha)

    def _weight(self, distances: torch.Tensor) -> torch.Tensor:
        if self.config.similarity_weight:
            return similarity_weight(distances, self.config.tau)
        return torch.ones(distances.shape[0], device=distances.device)

    def forward_backward(self, batch: StepBatch, plan: Plan) -> ObjectiveOutput:
        level_sets = plan.draws["levels"]
        pairs = len(level_sets)
        x0 = batch.latent(self.num_steps)
        if self.config.decouple_reward:
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
            if self.config.decouple_reward:
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
