"""``benchmarks/gpu_suite.sh --dry-run``: the GPU suite's scripts run on CPU with tiny configs, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_gpu_suite_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    parts = [line.split(":")[0] for line in summary.splitlines() if ": rc=" in line]
    assert parts == ["pytest_gpu", "kernels", "memory_vs_depth", "step_overhead"], summary
    stamp = json.loads((out / "stamp.json").read_text())
    assert stamp["commit"] and stamp["device"] and stamp["torch"]
    for result in ("kernels_cpu.jsonl", "tiny/memory_vs_depth_cpu.jsonl", "tiny/planner_error.md"):
        assert (out / result).stat().st_size > 0, result
    collected = (out / "pytest_gpu.log").read_text()
    assert "test_cuda_rollout_caches_in_pinned_memory" in collected and " tests collected" in collected
