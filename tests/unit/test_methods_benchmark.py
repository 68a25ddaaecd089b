"""benchmarks/methods.py's protocol pieces, statistics and report (the runs are the benchmark, not a test)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.methods import (
    COMMON,
    METHODS,
    PROTOCOL,
    _longest_first,
    choose_lr,
    fitted_rise,
    mean_ci95,
    method_overrides,
    objective_of,
    paired_table,
    result_rows,
    reward_override,
    split_prompts,
    table,
)
from engine.config import load_config


def test_mean_ci95_is_the_student_t_interval():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # t_{0.975, 2} · s / √n
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert mean_ci95([0.2] * 4)[1] == 0.0


def _evaluation(overall, reward=0.3, auc=0.8):
    return {"images": 12, "judge": {"overall": overall, "position": overall / 2},
            "reward": {"world_scene": reward, "world_clip": 0.7},
            "reward_vs_judge": {"world_scene": {"auc": auc}}}  # fmt: skip


def _summary(method, seed, reward, overall, lr=1e-3, auc=0.8):
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "seconds": 10.0,
        "test": _evaluation(overall, reward, auc),
        "settings": {"reward": "world_scene"},
    }


def test_table_reports_base_row_and_each_methods_gain_over_seeds():
    summaries = [_summary("LeapAlign", s, 0.2 + 0.01 * s, 0.5) for s in range(3)]
    summaries += [_summary("ReFL", s, 0.15, 0.4 + 0.01 * s, lr=5e-4, auc=0.7) for s in range(3)]
    text = table(summaries, ["LeapAlign", "ReFL", "DRTune"], _evaluation(0.3, 0.1, auc=0.87)).splitlines()
    assert text[2].startswith("| base model | – | – | 0.300 | – |")
    assert text[3].startswith("| LeapAlign | 0.001 | 3 | 0.500 ± 0.000 | +0.200 ± 0.000 * |")
    assert text[4].startswith("| ReFL | 0.0005 | 3 | 0.410 ± 0.025 | +0.110 ± 0.025 * |")
    assert "| 0.2100 ± 0.0248 | +0.1100 ± 0.0248 * |" in text[3]  # the reward over seeds, then its gain on the base
    assert "| 0.1000 | – | 0.7000 |" in text[2]
    assert "| 0.7000 | 0.870 |" in text[2] and "| 0.700 ± 0.000 |" in text[4]  # world_clip, then the reward's AUC
    assert len(text) == 5  # DRTune has no runs: no row
    assert text[3].endswith("| – | 10 |") and text[2].endswith("| – | – | – |")  # no gradient norms recorded: –
    for s, norms in zip(summaries[:3], ([1.0, 9.0, 3.0], [2.0, None, 4.0, 5.0], [7.0])):
        s["grad_norm"] = norms  # medians 3, 4 and 7 over the steps; None (no step) is skipped
    assert table(summaries, ["LeapAlign"], _evaluation(0.3)).splitlines()[3].endswith("| 4 | 10 |")


def test_every_method_names_a_distinct_configuration_with_the_papers_ablations():
    runs = {name: method_overrides(name, PROTOCOL["rollout_steps"]) for name in METHODS}
    assert len({tuple(v) for v in runs.values()}) == len(METHODS)
    assert {"LeapAlign", "ReFL", "DRaFT-LV", "DRTune", "Full backprop"} <= set(METHODS)
    overrides = {o for v in runs.values() for o in v}
    for needed in ("method.leapalign.alpha=0", "method.leapalign.alpha=1", "method.leapalign.similarity_weight=false",
                   "method.leapalign.n_leaps=1", "method.leapalign.n_leaps=3"):  # fmt: skip
        assert needed in overrides
    assert any(o.startswith("method.leapalign.max_level=") for o in overrides)
    assert any(o.startswith("method.leapalign.fixed_distance=") for o in overrides)


def test_grid_dependent_settings_scale_with_the_training_grid():
    """Version 4 trains on 12-step rollouts: the later half and the fixed distance are 6 levels, ReFL's window the
    paper's 11 of 25 scaled to 5 of 12; on version 3's 25-step grid they are what version 3 ran (12, 12, 11)."""
    assert PROTOCOL["rollout_steps"] == 12
    assert "method.leapalign.max_level=6" in method_overrides("LeapAlign later half", 12)
    assert "method.leapalign.fixed_distance=6" in method_overrides("LeapAlign fixed distance", 12)
    assert method_overrides("ReFL", 12) == ["method.objective=refl", "method.refl.last_steps=5"]
    assert "method.leapalign.max_level=12" in method_overrides("LeapAlign later half", 25)
    assert method_overrides("ReFL", 25)[-1] == "method.refl.last_steps=11"
    assert method_overrides("LeapAlign", 12) == []


def test_ablations_take_leapaligns_lr_and_baselines_their_own():
    assert objective_of("LeapAlign α=1") == "LeapAlign"
    assert objective_of("LeapAlign fixed distance") == "LeapAlign"
    assert objective_of("ReFL") == "ReFL"


def test_paired_table_differences_by_seed():
    summaries = [_summary("LeapAlign", s, 0.30 + 0.1 * s, 0.5) for s in range(3)]
    summaries += [_summary("ReFL", s, 0.20 + 0.1 * s, 0.5) for s in range(3)]  # 0.1 below on every seed
    summaries += [_summary("DRTune", 0, 0.1, 0.4)]  # one shared seed: no interval, no mark
    rows = paired_table(summaries, ["LeapAlign", "ReFL", "DRTune"]).splitlines()
    assert rows[2] == "| ReFL | 3 | +0.000 ± 0.000 | +0.100 ± 0.000 * |"
    assert rows[3] == "| DRTune | 1 | +0.100 ± 0.000 | +0.200 ± 0.000 |"


def test_lr_is_chosen_by_the_validation_judge_never_the_test():
    selection = [
        {"method": "ReFL", "lr": 5e-4, "validation": _evaluation(0.45), "test": _evaluation(0.9)},
        {"method": "ReFL", "lr": 1e-3, "validation": _evaluation(0.50), "test": _evaluation(0.1)},
    ]
    lr, lines = choose_lr(selection, _evaluation(0.40))
    assert lr == 1e-3
    assert lines == ["| ReFL | 0.0005 | +0.050 |", "| ReFL | 0.001 | +0.100 **chosen** |"]


def test_validation_prompts_use_pairings_that_training_never_sees(tmp_path):
    """Protocol 3: the training file holds no prompt with a validation pairing, the validation captions all use one
    (and no held-out pairing), and they cover every category, as the test does."""
    from engine.world.evaluate import prompt_set, world_prompt
    from engine.world.scenes import CATEGORIES, heldout_pairings, validation_pairings

    train_file, validation_file, captions = split_prompts(tmp_path, 300)
    train = [line for line in train_file.read_text().split("\n") if line]
    validation_lines = [line for line in validation_file.read_text().split("\n") if line]
    chosen, held = validation_pairings(0), heldout_pairings(0)
    assert len(validation_lines) == 300 and set(validation_lines) == set(captions)
    assert all(world_prompt(c).spec.pairings() & chosen for c in captions)
    assert not any(world_prompt(c).spec.pairings() & (chosen | held) for c in train)
    assert {p.category for p in prompt_set("validation", 50, cycle=True)} == set(CATEGORIES)
    assert [p.text for p in prompt_set("validation", 50, cycle=True)] == validation_lines
    assert len(train) >= 100 and not set(train) & set(captions)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_runs_overrides_make_a_valid_config(name):
    from engine.config.loading import load_config

    steps = PROTOCOL["rollout_steps"]
    cfg = load_config(
        None,
        [*COMMON, *method_overrides(name, steps), f"optim.max_steps={PROTOCOL['steps']}", f"rollout.num_steps={steps}"],
    )
    assert cfg.model.gradient_checkpointing is False and cfg.method.full_backprop.checkpoint_steps is False


def test_longest_runs_go_first_and_the_rest_keep_their_order():
    jobs = [("LeapAlign", 0), ("Full backprop", 0), ("LeapAlign α=0", 1), ("DRaFT-LV", 2), ("Full backprop", 1)]
    assert _longest_first(jobs) == [
        ("Full backprop", 0),
        ("Full backprop", 1),
        ("DRaFT-LV", 2),
        ("LeapAlign", 0),
        ("LeapAlign α=0", 1),
    ]


def test_fitted_rise_is_the_least_squares_line_over_the_run():
    """The training-reward trend: the fitted line's rise over the run, not the difference of two noisy means."""
    steps = np.arange(64)
    noise = np.random.default_rng(0).normal(0, 0.05, 64)
    assert fitted_rise(0.4 + 0.001 * steps) == pytest.approx(0.063)
    assert fitted_rise(np.full(64, 0.4)) == pytest.approx(0.0, abs=1e-12)
    assert fitted_rise(0.4 + 0.001 * steps + noise) == pytest.approx(0.063, abs=0.03)


def test_reward_override_sets_the_protocols_hinge_for_every_method():
    cfg = load_config(None, [reward_override("world_scene", PROTOCOL["lam"])])
    assert [(r.name, r.lam) for r in cfg.rewards] == [("world_scene", PROTOCOL["lam"])]
    assert all("rewards" not in o for name in METHODS for o in method_overrides(name, PROTOCOL["rollout_steps"]))


def test_result_rows_keep_each_runs_own_threads_and_drop_the_curves():
    summary = _summary("LeapAlign", 0, 0.2, 0.5) | {"threads": 1, "train_reward": [0.1], "grad_norm": [2.0]}
    (row,) = result_rows([summary], {"threads": 2, "commit": "abc", "device": "cpu"})
    assert row["threads"] == 1 and row["commit"] == "abc" and row["method"] == "LeapAlign"
    assert "train_reward" not in row and "grad_norm" not in row
