"""Memory measurement and the analytic planner (engine/memory/, launch/plan.py, benchmarks/memory_vs_depth.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.memory import (
    MODELS,
    Calibration,
    PlanInput,
    SavedTensorCounter,
    activation_bytes,
    parameter_counts,
    plan_memory,
)
from engine.objectives import build_objective

CAL = Calibration(block_plain=20.0, block_checkpointed=2.0, vae_plain=8.0, vae_checkpointed=2.0, source="test")


def test_saved_tensor_counter_counts_a_known_graph_exactly():
    torch.manual_seed(0)
    a = torch.randn(16, requires_grad=True)  # 64 bytes
    linear = nn.Linear(16, 4)  # weight 256 bytes, excluded
    with SavedTensorCounter(exclude=[linear]) as counter:
        b = a.exp()  # saves its result b: 64 bytes
        c = b.sin()  # saves b again: same storage, not counted twice
        d = b[:8].cos()  # saves a view of b: same storage
        e = linear(a)  # saves a (64 bytes) and the weight (a parameter: reported apart)
        loss = c.sum() + d.sum() + e.sum()
        assert counter.live_bytes == 128
        loss.backward()
    assert counter.peak_bytes == 128
    assert counter.total_bytes == 128
    assert counter.param_bytes == 4 * 16 * 4
    assert counter.live_bytes == 0  # backward freed the graph, and the counter saw it


def test_saved_tensor_counter_sees_freed_terms_and_checkpoint_inputs():
    x = torch.randn(32, requires_grad=True)
    with SavedTensorCounter() as counter:
        for _ in range(3):  # three terms, each freed before the next: peak is one term, total is three
            x.exp().sum().backward()
    assert counter.peak_bytes == 128 and counter.total_bytes == 3 * 128
    from torch.utils.checkpoint import checkpoint

    with SavedTensorCounter() as counter:
        y = checkpoint(lambda t: t.exp().exp().exp(), x, use_reentrant=False)  # keeps only its input
        y.sum().backward()
    assert counter.peak_bytes == 128


def test_saved_tensor_counter_attributes_a_module_region():
    linear = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)  # 128 bytes
    with SavedTensorCounter(exclude=[linear]) as counter:
        handles = counter.attribute_module(linear, "linear")
        h = torch.tanh(linear(x))  # linear saves x (in region); tanh saves its output (outside): 128 bytes each
        for handle in handles:
            handle.remove()
        assert counter.region_peak_bytes == {"linear": 128} and counter.live_bytes == 256
        h.sum().backward()
    assert counter.region_live_bytes == {"linear": 0} and counter.peak_bytes == 256


def tiny_plan(**changes) -> PlanInput:
    base = dict(model="tiny", world_size=1, gpu_memory_gib=1.0, zero_stage=0, height=64, width=64, reserve_gib=0.0)
    return PlanInput(**{**base, **changes})


def test_planner_breakdown_adds_up_and_scales():
    plan = plan_memory(tiny_plan(), CAL)
    assert plan.total == sum(plan.breakdown.values())
    assert plan.fits == (plan.total <= 1.0 * 2**30)
    counts = parameter_counts(MODELS["tiny"])
    assert plan.breakdown["transformer parameters (bf16)"] == counts["transformer"] * 2
    assert plan.breakdown["optimizer states (fp32)"] == counts["transformer"] * 12
    # ZeRO-3 divides the weights by the world size (ZeRO-2 only gradients and optimizer states)
    zero3 = plan_memory(tiny_plan(zero_stage=3, world_size=8), CAL)
    assert zero3.breakdown["transformer parameters (bf16)"] == plan.breakdown["transformer parameters (bf16)"] // 8
    zero2 = plan_memory(tiny_plan(zero_stage=2, world_size=8), CAL)
    assert zero2.breakdown["transformer parameters (bf16)"] == plan.breakdown["transformer parameters (bf16)"]
    assert zero2.breakdown["optimizer states (fp32)"] == plan.breakdown["optimizer states (fp32)"] // 8
    # offload moves the optimizer states to the host
    offload = plan_memory(tiny_plan(offload_optimizer=True), CAL)
    assert "optimizer states (fp32)" not in offload.resident
    assert offload.host_bytes["offloaded optimizer states + fp32 gradients"] == counts["transformer"] * 16


def test_planner_lora_removes_most_optimizer_state_on_flux_dev():
    full = plan_memory(PlanInput(model="flux-dev", zero_stage=0, world_size=1), CAL)
    lora = plan_memory(PlanInput(model="flux-dev", zero_stage=0, world_size=1, lora_rank=16), CAL)
    assert lora.breakdown["optimizer states (fp32)"] < 0.01 * full.breakdown["optimizer states (fp32)"]
    assert parameter_counts(MODELS["flux-dev"])["transformer"] == pytest.approx(11.9e9, rel=0.01)


def test_activation_formula_scales_with_checkpointing_depth_and_T():
    spec = MODELS["flux-dev"]
    kw = dict(height=720, width=720, calibration=CAL)
    plain = activation_bytes(spec, "leapalign", n_leaps=2, checkpointing=False, **kw)
    ckpt = activation_bytes(spec, "leapalign", n_leaps=2, checkpointing=True, **kw)
    assert ckpt["transformer"] < plain["transformer"] / 5
    one = activation_bytes(spec, "leapalign", n_leaps=1, checkpointing=False, **kw)["transformer"]
    three = activation_bytes(spec, "leapalign", n_leaps=3, checkpointing=False, **kw)["transformer"]
    assert three == pytest.approx(3 * one, rel=1e-6)
    leap = [activation_bytes(spec, "leapalign", num_steps=t, checkpointing=False, **kw)["peak"] for t in (10, 50)]
    full = [activation_bytes(spec, "full_backprop", num_steps=t, checkpointing=False, **kw)["peak"] for t in (10, 50)]
    assert leap[0] == leap[1] and full[1] > 4 * full[0]


def test_plan_cli_prints_the_breakdown(capsys):
    from launch.plan import main

    args = "--model flux-dev --world-size 8 --gpu-memory 24 --zero 3 --offload-optimizer --resolution 720"
    code = main(args.split())
    out = capsys.readouterr().out
    for part in ("transformer parameters (bf16)", "offloaded optimizer", "gathered transformer copy", "leap-pass"):
        assert part in out
    assert ("does NOT fit" in out) == (code == 1)


@pytest.fixture(scope="module")
def bench_setup(tiny_flux_dir):
    from benchmarks.memory_vs_depth import Setup

    return Setup("tiny", torch.device("cpu"), 32, 1, folder=tiny_flux_dir)


def test_benchmark_single_row_has_the_expected_keys(bench_setup):
    from benchmarks.memory_vs_depth import run_case

    row = run_case(bench_setup, "leapalign", {"n_leaps": 2}, "leapalign-2", 4, False, repeats=1)
    expected = {"objective", "leaps", "T", "checkpointing", "resolution", "model", "saved_bytes", "saved_param_bytes"}
    expected |= {"rss_peak_bytes", "peak_bytes", "time_rollout_s", "time_reward_s", "time_gradient_s"}
    expected |= {"time_optimizer_s", "time_step_s"}
    assert expected <= row.keys()
    assert row["saved_bytes"] > 0 and row["peak_bytes"] is None  # no CUDA peak on CPU
    assert all(row[k] >= 0 for k in expected if k.startswith("time_"))


def test_benchmark_leapalign_flat_in_T_full_backprop_grows(bench_setup):
    from benchmarks.memory_vs_depth import train_step

    def saved(name, options, steps):  # one step, no warm-up: saved bytes do not depend on it
        return train_step(bench_setup, build_objective(name, steps, **options), seed=0)["saved_bytes"]

    assert saved("leapalign", {"n_leaps": 2}, 4) == saved("leapalign", {"n_leaps": 2}, 8)
    plain = {"checkpoint_steps": False}  # a graph through every sampling step
    assert saved("full_backprop", plain, 8) > 1.5 * saved("full_backprop", plain, 4)
