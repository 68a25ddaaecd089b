"""The structural world reward: differentiable, high on rendered true scenes, low on each category's negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.rewards import load_reward
from engine.world import CATEGORIES, SHAPES, ObjectSpec, SceneSpec, make_prompts, render
from engine.world.scenes import COLORS, mirror


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _negatives(spec: SceneSpec, category: str) -> list[SceneSpec]:
    """Scenes that break the caption the way each category can be failed."""
    first, *rest = spec.objects
    other_shape = next(s for s in SHAPES if s != first.shape)
    other_color = next(c for c in COLORS if c != first.color and all(c != o.color for o in rest))
    negatives = [
        SceneSpec((ObjectSpec(other_shape, first.color, first.count), *rest), spec.relation),  # wrong shape
        SceneSpec((ObjectSpec(first.shape, other_color, first.count), *rest), spec.relation),  # wrong colour
    ]
    if category == "counting":
        negatives += [SceneSpec((ObjectSpec(first.shape, first.color, n),)) for n in (1, 2, 3, 4) if n != first.count]
    if len(spec.objects) == 2:
        negatives.append(SceneSpec((rest[0],)))  # the first object missing
    if spec.relation is not None:
        negatives.append(mirror(spec))
    if category == "color_attr":  # colours swapped between the two objects
        a, b = spec.objects
        negatives.append(SceneSpec((ObjectSpec(a.shape, b.color), ObjectSpec(b.shape, a.color))))
    return negatives


@pytest.fixture(scope="module")
def reward():
    return load_reward("world_scene", None)


@pytest.mark.parametrize("category", CATEGORIES)
def test_true_scenes_score_high_and_every_negative_lower(reward, category):
    rng = np.random.default_rng(1)
    prompts = [p for p in make_prompts(0).heldout if p.category == category][:6]
    true = reward(_tensor([render(p.spec, rng) for p in prompts]), [p.text for p in prompts])
    assert true.min() > 0.7, (category, true)
    for prompt, score in zip(prompts, true):
        negatives = _negatives(prompt.spec, category)
        wrong = reward(_tensor([render(s, rng) for s in negatives]), [prompt.text] * len(negatives))
        assert wrong.max() < score - 0.15, (prompt.text, score, wrong)
        assert wrong.mean() < 0.5, (prompt.text, wrong)


def test_blank_and_noise_images_score_near_zero(reward):
    prompts = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle"]
    blank = torch.ones(3, 3, 32, 32)
    noise = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert reward(blank, prompts).abs().max() < 0.05
    assert reward(noise, prompts).abs().max() < 0.1


def test_gradient_reaches_the_pixels_and_raises_the_score(reward):
    """The pixel gradient is finite and non-zero for every category, and a small step along it raises the score."""
    rng = np.random.default_rng(2)
    prompts = [next(p for p in make_prompts(0).heldout if p.category == c) for c in CATEGORIES]
    clean = _tensor([render(p.spec, rng) for p in prompts])
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(3))
    images = (0.6 * clean + 0.4 * noise).requires_grad_(True)
    texts = [p.text for p in prompts]
    scores = reward(images, texts)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()
    stepped = reward((images + 0.02 * grad / grad.flatten(1).abs().amax(1)[:, None, None, None]).detach(), texts)
    assert (stepped > scores.detach()).all(), (scores, stepped)


def test_a_caption_the_world_cannot_write_is_a_one_line_error(reward):
    with pytest.raises(ValueError, match=r"world_scene cannot read the prompt 'a photo of a cat'"):
        reward(torch.ones(1, 3, 32, 32), ["a photo of a cat"])
