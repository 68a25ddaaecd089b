"""Non-finite guard: a NaN reward or gradient skips the step untouched; K bad steps in a row stop the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.prompts import SMALL_PROMPTS

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# A child that registers a faulty reward, then runs launch/train.py's main(). The reward is tiny_color, except on
# the calls listed in BAD_CALLS (call 1 is the start-of-run image grid, call s+1 is training step s), where it
# returns NaN (FAULT=value) or a finite value whose gradient is NaN (FAULT=grad).
CHILD = """
import os, sys, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {launch!r})
from engine.rewards.base import RewardSpec, register
from engine.rewards.color import ColorReward

class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, g):
        return g * float("nan")

class Faulty(ColorReward):
    name = "faulty"
    calls = 0
    def __call__(self, images, prompts):
        Faulty.calls += 1
        if Faulty.calls in [int(c) for c in os.environ["BAD_CALLS"].split(",")]:
            if os.environ["FAULT"] == "value":
                images = images * float("nan")
            else:
                images = NanGrad.apply(images)
        return super().__call__(images, prompts)

register(RewardSpec("faulty", lambda path, device, dtype: Faulty(), needs_path=False, files="nothing"))
import train
sys.exit(train.main(sys.argv[1:]))
"""


def run(tmp_path, tiny_flux_dir, out, fault, bad_calls, steps, extra=()):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "steps_per_print": 1000000,
            }
        )
    )
    overrides = [
        f"model.path={tiny_flux_dir}",
        f"output_dir={out}",
        f"optim.max_steps={steps}",
        f"data.prompts={SMALL_PROMPTS}",
        "rollout.num_steps=6",
        "rollout.dtype=fp32",
        "rewards.0.name=faulty",
        "checkpoint.every=1",
        "checkpoint.keep_last=10",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.export=false",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(FAULT=fault, BAD_CALLS=",".join(map(str, bad_calls)))
    child = CHILD.format(repo=str(REPO), launch=str(REPO / "launch"))
    return subprocess.run(
        [sys.executable, "-c", child, "--deepspeed", str(ds), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def optimizer_state(checkpoint: Path) -> dict:
    # DeepSpeed's own checkpoint files hold Python objects: read in a test only, never in library code.
    (path,) = checkpoint.glob("*optim_states.pt")
    state = torch.load(path, weights_only=False)["optimizer_state_dict"]
    flat = state["fp32_flat_groups"]
    return {"fp32": [t.clone() for t in flat], "adam": state["optimizer_state_dict"]["state"]}


@pytest.mark.parametrize("fault", ["value", "grad"])
def test_a_nonfinite_step_is_skipped_and_changes_nothing(tmp_path, tiny_flux_dir, fault):
    out = tmp_path / "run"
    result = run(tmp_path, tiny_flux_dir, out, fault, bad_calls=[3], steps=3)  # step 2 is bad
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["applied"] for r in rows] == [True, False, True]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    after_1 = optimizer_state(out / "checkpoints" / "step_000001")
    after_2 = optimizer_state(out / "checkpoints" / "step_000002")
    after_3 = optimizer_state(out / "checkpoints" / "step_000003")
    assert all(torch.equal(a, b) for a, b in zip(after_1["fp32"], after_2["fp32"]))  # weights untouched
    for key, value in after_1["adam"][0].items():  # Adam moments and step count untouched
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(after_2["adam"][0][key])), key
    assert not all(torch.equal(a, b) for a, b in zip(after_2["fp32"], after_3["fp32"]))  # the next step trains


def test_consecutive_bad_steps_stop_the_run_with_a_final_checkpoint(tmp_path, tiny_flux_dir):
    out = tmp_path / "run"
    result = run(
        tmp_path,
        tiny_flux_dir,
        out,
        "grad",
        bad_calls=range(3, 100),
        steps=10,
        extra=["optim.max_consecutive_bad_steps=2"],
    )
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 consecutive steps had a non-finite loss or gradient"), last
    assert (out / "checkpoints" / "latest").read_text() == "step_000003"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["applied"] for r in rows] == [True, False, False]
