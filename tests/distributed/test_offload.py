"""Offload on two gloo ranks through the `deepspeed` launcher trains the same weights as no offload.

- ``offload_optimizer`` with DeepSpeedCPUAdam (``torch_adam: false``: its ``cpu_adam`` op is built once here);
- ``offload_param`` + ``offload_optimizer`` (ZeRO-Infinity: each rank's parameter partition in host memory, fetched
  per sub-module), torch's AdamW;

against ZeRO-3 with everything on the device, same prompts, noise, anchors and global batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.distributed.test_zero3_two_ranks import ds_config, free_port, run
from tests.prompts import SMALL_PROMPTS

pytestmark = [pytest.mark.distributed, pytest.mark.integration, pytest.mark.slow]
needs_launcher = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")

OFFLOADS = {
    "none": ({}, True),
    "optimizer, DeepSpeedCPUAdam": ({"offload_optimizer": {"device": "cpu", "pin_memory": True}}, False),
    "parameters and optimizer": (
        {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu", "pin_memory": True}},
        True,
    ),
}


@needs_launcher
def test_offloaded_runs_train_the_weights_of_the_run_without_offload(tiny_flux_dir, tmp_path):
    overrides = [
        f"model.path={tiny_flux_dir}", "rewards.0.name=tiny_color", "optim.max_steps=3", "rollout.num_steps=6",
        f"data.prompts={SMALL_PROMPTS}",
        "rollout.dtype=fp32", "logging.progress=false", "logging.tensorboard=false",
    ]  # fmt: skip
    weights = {}
    for index, (name, (offload, torch_adam)) in enumerate(OFFLOADS.items()):
        out = tmp_path / f"run{index}"
        zero = {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0, **offload}
        config = ds_config(tmp_path / f"ds{index}.json", 1, zero, torch_adam)
        launcher = [shutil.which("deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]
        log = run([*launcher, "launch/train.py", "--deepspeed", str(config), f"output_dir={out}", *overrides])
        assert ("DeepSpeedCPUAdam" in log) == (not torch_adam), log[-3000:]  # DeepSpeed names its basic optimizer
        weights[name] = load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(Path(tiny_flux_dir) / "transformer" / "diffusion_pytorch_model.safetensors")
    plain = weights["none"]
    update = max((plain[k] - base[k]).abs().max().item() for k in plain)
    assert update > 1e-4  # it trained
    for name, trained in weights.items():
        diff = max((trained[k] - plain[k]).abs().max().item() for k in plain)
        print(f"{name}: max |Δ| vs no offload {diff:.2e} (largest update {update:.2e})")
        # Same fp32 maths; DeepSpeedCPUAdam's fused loop rounds differently from torch's AdamW (~1e-7 a step).
        assert diff < 0.02 * update, (name, diff, update)
