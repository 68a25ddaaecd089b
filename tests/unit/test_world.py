"""The embedded world: seeded scenes, the held-out split and the exact judge.

The judge is checked against scenes whose truth is known by construction: rendered from their own spec it must say
correct (all categories, clean and under σ=0.03 noise), and rendered from a deliberately wrong spec (swapped colours,
wrong count, mirrored relation, missing object) it must say incorrect.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.world import CATEGORIES, COLORS, SHAPES, Prompt, judge, make_prompts, render, sample_dataset
from engine.world.judge import evaluate, relations, segment
from engine.world.scenes import BACKGROUND, PALETTE, ObjectSpec, SceneSpec, all_prompts, mirror

ROOT = Path(__file__).resolve().parents[2]
PER_CATEGORY = 60


def _random_prompts(seed: int, per_category: int = PER_CATEGORY) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    prompts = []
    for group in all_prompts().values():
        prompts += [group[i] for i in rng.choice(len(group), per_category)]
    return prompts


def _render_all(prompts: list[Prompt], seed: int, size: int = 32, sigma: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [render(p.spec, rng, size) for p in prompts]
    if sigma == 0:
        return images
    return [np.clip(im / 255.0 + rng.normal(0.0, sigma, im.shape), 0.0, 1.0) for im in images]


def _wrong(prompt: Prompt) -> SceneSpec:
    """A spec whose rendering must fail ``prompt``."""
    spec = prompt.spec
    first = spec.objects[0]
    other_color = COLORS[(COLORS.index(first.color) + 1) % len(COLORS)]
    if prompt.category in ("single_object", "colors"):
        return SceneSpec((dataclasses.replace(first, color=other_color),))
    if prompt.category == "counting":
        wrong = first.count + 1 if first.count < 4 else first.count - 1
        return SceneSpec((dataclasses.replace(first, count=wrong),))
    if prompt.category == "position":
        return mirror(spec)
    if prompt.category == "color_attr":  # the same colours and shapes, bound the other way round
        a, b = spec.objects
        return SceneSpec((dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)))
    # two_object: the second object missing, a third shape in its place
    missing = next(s for s in SHAPES if s not in (first.shape, spec.objects[1].shape))
    return SceneSpec((first, dataclasses.replace(spec.objects[1], shape=missing)))


# ---------------------------------------------------------------------------------------------------- generator


def test_render_is_seeded_and_draws_only_palette_colours():
    spec = all_prompts()["counting"][-1].spec  # four orange triangles: the hardest to place
    a = render(spec, np.random.default_rng(3))
    b = render(spec, np.random.default_rng(3))
    c = render(spec, np.random.default_rng(4))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    colours = {tuple(p) for p in a.reshape(-1, 3)}
    assert colours == {BACKGROUND, PALETTE["orange"]}
    assert render(spec, np.random.default_rng(0), size=64).shape == (64, 64, 3)


def test_sample_dataset_is_deterministic():
    images, prompts = sample_dataset(24, seed=7)
    images2, prompts2 = sample_dataset(24, seed=7)
    images3, prompts3 = sample_dataset(24, seed=8)
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, images2) and prompts == prompts2
    assert not np.array_equal(images, images3) and prompts != prompts3
    assert all(judge(im, p).correct for im, p in zip(images, prompts))


def test_sample_dataset_restricted_to_given_prompts():
    split = make_prompts(0)
    _, prompts = sample_dataset(40, seed=1, prompts=split.finetune)
    assert set(prompts) <= set(split.finetune)


def test_sample_dataset_category_weights_set_each_share():
    _, uniform = sample_dataset(600, seed=3)
    _, weighted = sample_dataset(600, seed=3, category_weights={"position": 5})
    share = sum(p.category == "position" for p in weighted) / len(weighted)
    assert abs(share - 0.5) < 0.06 and sum(p.category == "position" for p in uniform) < 0.25 * len(uniform)
    with pytest.raises(ValueError, match="unknown categories"):
        sample_dataset(4, seed=3, category_weights={"postion": 5})


def test_make_prompts_is_deterministic_and_seed_dependent():
    assert make_prompts(5) == make_prompts(5)
    assert make_prompts(5).heldout_pairings != make_prompts(6).heldout_pairings
    assert make_prompts(5, max_per_category=10).finetune != make_prompts(6, max_per_category=10).finetune


def test_captions():
    texts = {p.text for group in all_prompts().values() for p in group}
    assert {"a red circle", "an orange square", "three green triangles", "one blue circle"} <= texts
    assert "a red circle to the left of a blue square" in texts
    assert "a red square and a blue circle" not in texts  # shape order is canonical: circle, square, triangle
    assert "a blue circle and a red square" in texts
    assert {p.category for group in all_prompts().values() for p in group} == set(CATEGORIES)


# ------------------------------------------------------------------------------------------------------ held out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_compositions_disjoint_from_finetuning(seed):
    split = make_prompts(seed)
    held = split.heldout_pairings
    assert len(held) == 6
    # Each colour held out once and each shape twice, so every word is still seen in fine-tuning.
    assert sorted(c for c, _ in held) == sorted(COLORS)
    assert sorted(s for _, s in held) == sorted(SHAPES * 2)
    finetune_pairings = set().union(*(p.spec.pairings() for p in split.finetune))
    assert not finetune_pairings & held, "a held-out colour–shape pairing reached fine-tuning"
    assert all(p.spec.pairings() & held for p in split.heldout)
    assert {c for c, _ in finetune_pairings} == set(COLORS) and {s for _, s in finetune_pairings} == set(SHAPES)
    # Composition level: no (category, spec) — nor any spec at all — in both sets; text disjointness follows.
    assert not {p.spec for p in split.finetune} & {p.spec for p in split.heldout}
    assert not {p.text for p in split.finetune} & {p.text for p in split.heldout}
    every = {(p.category, p.spec) for group in all_prompts().values() for p in group}
    assert {(p.category, p.spec) for p in split.finetune + split.heldout} == every
    for category in CATEGORIES:
        assert any(p.category == category for p in split.finetune)
        assert any(p.category == category for p in split.heldout)
    capped = make_prompts(seed, max_per_category=5)
    assert len(capped.finetune) == len(capped.heldout) == 5 * len(CATEGORIES)
    assert set(capped.finetune) <= set(split.finetune) and set(capped.heldout) <= set(split.heldout)


# --------------------------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize("size", [32, 64])
def test_judge_accepts_every_rendered_truth(size):
    prompts = _random_prompts(seed=size, per_category=PER_CATEGORY if size == 32 else 12)
    result = evaluate(_render_all(prompts, seed=size, size=size), prompts)
    failures = [(p.text, j.reason) for p, j in zip(prompts, result.judgements) if not j.correct]
    assert result.per_category == dict.fromkeys(CATEGORIES, 1.0), failures[:5]
    assert result.overall == 1.0
    assert all(j.segmentation.unknown_pixels == 0 for j in result.judgements)


def test_judge_is_robust_to_mild_noise():
    prompts = _random_prompts(seed=11)
    result = evaluate(_render_all(prompts, seed=11, sigma=0.03), prompts)
    failures = [(p.text, j.reason) for p, j in zip(prompts, result.judgements) if not j.correct]
    assert min(result.per_category.values()) >= 0.98, (result.per_category, failures[:5])


def test_judge_rejects_wrong_images():
    prompts = _random_prompts(seed=12, per_category=30)
    rng = np.random.default_rng(12)
    images = [render(_wrong(p), rng) for p in prompts]
    result = evaluate(images, prompts)
    accepted = [p.text for p, j in zip(prompts, result.judgements) if j.correct]
    assert result.per_category == dict.fromkeys(CATEGORIES, 0.0), accepted[:5]
    assert result.overall == 0.0


def test_judge_takes_float_chw_tensors():
    torch = pytest.importorskip("torch")
    prompt = all_prompts()["position"][0]
    image = render(prompt.spec, np.random.default_rng(0))
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    assert judge(tensor, prompt).correct
    assert judge(image.astype(np.float64) / 255.0, prompt).correct


def test_colourless_object_matches_any_colour():
    spec = SceneSpec((ObjectSpec("triangle", None, 3),))
    prompt = Prompt("three triangles", "counting", spec)
    image = render(SceneSpec((ObjectSpec("triangle", "blue", 3),)), np.random.default_rng(0))
    assert judge(image, prompt).correct
    assert not judge(image, Prompt("three circles", "counting", SceneSpec((ObjectSpec("circle", None, 3),)))).correct


def test_segment_counts_unknown_pixels_and_drops_specks():
    image = render(SceneSpec((ObjectSpec("square", "green"),)), np.random.default_rng(0))
    image[0:2, 0:3] = (128, 128, 128)  # off-palette: unknown
    image[31, 31] = PALETTE["red"]  # a one-pixel speck: noise
    seg = segment(image)
    assert seg.unknown_pixels == 6 and seg.dropped_components == 1
    (det,) = seg.detections
    assert (det.color, det.shape, det.fill) == ("green", "square", 1.0)


def test_relations_follow_geneval():
    prompt = all_prompts()["position"][0]  # a red circle to the left of a green circle
    seg = segment(render(prompt.spec, np.random.default_rng(0)))
    red, green = sorted(seg.detections, key=lambda d: d.color != "red")
    assert "left of" in relations(red, green) and "right of" in relations(green, red)
    assert relations(red, red) == set()


def test_judge_shares_no_code_with_rewards():
    for name in ("judge.py", "scenes.py", "__init__.py"):
        tree = ast.parse((ROOT / "engine" / "world" / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
        assert not {m for m in imported if m.startswith("engine.")} - {"engine.world.scenes", "engine.world.judge"}, (
            name,
            imported,
        )
        assert not any("rewards" in m for m in imported), (name, imported)


def test_the_packages_names_stay_what_they_are_whatever_is_imported_first():
    """Importing a submodule binds its name on the package; a re-export of the same name would become a module."""
    import importlib
    import pkgutil

    import engine.world

    for info in pkgutil.iter_modules(engine.world.__path__):
        importlib.import_module(f"engine.world.{info.name}")
    for name in engine.world.__all__:
        assert not isinstance(getattr(engine.world, name), type(engine.world)), name
