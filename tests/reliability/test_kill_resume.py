"""Kill the trainer with SIGKILL at random moments — mid-checkpoint included — and resume: nothing is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.prompts import SMALL_PROMPTS

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.integration]

STEPS = 5
WEIGHTS = "export/transformer/diffusion_pytorch_model.safetensors"

# Runs launch/train.py's main() in a child; with KILL_AT_SAVE=N the child SIGKILLs itself when it saves its trainer
# state for the N-th time (after DeepSpeed wrote that checkpoint's shards, before it is marked complete); with
# DISK_FULL_AT_SAVE=N that save fails as a full disk does (ENOSPC).
CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {launch!r})
kill_at = int(os.environ.get("KILL_AT_SAVE", "0"))
full_at = int(os.environ.get("DISK_FULL_AT_SAVE", "0"))
if kill_at or full_at:
    import errno
    import engine.checkpoint as ckpt
    real_save, calls = ckpt.torch.save, [0]
    def save(obj, path, *args, **kwargs):
        calls[0] += str(path).endswith("trainer_rank0.pt")  # count our own saves, not DeepSpeed's
        if kill_at and calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if full_at and calls[0] == full_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)
    ckpt.torch.save = save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def ds_config(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 1e-4, "torch_adam": True}},
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "steps_per_print": 1000000,
            }
        )
    )
    return path


def command(ds_json: Path, model_dir, out: Path) -> list[str]:
    child = CHILD.format(repo=str(REPO), launch=str(REPO / "launch"))
    overrides = [
        f"model.path={model_dir}",
        f"output_dir={out}",
        f"optim.max_steps={STEPS}",
        f"data.prompts={SMALL_PROMPTS}",
        "rollout.num_steps=6",
        "rollout.dtype=fp32",
        "checkpoint.every=1",
        "checkpoint.keep_last=2",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    return [sys.executable, "-c", child, "--deepspeed", str(ds_json), *overrides]


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**base, **extra}


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time_", "peak_"))} for r in rows]


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tiny_flux_dir, tmp_path):
    ds_json = ds_config(tmp_path / "ds.json")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(ds_json, tiny_flux_dir, straight), env=env(), check=True, capture_output=True, timeout=600)

    # 1. Killed while writing the second checkpoint's trainer state: a .tmp folder is left, never picked up.
    proc = subprocess.run(command(ds_json, tiny_flux_dir, killed), env=env(KILL_AT_SAVE="2"), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((killed / "checkpoints").glob(".tmp-*"))
    assert leftovers, "the kill should have interrupted a checkpoint in progress"
    assert (killed / "checkpoints" / "latest").read_text() == "step_000001"

    # 2. Killed at random wall-clock moments (loading, rollout, backward, saving — wherever they land).
    rng = random.Random(1234)
    for _ in range(2):
        child = subprocess.Popen(
            command(ds_json, tiny_flux_dir, killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(4.0, 12.0))
        child.send_signal(signal.SIGKILL)
        child.wait()

    # 3. Resume to the end.
    subprocess.run(command(ds_json, tiny_flux_dir, killed), env=env(), check=True, capture_output=True, timeout=600)
    a, b = load_file(straight / WEIGHTS), load_file(killed / WEIGHTS)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name  # CPU, deterministic: bit for bit
    assert metrics(killed) == metrics(straight)
    assert [r["step"] for r in metrics(killed)] == list(range(1, STEPS + 1))


def test_disk_full_during_a_save_exits_cleanly_and_resumes(tiny_flux_dir, tmp_path):
    ds_json = ds_config(tmp_path / "ds.json")
    out = tmp_path / "run"
    result = subprocess.run(
        command(ds_json, tiny_flux_dir, out),
        env=env(DISK_FULL_AT_SAVE="2"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 4
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device") and "resumes from its last complete checkpoint" in last
    assert (out / "checkpoints" / "latest").read_text() == "step_000001"
    assert (out / "checkpoints" / "step_000001" / "COMPLETE").exists()
    resumed = subprocess.run(command(ds_json, tiny_flux_dir, out), env=env(), capture_output=True, timeout=600)
    assert resumed.returncode == 0
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
