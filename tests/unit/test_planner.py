"""The phase-by-phase planner (engine/memory/plan.py, launch/plan.py) and the shipped configs' stated hardware.

- Every phase is planned and the peak phase and its dominant component are named; reward models and text encoders
  are counted from their released architectures (before: rewards 0, no text phase).
- A plan that does not fit names the config key that fits it, and that key does fit it.
- Every config under configs/ names the GPUs it is for, and the planner says it fits them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.memory import REWARD_ARCHS, TEXT_ENCODERS, GiB, PlanInput, counted, load_calibration, plan_memory

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CAL = load_calibration()


@pytest.mark.parametrize(
    ("name", "billions"),
    [("hpsv21", 0.986), ("pickscore", 0.986), ("clipscore", 0.428), ("hpsv3", 8.29)],
)
def test_reward_models_are_counted_from_their_released_architectures(name, billions):
    # open_clip ViT-H-14 and CLIP-ViT-H-14: 986M; CLIP ViT-L/14: 428M; Qwen2-VL-7B: 8.29B (+ the reward head)
    assert counted(REWARD_ARCHS[name].count) == pytest.approx(billions * 1e9, rel=0.01)


def test_text_encoders_are_counted_and_are_a_phase_of_their_own():
    t5 = dict(TEXT_ENCODERS["flux"])["T5-XXL encoder"]
    assert counted(t5) == pytest.approx(4.76e9, rel=0.01)
    on_gpu = plan_memory(PlanInput(model="flux-dev", world_size=8, rewards=("hpsv21",)), CAL)
    text = on_gpu.phases["text encoding"]["text encoders"]
    assert text == pytest.approx((4.76e9 + 0.123e9) * 2, rel=0.01)
    # the text phase holds only what exists then: the rewards (built first), not the transformer or its states
    assert on_gpu.phase_total("text encoding") == text + on_gpu.resident["reward hpsv21 weights"] + int(1.5 * GiB)
    on_cpu = plan_memory(PlanInput(model="flux-dev", world_size=8, text_encoders_on_gpu=False), CAL)
    assert on_cpu.phases["text encoding"]["text encoders"] == 0
    assert on_cpu.host_bytes["text encoders (text phase only)"] == text


def test_every_phase_is_planned_and_the_peak_is_named():
    plan = plan_memory(PlanInput(model="flux-dev", world_size=8, gpu_memory_gib=24, rewards=("hpsv21",)), CAL)
    assert list(plan.phases) == ["text encoding", "load", "rollout", "reward", "leap/gradient", "optimizer step"]
    assert plan.peak_phase == "rollout" and plan.dominant == "gathered transformer copy"  # gather once
    assert plan.total == max(plan.phase_total(p) for p in plan.phases) == sum(plan.breakdown.values())
    weights = plan.resident["reward hpsv21 weights"]
    assert weights == counted(REWARD_ARCHS["hpsv21"].count) * 2
    assert plan.phases["reward"]["reward hpsv21 graph"] > 0  # decoupled: in the reward phase, not the gradient one
    coupled = plan_memory(PlanInput(model="flux-dev", objective="refl", rewards=("hpsv21",)), CAL)
    assert "reward hpsv21 graph" in coupled.phases["leap/gradient"]
    text = plan.format()
    assert "<- peak" in text and "dominated by gathered transformer copy" in text


@pytest.mark.parametrize(
    ("change", "fixes"),
    [
        (dict(world_size=8, gpu_memory_gib=40), ["rollout.gather_params: per_call"]),
        (dict(world_size=8, gpu_memory_gib=24), ["rollout.gather_params: per_call", "zero_optimization.offload_param"]),
        (dict(world_size=1, gpu_memory_gib=24, lora_rank=16, gather="per_call"), ["zero_optimization.offload_param"]),
    ],
)  # fmt: skip
def test_a_plan_that_does_not_fit_names_the_knobs_that_fit_it(change, fixes):
    plan = plan_memory(PlanInput(model="flux-dev", rewards=("hpsv21",), **change), CAL)
    assert not plan.fits and len(plan.fixes) == len(fixes), plan.fixes
    assert all(text.startswith(prefix) for text, prefix in zip(plan.fixes, fixes, strict=True)), plan.fixes
    assert plan_memory(plan.fixed, CAL).fits
    assert f"to fit: {plan.fixes[0]}" in plan.format()


def test_plan_reads_a_run_config_and_its_deepspeed_json(capsys):
    from launch.plan import main

    files = ["--config", str(CONFIGS / "flux_hpsv21.yaml"), "--deepspeed", str(CONFIGS / "zero3_offload.json")]
    code = main([*files, "--world-size", "8", "--gpu-memory", "24", "--json"])
    plan = json.loads(capsys.readouterr().out)
    inputs = plan["inputs"]
    assert inputs["rewards"] == ["hpsv21"] and inputs["height"] == 720 and inputs["gather"] == "per_call"
    assert inputs["zero_stage"] == 3 and inputs["offload_optimizer"] and inputs["batch_size"] == 4
    assert code == (0 if plan["fits"] else 1) and plan["peak_phase"] in plan["phases"]


def _hardware(text: str) -> tuple[int, float]:
    match = re.fullmatch(r"(\d+) x (\d+) GB", text)
    assert match, f"hardware {text!r} is not 'N x M GB'"
    return int(match.group(1)), float(match.group(2))


def _pairs() -> list[tuple[str, str, str]]:
    pairs = []
    for json_path in sorted(CONFIGS.glob("*.json")):
        stated = json.loads(json_path.read_text())["_hardware"]
        pairs += [(yaml, json_path.name, hardware) for yaml, hardware in stated.items()]
    return pairs


def test_every_config_names_its_hardware():
    yamls = {f"configs/{p.name}" for p in CONFIGS.glob("*.yaml")}
    paired = {yaml for yaml, _, _ in _pairs()}
    assert paired == yamls  # every JSON names its hardware per run YAML, and every YAML is someone's pair
    for yaml in yamls:
        line = next(ln for ln in (CONFIGS.parent / yaml).read_text().splitlines() if ln.startswith("# Hardware:"))
        stated = {f"# Hardware: {hardware} with configs/{j} " for y, j, hardware in _pairs() if y == yaml}
        assert any(line.startswith(prefix) for prefix in stated), (line, stated)


@pytest.mark.parametrize(("yaml", "json_name", "hardware"), _pairs(), ids=lambda v: str(v))
def test_shipped_config_fits_the_hardware_it_names(yaml, json_name, hardware, capsys):
    from launch.plan import main

    gpus, memory = _hardware(hardware)
    argv = ["--config", str(CONFIGS.parent / yaml), "--deepspeed", str(CONFIGS / json_name), "--world-size", str(gpus)]
    code = main([*argv, "--gpu-memory", str(memory), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"], (yaml, json_name, hardware, plan["peak_phase"], plan["total"] / GiB)
