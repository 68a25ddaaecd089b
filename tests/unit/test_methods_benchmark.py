"""benchmarks/methods.py's statistics and report (the runs themselves are the benchmark, not a test)."""

from __future__ import annotations

import math

import pytest

from benchmarks.methods import METHODS, mean_ci95, paired_table, table


def test_mean_ci95_is_the_student_t_interval():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # t_{0.975, 2} · s / √n
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert mean_ci95([0.2] * 4)[1] == 0.0


def _summary(method, seed, reward, overall):
    judge = {"overall": overall, "position": overall / 2}
    return {
        "method": method,
        "seed": seed,
        "seconds": 10.0,
        "curve": [{"step": 0, "reward": 0.1, "judge": {"overall": 0.3, "position": 0.1}},
                  {"step": 5, "reward": reward, "judge": judge}],
    }  # fmt: skip


def test_table_reports_base_row_and_each_method_over_seeds():
    summaries = [_summary("LeapAlign", s, 0.2 + 0.01 * s, 0.5) for s in range(3)]
    summaries += [_summary("ReFL", s, 0.15, 0.4) for s in range(3)]
    text = table(summaries, ["LeapAlign", "ReFL", "DRTune"]).splitlines()
    assert text[2].startswith("| base model (step 0) | – | 0.1000 | 0.300 |")
    assert text[3].startswith("| LeapAlign | 3 | 0.2100 ± 0.0248 | 0.500 ± 0.000 |")
    assert text[4].startswith("| ReFL | 3 | 0.1500 ± 0.0000 | 0.400 ± 0.000 |")
    assert len(text) == 5  # DRTune has no runs: no row


def test_every_method_names_a_distinct_configuration():
    assert len({tuple(v) for v in METHODS.values()}) == len(METHODS)
    assert {"LeapAlign", "ReFL", "DRaFT-LV", "DRTune", "Full backprop"} <= set(METHODS)


def test_paired_table_differences_by_seed():
    summaries = [_summary("LeapAlign", s, 0.30 + 0.1 * s, 0.5) for s in range(3)]
    summaries += [_summary("ReFL", s, 0.20 + 0.1 * s, 0.5) for s in range(3)]  # 0.1 below on every seed
    summaries += [_summary("DRTune", 0, 0.1, 0.4)]  # one shared seed: no interval, no mark
    rows = paired_table(summaries, ["LeapAlign", "ReFL", "DRTune"]).splitlines()
    assert rows[2] == "| ReFL | 3 | +0.100 ± 0.000 * | +0.000 ± 0.000 |"
    assert rows[3] == "| DRTune | 1 | +0.200 ± 0.000 | +0.100 ± 0.000 |"
