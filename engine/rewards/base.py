"""The reward interface, the registry of loadable rewards, and the hinge criterion that combines them.

A reward maps images ``[B, 3, H, W]`` float in **[0, 1]** (what the adapters' ``decode`` returns) and their
prompts to per-sample scores ``[B]``, differentiably with respect to the pixels. Each reward declares the paper's
defaults for the hinge threshold λ and the gradient discount α it is trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    """A differentiable reward model. ``default_lam``/``default_alpha``: the values the paper trains it with."""

    name: str
    default_lam: float
    default_alpha: float

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class RewardSpec:
    """How to build a reward by name: ``load(path, device, dtype) -> Reward``; ``needs_path`` for checkpoints."""

    name: str
    load: Callable[[str | None, torch.device, torch.dtype], Reward]
    needs_path: bool
    files: str  # the files a user must provide, for error messages and the README
    takes_path: bool = True  # False: a weight-free reward, which would ignore a path


REGISTRY: dict[str, RewardSpec] = {}


def register(spec: RewardSpec) -> RewardSpec:
    REGISTRY[spec.name] = spec
    return spec


def load_reward(name: str, path: str | None, device: torch.device | str = "cpu", dtype=torch.float32) -> Reward:
    """Build the reward ``name`` from a local ``path`` (never a hub)."""
    if name not in REGISTRY:
        raise ValueError(f"reward name={name!r} is unknown; choose one of {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    if spec.needs_path and not path:
        raise ValueError(f"reward {name!r} needs a local path to {spec.files}; set rewards.N.path")
    return spec.load(path, torch.device(device), dtype)


@dataclass
class HingeTerm:
    reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
    lam: float
    weight: float = 1.0


class RewardCriterion:
    """``L_raw = Σ_i weight_i · max(0, λ_i − r_i(images))`` per sample (LeapAlign Eq. 11, one λ per reward).

    Calling it returns ``(raw_loss [B], reward [B])`` where ``reward = Σ_i weight_i · r_i`` is what is logged.
    """

    def __init__(self, terms: Sequence[HingeTerm]):
        if not terms:
            raise ValueError("RewardCriterion needs at least one reward")
        self.terms = list(terms)

    @classmethod
    def single(cls, reward, lam: float) -> RewardCriterion:
        return cls([HingeTerm(reward, lam)])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raw = reward_sum = None
        for term in self.terms:
            r = term.reward(images, prompts)
            hinge = term.weight * torch.clamp(term.lam - r, min=0.0)
            raw = hinge if raw is None else raw + hinge
            reward_sum = term.weight * r if reward_sum is None else reward_sum + term.weight * r
        return raw, reward_sum
