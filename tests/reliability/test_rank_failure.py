"""With two ranks, one rank dying makes the other exit within a bounded time with a clear message, not hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.prompts import SMALL_PROMPTS

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.integration]

# Rank 1 SIGKILLs itself at the start of its second training step; rank 0 is then alone in a collective.
CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {launch!r})
import engine.trainer as trainer
real_step = trainer.Trainer.train_step
def train_step(self):
    if self.rank == 1 and self.step == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self)
trainer.Trainer.train_step = train_step
import train
sys.exit(train.main(sys.argv[1:]))
"""
TIMEOUT_S = 20


def test_a_dead_rank_stops_the_other_within_the_collective_timeout(tmp_path, tiny_flux_dir):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            }
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "--deepspeed",
        str(ds),
        f"model.path={tiny_flux_dir}",
        f"output_dir={tmp_path / 'run'}",
        "optim.max_steps=5",
        f"data.prompts={SMALL_PROMPTS}",
        "rollout.num_steps=6",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"collective_timeout_s={TIMEOUT_S}",
    ]
    child = CHILD.format(repo=str(REPO), launch=str(REPO / "launch"))
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", child, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    procs[1].wait(timeout=600)
    died = time.monotonic()
    _, err = procs[0].communicate(timeout=TIMEOUT_S + 120)
    waited = time.monotonic() - died
    assert procs[1].returncode == -9
    assert procs[0].returncode not in (0, None)
    assert waited < TIMEOUT_S + 60, waited
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rank" in last, err[-2000:]
