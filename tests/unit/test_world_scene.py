"""The structural world reward: differentiable, high on rendered true scenes, low on each category's negatives."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from engine.rewards import load_reward
from engine.world import CATEGORIES, SHAPES, ObjectSpec, SceneSpec, make_prompts, render
from engine.world.scenes import BACKGROUND, COLORS, PALETTE, mirror, shape_mask


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


@pytest.fixture(scope="module", params=["world_scene", "world_scene_v1"])
def reward(request):
    """Both versions: version 2 is ``world_scene``; version 1 stays loadable for the benchmark's protocols 1 and 2."""
    return load_reward(request.param, None)


@pytest.fixture(scope="module")
def version_2():
    return load_reward("world_scene", None)


@pytest.fixture(scope="module")
def version_1():
    return load_reward("world_scene_v1", None)


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


def _canvas() -> np.ndarray:
    return np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)


def _draw(image: np.ndarray, mask: np.ndarray, y: int, x: int, color: str) -> None:
    image[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = PALETTE[color]


def _without(mask: np.ndarray, pixels: list[tuple[int, int]]) -> np.ndarray:
    mask = mask.copy()
    for y, x in pixels:
        mask[y, x] = False
    return mask


def test_a_shape_missing_pixels_is_no_shape(version_2, version_1):
    """Presence is strict: a square missing three pixels at each corner (box fill 0.85, which the judge reads as a
    circle) scores almost nothing against a clean square, so that the reward's optimum is a shape the judge accepts.
    Version 1 (inside mean to the power 1, shape share 10) still gives it a fifth of the clean score."""
    corners = [
        (0, 0),
        (0, 1),
        (1, 0),
        (0, -1),
        (0, -2),
        (1, -1),
        (-1, 0),
        (-2, 0),
        (-1, 1),
        (-1, -1),
        (-1, -2),
        (-2, -1),
    ]
    clean, ragged = _canvas(), _canvas()
    _draw(clean, shape_mask("square", 9), 10, 10, "red")
    _draw(ragged, _without(shape_mask("square", 9), corners), 10, 10, "red")
    scores = version_2(_tensor([clean, ragged]), ["a red square"] * 2)
    assert scores[0] > 0.7, scores
    assert scores[1] < 0.1 * scores[0], scores
    old = version_1(_tensor([clean, ragged]), ["a red square"] * 2)
    assert old[1] > 0.15 * old[0], old


def test_an_extra_object_too_ragged_to_be_present_still_costs_a_counting_caption(version_2, version_1):
    """Absence is lenient: a third square missing three corner pixels (fill 0.94, which the judge counts) is too
    ragged to count as present, yet "two blue squares" must still lose for it. Extra objects are searched on the
    lenient quality; on the strict one (or with version 1's threshold 0.5) this third square cost nothing or little."""
    two = _canvas()
    _draw(two, shape_mask("square", 8), 4, 4, "blue")
    _draw(two, shape_mask("square", 8), 4, 20, "blue")
    three = two.copy()
    _draw(three, _without(shape_mask("square", 7), [(0, 0), (0, -1), (-1, 0)]), 20, 12, "blue")
    scores = version_2(_tensor([two, three]), ["two blue squares"] * 2)
    assert scores[0] > 0.7, scores
    assert scores[1] < scores[0] - 0.2, scores
    old = version_1(_tensor([two, three]), ["two blue squares"] * 2)
    assert old[1] > old[0] - 0.2, old


def test_an_unknown_version_is_a_one_line_error():
    from engine.rewards.world_scene import WorldSceneReward

    with pytest.raises(ValueError, match=r"world_scene version=3: use one of \[1, 2\]"):
        WorldSceneReward(3)


def test_match_maps_share_one_pass_between_inside_powers():
    """The strict and lenient matches come from one pass (one set of colour masks and convolutions); each equals
    the match computed alone."""
    from engine.rewards.world_scene import match_maps

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    strict, lenient = match_maps(images, 4, 1)
    assert torch.equal(strict, match_maps(images, 4)[0])
    assert torch.equal(lenient, match_maps(images, 1)[0])
    assert not torch.equal(strict, lenient)


def _plain_match_maps(images: torch.Tensor, power: int) -> torch.Tensor:
    """The template match as plainly written before the speed-up: one convolution per inside mask and one per
    (shape, side) window, differentiated by autograd (the reference for the fused, custom-backward pass)."""
    import torch.nn.functional as F

    from engine.rewards.world_scene import _BASE_SIZE, _SIDES, soft_colors

    batch, _, height, width = images.shape
    sides = range(round(_SIDES[0] * height / _BASE_SIZE), round(_SIDES[1] * height / _BASE_SIZE) + 1)
    window = sides[-1] + 2
    inside = torch.zeros(len(SHAPES) * len(sides), 1, window, window)
    frame = torch.zeros_like(inside)
    for i, shape in enumerate(SHAPES):
        for j, side in enumerate(sides):
            mask = torch.from_numpy(shape_mask(shape, side)).float()
            inside[i * len(sides) + j, 0, 1 : side + 1, 1 : side + 1] = mask
            frame[i * len(sides) + j, 0, : side + 2, : side + 2] = 1.0
    n_in, n_out = inside.sum((1, 2, 3)), frame.sum((1, 2, 3)) - inside.sum((1, 2, 3))
    masks = soft_colors(images)[:, 1 : 1 + len(COLORS)]
    padded = F.pad(masks, (0, window - 1, 0, window - 1)).reshape(batch * len(COLORS), 1, height + window - 1, -1)
    in_sum, win_sum = F.conv2d(padded, inside), F.conv2d(padded, frame)
    match = (in_sum / n_in[:, None, None]) ** power * (1.0 - (win_sum - in_sum) / n_out[:, None, None])
    return match.reshape(batch, len(COLORS), len(SHAPES), len(sides), height, width).amax(3)


@pytest.mark.parametrize("size", [32, 48])
def test_fused_template_pass_matches_the_plain_convolutions_in_value_and_gradient(size):
    """The speed-up (shared windows, one convolution, the input gradient as a depthwise convolution) leaves the
    maths unchanged: the match maps and their gradient w.r.t. the pixels equal autograd's through the plain
    convolutions, on rendered scenes and on noise."""
    from engine.rewards.world_scene import match_maps

    rng = np.random.default_rng(3)
    prompts = [p for p in make_prompts(0).heldout][:4]
    scenes = _tensor([render(p.spec, rng) for p in prompts])
    scenes = torch.nn.functional.interpolate(scenes, size=size, mode="nearest")
    noise = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    for images in (scenes, noise):
        shape = (images.shape[0], len(COLORS), len(SHAPES), size, size)
        weights = torch.rand(shape, generator=torch.Generator().manual_seed(6))
        for power in (4, 1):
            fast_in, plain_in = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
            (fast,) = match_maps(fast_in, power)
            plain = _plain_match_maps(plain_in, power)
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
            (fast * weights).sum().backward()
            (plain * weights).sum().backward()
            torch.testing.assert_close(fast_in.grad, plain_in.grad, rtol=1e-4, atol=1e-5)


def test_correlate_gradient_is_the_convolution_adjoint():
    """gradcheck (float64) of the custom backward: the depthwise convolution of the padded output gradient."""
    from engine.rewards.world_scene import _Correlate

    maps = torch.rand(3, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    kernels = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m: _Correlate.apply(m, kernels), (maps,))


def _plain_peaks(quality, n, radius, blocked=None):
    """Greedy non-maximum suppression as plainly written before the speed-up: one indexed value per peak."""
    blocked = torch.zeros_like(quality, dtype=torch.bool) if blocked is None else blocked.clone()
    values, places = [], []
    for _ in range(n):
        y, x = divmod(int(quality.masked_fill(blocked, float("-inf")).flatten().argmax()), quality.shape[1])
        values.append(quality[y, x])
        places.append((y, x))
        blocked[max(0, y - radius + 1) : y + radius, max(0, x - radius + 1) : x + radius] = True
    return torch.stack(values), places, blocked


def _plain_relation_score(quality, caption, radius, extra_threshold, lenient=None, *, other_rules):
    """The relation rule pair by pair (one soft minimum per candidate pair), as written before the speed-up."""
    from engine.rewards import world_scene as ws

    if caption.relation is None:
        return other_rules(quality, caption, radius, extra_threshold, lenient)
    maps = [ws._object_map(quality, obj) for obj in caption.objects]
    (va, pa, _), (vb, pb, _) = (_plain_peaks(m, ws.PAIR_CANDIDATES, radius // 2) for m in maps)
    pairs = [
        ws._softmin(va[i], vb[j])
        for i in range(len(pa))
        for j in range(len(pb))
        if ws._holds(pa[i], pb[j], caption.relation, margin=radius / 2)
    ]
    return torch.stack(pairs).max() if pairs else 0.0 * (va.sum() + vb.sum())


def test_vectorised_peaks_and_pairs_match_the_plain_loops(version_2, monkeypatch):
    """Peaks gathered in one index and all relation pairs scored at once (a 4× faster reward on position
    captions) give the plain loops' scores and pixel gradients, on every category of rendered and noisy scenes."""
    from engine.rewards import world_scene as ws

    rng = np.random.default_rng(7)
    prompts = [p for category in CATEGORIES for p in make_prompts(0).heldout if p.category == category][::9]
    clean = _tensor([render(p.spec, rng) for p in prompts])
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(8))).clamp(0, 1)
    texts = [p.text for p in prompts]
    assert {p.category for p in prompts} == set(CATEGORIES)
    for images in (clean, noisy):
        fast_in, plain_in = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
        fast = version_2(fast_in, texts)
        fast.sum().backward()
        with monkeypatch.context() as patch:
            patch.setattr(ws, "_peaks", _plain_peaks)
            patch.setattr(ws, "score_one", functools.partial(_plain_relation_score, other_rules=ws.score_one))
            plain = version_2(plain_in, texts)
        plain.sum().backward()
        torch.testing.assert_close(fast, plain, rtol=0, atol=0)
        torch.testing.assert_close(fast_in.grad, plain_in.grad, rtol=1e-6, atol=1e-7)
