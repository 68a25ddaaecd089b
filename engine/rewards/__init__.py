"""Differentiable rewards: the interface, the registry (load by name from a local path) and the hinge criterion."""

from engine.rewards import color  # noqa: F401  (registers tiny_color)
from engine.rewards.base import REGISTRY, HingeTerm, Reward, RewardCriterion, RewardSpec, load_reward, register

__all__ = ["REGISTRY", "HingeTerm", "Reward", "RewardCriterion", "RewardSpec", "load_reward", "register"]
