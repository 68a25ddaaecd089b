"""Predict per-GPU peak memory of a LeapAlign / baseline training set-up before launching it.

    python launch/plan.py --model flux-dev --world-size 8 --gpu-memory 24 --zero 3 --offload-optimizer --resolution 720

Prints the breakdown of ``engine.memory.plan_memory`` (parameters, gradients, optimizer states, rollout gathered
copy, gradient-pass activations, reward/VAE graph, reserve) and whether it fits; exits 1 when it does not.
Activation constants come from ``engine/calibration.json`` (shipped with the package; fitted by
``benchmarks/memory_vs_depth.py``); errors of the formula against measured rows:
``benchmarks/results/planner_error.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.memory import MODELS, PlanInput, load_calibration, plan_memory  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-GPU memory planner (analytic, calibrated on measured rows).")
    parser.add_argument("--model", default="flux-dev", choices=sorted(MODELS), help="architecture config")
    parser.add_argument("--world-size", type=int, default=8, help="number of GPUs (data parallel / ZeRO shards)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU, GiB")
    parser.add_argument("--zero", type=int, default=3, choices=(0, 2, 3), help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload-optimizer", action="store_true", help="optimizer states and fp32 grads on CPU")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    parser.add_argument("--resolution", type=int, default=720, help="square image size in pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per GPU per step")
    parser.add_argument(
        "--objective", default="leapalign", choices=("leapalign", "full_backprop", "refl", "draft_lv", "drtune")
    )
    parser.add_argument("--n-leaps", type=int, default=2, help="LeapAlign leap depth (1-3)")
    parser.add_argument("--steps", type=int, default=25, help="rollout length T")
    parser.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false", help="turn activation checkpointing off"
    )
    parser.add_argument("--gather", default="once", choices=("once", "per_call"), help="ZeRO-3 rollout gathering")
    parser.add_argument("--reserve", type=float, default=1.5, help="GiB kept for CUDA context and workspaces")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.disable(logging.WARNING)  # diffusers' meta-device construction is chatty
    args = parse_args(argv)
    inputs = PlanInput(
        model=args.model,
        world_size=args.world_size,
        gpu_memory_gib=args.gpu_memory,
        zero_stage=args.zero,
        offload_optimizer=args.offload_optimizer,
        lora_rank=args.lora_rank,
        height=args.resolution,
        width=args.resolution,
        batch_size=args.batch_size,
        objective=args.objective,
        n_leaps=args.n_leaps,
        num_steps=args.steps,
        checkpointing=args.checkpointing,
        gather=args.gather,
        reserve_gib=args.reserve,
    )
    calibration = load_calibration()
    plan = plan_memory(inputs, calibration)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.format())
        print(f"activation constants: {calibration.source}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
