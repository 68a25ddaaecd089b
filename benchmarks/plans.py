"""Per-phase memory plans of the set-ups users ask about, as one table (``benchmarks/results/plans.md``).

    python benchmarks/plans.py

Planned, not measured: ``engine/memory/plan.py`` with the constants in ``engine/calibration.json`` (fitted on CPU rows,
``planner_error.md`` and ``reward_memory_cpu.md`` give their errors). 720² (the paper's size) for FLUX.1-dev, 1024²
for SD3.5-Medium, T = 25, two leaps, activation checkpointing on, bf16, one prompt per GPU per micro-step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, stamp  # noqa: E402
from engine.memory import PHASES, GiB, PlanInput, load_calibration, plan_memory  # noqa: E402  # noqa: E402

FLUX = dict(model="flux-dev", height=720, width=720, rewards=("hpsv21",))
SETUPS = [
    ("FLUX.1-dev + HPSv2.1, full, 8 × 24 GB", "ZeRO-3, optimizer offload, per-call gather",
     PlanInput(**FLUX, world_size=8, gpu_memory_gib=24, offload_optimizer=True, gather="per_call")),
    ("FLUX.1-dev + HPSv2.1, full, 8 × 80 GB", "ZeRO-3, gather once",
     PlanInput(**FLUX, world_size=8, gpu_memory_gib=80)),
    ("FLUX.1-dev + HPSv2.1, LoRA 64, 1 × 24 GB", "ZeRO-3, parameter + optimizer offload, per-call gather",
     PlanInput(**FLUX, world_size=1, gpu_memory_gib=24, lora_rank=64, offload_param=True, offload_optimizer=True,
               gather="per_call")),
    ("FLUX.1-dev + HPSv2.1, LoRA 64, 1 × 80 GB", "ZeRO-3, gather once",
     PlanInput(**FLUX, world_size=1, gpu_memory_gib=80, lora_rank=64)),
    ("SD3.5-M + PickScore, full, 8 × 24 GB", "ZeRO-3, optimizer offload, gather once, 1024²",
     PlanInput(model="sd35-medium", height=1024, width=1024, rewards=("pickscore",), world_size=8, gpu_memory_gib=24,
               offload_optimizer=True)),
    ("FLUX.1-dev + HPSv3, full, 8 × 80 GB", "ZeRO-3, gather once",
     PlanInput(model="flux-dev", height=720, width=720, rewards=("hpsv3",), world_size=8, gpu_memory_gib=80)),
]  # fmt: skip


def main() -> int:
    import torch

    calibration = load_calibration()
    meta = stamp(torch.device("cpu"))
    short = {"text encoding": "text", "load": "load", "rollout": "rollout", "reward": "reward",
             "leap/gradient": "leap", "optimizer step": "step"}  # fmt: skip
    lines = [
        "# Planned per-GPU memory, phase by phase (GiB)",
        "",
        f"`engine/memory/plan.py` at commit {meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}; constants: "
        f"{calibration.source}; rewards: {calibration.reward_source}. Planned, not measured: no GPU row yet.",
        "",
        "| set-up | knobs | " + " | ".join(short[p] for p in PHASES) + " | peak (dominant part) | fits | host |",
        "|---|---|" + "---|" * len(PHASES) + "---|---|---|",
    ]
    for name, knobs, inputs in SETUPS:
        plan = plan_memory(inputs, calibration)
        phases = " | ".join(
            f"**{plan.phase_total(p) / GiB:.1f}**" if p == plan.peak_phase else f"{plan.phase_total(p) / GiB:.1f}"
            for p in PHASES
        )
        host = sum(plan.host_bytes.values()) / GiB
        verdict = "yes" if plan.fits else f"no: {'; '.join(plan.fixes) or 'more GPUs'}"
        lines.append(f"| {name} | {knobs} | {phases} | {plan.peak_phase} ({plan.dominant}) | {verdict} | {host:.1f} |")
    out = RESULTS / "plans.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
