"""The trainer runs a LeapAlign step with each reward, loaded by name from a local path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.prompts import SMALL_PROMPTS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from reward_fixtures import build_tiny_aesthetic, build_tiny_hf_clip, build_tiny_hps  # noqa: E402
from test_rewards_vlm import build_tiny_hpsv3, build_tiny_imagereward  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reward_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_checkpoints")
    clip = build_tiny_hf_clip(root / "clip")
    return {
        "hpsv21": build_tiny_hps(root / "hps"),
        "pickscore": clip,
        "clipscore": clip,
        "aesthetic": build_tiny_aesthetic(root / "aesthetic"),
        "imagereward": build_tiny_imagereward(root / "imagereward"),
        "hpsv3": build_tiny_hpsv3(root / "hpsv3"),
    }


@pytest.mark.parametrize("name", ["hpsv21", "pickscore", "clipscore", "aesthetic", "imagereward", "hpsv3"])
def test_one_leapalign_step_with_each_reward(name, reward_paths, tiny_flux_dir, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            }
        )
    )
    out = tmp_path / "run"
    args = [
        "--deepspeed",
        str(ds),
        f"model.path={tiny_flux_dir}",
        f"output_dir={out}",
        "optim.max_steps=1",
        f"data.prompts={SMALL_PROMPTS}",
        "rollout.num_steps=4",
        f"rewards.0.name={name}",
        f"rewards.0.path={reward_paths[name]}",
        "rewards.0.lam=1000",  # far above any tiny model's score: the hinge is active, the gradient must flow
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.export=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["applied"] and row["grad_norm"] is not None  # finite (non-finite is logged as null)
    if name != "clipscore":  # CLIPScore clamps cos < 0 to 0: on a random tiny CLIP its gradient may vanish
        assert row["grad_norm"] > 0
