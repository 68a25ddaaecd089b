"""Differentiable rewards: the interface, the registry (load by name from a local path) and the hinge criterion."""

import engine.rewards.aesthetic  # noqa: F401  (registers aesthetic)
import engine.rewards.clipscore  # noqa: F401  (registers clipscore)
import engine.rewards.hps  # noqa: F401  (registers hpsv2, hpsv21)
import engine.rewards.hpsv3  # noqa: F401  (registers hpsv3)
import engine.rewards.imagereward  # noqa: F401  (registers imagereward)
import engine.rewards.pickscore  # noqa: F401  (registers pickscore)
import engine.rewards.world_clip  # noqa: F401  (registers world_clip)
import engine.rewards.world_scene  # noqa: F401  (registers world_scene)
from engine.rewards import color  # noqa: F401  (registers tiny_color)
from engine.rewards.base import REGISTRY, HingeTerm, Reward, RewardCriterion, RewardSpec, load_reward, register

__all__ = ["REGISTRY", "HingeTerm", "Reward", "RewardCriterion", "RewardSpec", "load_reward", "register"]
