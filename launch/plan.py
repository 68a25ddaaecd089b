"""Predict per-GPU memory of every phase of a LeapAlign / baseline run before launching it.

    python launch/plan.py --model flux-dev --world-size 8 --gpu-memory 24 --zero 3 --offload-optimizer \\
        --resolution 720 --reward hpsv21
    python launch/plan.py --config configs/flux_hpsv21.yaml --deepspeed configs/zero3_offload.json \\
        --world-size 8 --gpu-memory 24

Prints what stays resident (parameters, gradients, optimizer states, VAE, every reward model), each phase (text
encoding, load, rollout, reward, leap/gradient, optimizer step) with its own parts, the peak phase and the component
that dominates it, host memory, and — when the plan does not fit — the config keys that would make it fit; exits 1
then. With ``--config`` / ``--deepspeed`` the run's own settings are planned (a model folder that exists is read for
its architecture; otherwise FLUX.1-dev's or SD3.5-Medium's); flags given explicitly override them. Constants:
``engine/calibration.json`` (fitted by ``benchmarks/memory_vs_depth.py`` and ``benchmarks/reward_memory.py``);
errors against measured rows: ``benchmarks/results/planner_error.md`` and ``reward_memory_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.memory import MODELS, REWARD_ARCHS, PlanInput, load_calibration, plan_memory, spec_from_folder  # noqa: E402  # noqa: E402

DEFAULTS = dict(
    model="flux-dev", zero=3, offload_optimizer=False, offload_param=False, lora_rank=0, resolution=720, batch_size=1,
    objective="leapalign", n_leaps=2, steps=25, checkpointing=True, gather="once", reward=[],
    text_encoder_device="gpu", frozen_dtype="bf16",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-GPU memory planner, phase by phase (calibrated on measured rows)."
    )
    parser.add_argument("--config", help="a run YAML (launch/train.py --config): plan its settings")
    parser.add_argument(
        "--deepspeed", help="a DeepSpeed JSON (launch/train.py --deepspeed): ZeRO stage, offload, batch"
    )
    parser.add_argument("--model", choices=sorted(MODELS), help="architecture (default flux-dev)")
    parser.add_argument("--world-size", type=int, default=8, help="number of GPUs (data parallel / ZeRO shards)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU, GiB")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (default 3)")
    parser.add_argument("--offload-optimizer", action="store_true", default=None, help="optimizer states on CPU")
    parser.add_argument("--offload-param", action="store_true", default=None, help="ZeRO-3 parameters on CPU")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank; 0 = full fine-tuning (default)")
    parser.add_argument("--resolution", type=int, help="square image size in pixels (default 720)")
    parser.add_argument("--batch-size", type=int, help="prompts per GPU per micro-step (default 1)")
    parser.add_argument("--objective", choices=("leapalign", "full_backprop", "refl", "draft_lv", "drtune"))
    parser.add_argument("--n-leaps", type=int, help="LeapAlign leap depth (1-3; default 2)")
    parser.add_argument("--steps", type=int, help="rollout length T (default 25)")
    parser.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false", default=None, help="checkpointing off"
    )
    parser.add_argument("--gather", choices=("once", "per_call"), help="ZeRO-3 rollout gathering (default once)")
    parser.add_argument("--reward", nargs="+", choices=sorted(REWARD_ARCHS), help="the rewards the run loads")
    parser.add_argument("--text-encoder-device", choices=("gpu", "cpu"), help="where prompts are encoded")
    parser.add_argument("--frozen-dtype", choices=("bf16", "fp16", "fp32"), help="VAE, text encoders, rewards")
    parser.add_argument("--reserve", type=float, default=1.5, help="GiB kept for CUDA context and workspaces")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def _from_run(args: argparse.Namespace) -> dict:
    """Settings read from --config / --deepspeed, as DEFAULTS keys (plus the architecture when a folder exists)."""
    found: dict = {}
    if args.config:
        from engine.config import load_config
        from engine.models.kinds import model_kind
        from engine.text_phase import model_folder

        cfg = load_config(args.config)
        folder = model_folder(cfg.model)
        if (folder / "transformer" / "config.json").is_file():
            found["spec"] = spec_from_folder(folder, cfg.model.kind)
        else:
            found["model"] = model_kind(cfg.model.kind).planner_spec
        found.update(
            lora_rank=cfg.optim.lora_rank, resolution=max(cfg.model.height, cfg.model.width),
            objective=cfg.method.objective, n_leaps=cfg.method.leapalign.n_leaps, steps=cfg.rollout.num_steps,
            checkpointing=cfg.model.gradient_checkpointing, gather=cfg.rollout.gather_params,
            reward=[r.name for r in cfg.rewards], frozen_dtype=cfg.model.frozen_dtype,
            text_encoder_device="cpu" if (cfg.model.text_encoder_device or "").startswith("cpu") else "gpu",
        )  # fmt: skip
    if args.deepspeed:
        from engine.config import resolve_deepspeed_config

        ds = resolve_deepspeed_config(args.deepspeed, args.world_size)
        zero = ds.get("zero_optimization", {})
        found.update(
            zero=int(zero.get("stage", 0)),
            offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") == "cpu",
            offload_param=(zero.get("offload_param") or {}).get("device", "none") == "cpu",
            batch_size=ds["train_micro_batch_size_per_gpu"],
        )
    return found


def plan_input(args: argparse.Namespace) -> PlanInput:
    values = {**DEFAULTS, **_from_run(args)}
    for key in DEFAULTS:  # flags given explicitly win over the run's files
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return PlanInput(
        model=values["model"], spec=values.get("spec"), world_size=args.world_size, gpu_memory_gib=args.gpu_memory,
        zero_stage=values["zero"], offload_optimizer=values["offload_optimizer"], offload_param=values["offload_param"],
        lora_rank=values["lora_rank"],
        height=values["resolution"], width=values["resolution"], batch_size=values["batch_size"],
        objective=values["objective"], n_leaps=values["n_leaps"], num_steps=values["steps"],
        checkpointing=values["checkpointing"], gather=values["gather"], rewards=tuple(values["reward"]),
        text_encoders_on_gpu=values["text_encoder_device"] == "gpu",
        frozen_bytes={"bf16": 2, "fp16": 2, "fp32": 4}[values["frozen_dtype"]], reserve_gib=args.reserve,
    )  # fmt: skip


def main(argv=None) -> int:
    logging.disable(logging.WARNING)  # diffusers' meta-device construction is chatty
    args = parse_args(argv)
    try:
        inputs = plan_input(args)
    except ValueError as error:  # ConfigError is a ValueError: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    calibration = load_calibration()
    plan = plan_memory(inputs, calibration)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.format())
        print(f"activation constants: {calibration.source}; rewards: {calibration.reward_source or 'none'}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
