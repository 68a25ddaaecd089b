"""The evaluator's JSON: the judge's reason per image and each reward's agreement with the judge (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.evaluation import agreement, grid_captions, write_evaluation
from engine.rewards.world_scene import WorldSceneReward
from engine.world.evaluate import prompt_set
from engine.world.scenes import mirror, render


def test_agreement_is_the_probability_that_an_accepted_image_outscores_a_rejected_one():
    assert agreement([0.9, 0.8, 0.1, 0.2], [True, True, False, False])["auc"] == 1.0
    assert agreement([0.1, 0.2, 0.9, 0.8], [True, True, False, False])["auc"] == 0.0
    assert agreement([0.5, 0.5, 0.5], [True, False, False])["auc"] == 0.5  # ties count half
    # 0.6 and 0.3 each beat 0.2 and neither beats 0.7: 2 of 4 pairs.
    mixed = agreement([0.6, 0.3, 0.7, 0.2], [True, True, False, False])
    assert mixed == {"auc": 0.5, "mean_if_correct": 0.45, "mean_if_wrong": 0.45, "n_correct": 2, "n_wrong": 2}
    assert agreement([0.6, 0.3, 0.2, 0.1], [True, True, False, False])["auc"] == 1.0
    assert agreement([0.6, 0.3, 0.25, 0.1], [True, True, True, False])["auc"] == 1.0
    assert agreement([0.1, 0.4, 0.2], [True, False, True])["auc"] == 0.0
    assert agreement([0.3, 0.1], [True, True]) == {"auc": None, "mean_if_correct": 0.2, "mean_if_wrong": None,
                                                    "n_correct": 2, "n_wrong": 0}  # fmt: skip


def test_the_json_gives_each_verdicts_reason_and_the_rewards_agreement_with_the_judge(tmp_path):
    """True scenes of position prompts and their mirrored scenes: the judge accepts the first and says why it
    rejects the second; world_scene separates them, and the JSON reports that separation."""
    prompts = prompt_set("heldout", 4)
    prompts = [p for p in prompts if p.category == "position"]
    assert len(prompts) == 4
    rng = np.random.default_rng(0)
    true = [render(p.spec, rng) for p in prompts]
    wrong = [render(mirror(p.spec), rng) for p in prompts]
    images = torch.from_numpy(np.stack(true + wrong)).permute(0, 3, 1, 2).float() / 255
    texts = [p.text for p in prompts] * 2
    rewards = WorldSceneReward()(images, texts)

    record = write_evaluation(tmp_path / "grid.png", images, texts, {"world_scene": rewards}, specs=prompts * 2)

    assert record == json.loads((tmp_path / "grid.json").read_text())
    assert record["correct"] == [True] * 4 + [False] * 4
    assert record["reasons"][:4] == [""] * 4
    for prompt, reason in zip(prompts, record["reasons"][4:]):
        assert reason.startswith("expected ") and prompt.spec.relation in reason, reason
    agree = record["reward_vs_judge"]["world_scene"]
    assert agree["auc"] == 1.0
    assert agree["mean_if_correct"] == pytest.approx(float(rewards[:4].mean()), abs=1e-4)
    assert agree["mean_if_wrong"] == pytest.approx(float(rewards[4:].mean()), abs=1e-4)


def test_the_json_counts_what_became_of_each_object(tmp_path):
    """A true scene, the same scene with its object's shape swapped, and with its colour swapped: found, drawn as
    another shape, colour absent — counted over the prompts' objects."""
    from dataclasses import replace

    from engine.world.scenes import COLORS, SHAPES, SceneSpec

    prompt = next(p for p in prompt_set("heldout", 4) if p.category == "single_object")
    (obj,) = prompt.spec.objects
    other_shape = next(s for s in SHAPES if s != obj.shape)
    other_color = next(c for c in COLORS if c != obj.color)
    rng = np.random.default_rng(0)
    scenes = [prompt.spec, SceneSpec((replace(obj, shape=other_shape),)), SceneSpec((replace(obj, color=other_color),))]
    images = torch.from_numpy(np.stack([render(s, rng) for s in scenes])).permute(0, 3, 1, 2).float() / 255

    record = write_evaluation(tmp_path / "grid.png", images, [prompt.text] * 3, torch.zeros(3))

    assert record["objects"] == {"found": 1, f"{obj.shape} drawn as {other_shape}": 1, "colour absent": 1}


def test_the_default_run_judges_data_eval_per_category_held_out_prompts_of_every_category():
    from collections import Counter

    from engine.config import DataConfig
    from engine.data import run_prompts
    from engine.world.scenes import make_prompts

    held_out = {p.text for p in make_prompts().heldout}
    _, texts, specs = run_prompts(DataConfig())
    assert len(texts) == 300 and [p.text for p in specs] == texts  # the default: 50 per category
    assert Counter(p.category for p in specs) == {c: 50 for c in Counter(p.category for p in specs)}
    assert len(Counter(p.category for p in specs)) == 6 and set(texts) <= held_out
    _, texts, specs = run_prompts(DataConfig(eval_per_category=3))
    assert len(texts) == len(specs) == 18


def test_a_large_grid_is_a_near_square_sheet(tmp_path):
    from PIL import Image

    from engine.images import save_grid

    save_grid(torch.rand(300, 3, 8, 8), ["a red circle"] * 300, tmp_path / "grid.png", cell=64)
    width, height = Image.open(tmp_path / "grid.png").size
    assert width == 18 * 64 and 0.5 < width / height < 2  # ⌈√300⌉ = 18 columns, not a 75-row strip of 4


def test_a_tile_cut_from_a_saved_grid_by_its_layout_is_that_image(tmp_path):
    from PIL import Image

    from engine.images import grid_layout, save_grid

    colours = torch.rand(7, 3, 1, 1)
    captions = [f"image {i} " + "with a long caption " * (i % 3) for i in range(7)]  # rows of differing height
    save_grid(colours.expand(7, 3, 8, 8), captions, tmp_path / "grid.png", cell=32)
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    layout = grid_layout(captions, cell=32)
    for i in range(7):
        tile = np.asarray(grid.crop(layout.box(i)))
        expected = (colours[i, :, 0, 0] * 255).round().numpy()
        assert np.abs(tile[4, 4].astype(float) - expected).max() <= 1, i  # the image's own colour, not a neighbour's
        assert (tile[-3:] == 255).any()  # the tile reaches down into its caption, white background


def test_the_default_runs_figure_shows_every_image_whose_verdict_changed(tmp_path):
    import sys
    from pathlib import Path

    from PIL import Image

    from engine.images import save_grid

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.default_run import verdict_changes

    prompts = ["a red circle", "two blue squares", "a green triangle above a red circle", "a yellow square"] * 3
    records = {}
    for tag, correct in (("start", [False, True, False] * 4), ("end", [True, True, False, False] * 3)):
        reward = np.linspace(0.1, 0.9, len(prompts)).tolist()
        save_grid(torch.rand(len(prompts), 3, 8, 8), grid_captions(prompts, reward), tmp_path / f"{tag}.png",
                  verdicts=correct)  # fmt: skip
        records[tag] = {"prompts": prompts, "reward": reward, "correct": correct}
    gained, lost = verdict_changes(tmp_path, records, tmp_path / "changes.png", "heading")
    before, after = records["start"]["correct"], records["end"]["correct"]
    assert gained == sum(a and not b for b, a in zip(before, after)) > 0
    assert lost == sum(b and not a for b, a in zip(before, after)) > 0
    assert Image.open(tmp_path / "changes.png").size[0] == 4 * (2 * 128 + 4 + 16)  # four before|after pairs a row
