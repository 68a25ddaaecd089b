"""Memory and time of one training step vs leap depth, objective, rollout length T and activation checkpointing.

One row = one step, measured after one warm-up step (so AdamW's states exist, as in training):

    rollout (no grad, T Euler steps) → objective.forward_backward (plain ``loss.backward()``) → torch AdamW step

Memory, three ways:

- ``saved_bytes``: peak live bytes saved for backward during ``forward_backward`` (``engine.memory
  .SavedTensorCounter``: saved_tensors_hooks, each storage counted once, freed graphs subtracted). Parameters
  (transformer and VAE weights, resident anyway) are excluded and reported as ``saved_param_bytes``;
  ``saved_total_bytes`` sums every storage saved during the step (several freed loss terms add up here).
- ``rss_peak_bytes``: peak RSS of the whole step above RSS at its start (``engine.memory.PeakRSS``: VmHWM reset by
  ``/proc/self/clear_refs``; freed-but-cached malloc memory makes this a lower bound of the step's real need).
- ``peak_bytes``: CUDA only, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; an
  out-of-memory step is recorded as ``"OOM"``.

Time: rollout / reward (VAE decode + reward forward, timed at their calls) / gradient passes (the rest of
``forward_backward``: transformer passes with gradient, their backward and the reward backward) / optimizer;
``time.perf_counter`` with CUDA synchronisation; medians of ``--repeats`` steps.

Full-size rows (``flux-dev``, ``sd35-medium``; CUDA only) use the real architecture configs with random bf16
weights, random text embeddings of the real shapes (no text encoders) and the real AutoencoderKL config; they train
LoRA (``--lora-rank``, default 64) since full fine-tuning of FLUX.1-dev with plain AdamW cannot fit one GPU. The
GPU path is exercised on CPU only with tiny-shaped configs; it has not run on a GPU yet.

Checkpointing on = ``apply_activation_checkpointing`` on the transformer + ``vae_gradient_checkpointing``; for full
backprop it also sets ``checkpoint_steps`` (recompute each sampling step), off = a plain graph through all T steps.

Usage:
    python benchmarks/memory_vs_depth.py --quick          # tiny FLUX rows on CPU, < 5 min on 2 cores
    python benchmarks/memory_vs_depth.py --models tiny flux-dev sd35-medium --resolutions 512 720   # GPU

Outputs (``benchmarks/results/``): ``memory_vs_depth_<device>.{jsonl,md}``,
``saved_vs_depth_and_T_<model>_<res>_<device>.png``, ``calibration.json`` (the planner's fitted constants, from
isolated tiny passes) and ``planner_error.md``. The planner reads ``engine/calibration.json`` (shipped with the
package): copy a new fit there to use it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    Timer,
    device_tag,
    median_spread,
    set_threads,
    stamp,
    tiny_flux_adapter,
    write_jsonl,
)
from engine.memory import (  # noqa: E402
    MODELS,
    Calibration,
    PeakRSS,
    SavedTensorCounter,
    activation_bytes,
    build_transformer,
    build_vae,
    load_calibration,
    transformer_units,
    vae_units,
)
from engine.models.base import Conditioning  # noqa: E402
from engine.objectives import StepBatch, build_objective  # noqa: E402
from engine.parallelize import apply_activation_checkpointing, apply_lora  # noqa: E402
from engine.rewards import RewardCriterion  # noqa: E402
from engine.rewards.color import ColorReward  # noqa: E402
from engine.rollout import rollout  # noqa: E402

logger = logging.getLogger("memory_vs_depth")

PROMPTS = ["a red circle", "two blue squares"]
LAM = 2.0  # above the colour reward's maximum (1): the hinge is active, every step has a gradient
TINY_TEXT_TOKENS = 64  # T5 tokens of the tiny rows (MODELS["tiny"].text_tokens is set to match)
STEPS = (10, 25, 50)

# (objective, options, label)
OBJECTIVES = [
    ("leapalign", {"n_leaps": 1}, "leapalign-1"),
    ("leapalign", {"n_leaps": 2}, "leapalign-2"),
    ("leapalign", {"n_leaps": 3}, "leapalign-3"),
    ("full_backprop", {}, "full_backprop"),
    ("refl", {}, "refl"),
    ("draft_lv", {}, "draft_lv"),
    ("drtune", {}, "drtune"),
]


def objective_options(name: str, options: dict, num_steps: int, checkpointing: bool) -> dict:
    options = dict(options)
    if name == "full_backprop":
        options["checkpoint_steps"] = checkpointing
    if name == "refl":
        options["last_steps"] = min(11, num_steps)
    return options


# --------------------------------------------------------------------------------------------------------------------
# Models


def random_adapter(model: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A full-size architecture with random weights (no text encoders): FLUX.1-dev or SD3.5-Medium, on CUDA."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.models import FluxAdapter, SD3Adapter

    spec = MODELS[model]
    transformer = build_transformer(spec, device=device, dtype=dtype).requires_grad_(True)
    vae = build_vae(spec, device=device, dtype=dtype)
    vae.register_to_config(scaling_factor=0.3611 if spec.family == "flux" else 1.5305)
    vae.register_to_config(shift_factor=0.1159 if spec.family == "flux" else 0.0609)
    empty = dict(text_encoder=None, tokenizer=None, device=device, dtype=dtype)
    if spec.family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, max_image_seq_len=4096
        )
        return FluxAdapter(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder_2=None, tokenizer_2=None, **empty
        )
    return SD3Adapter(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        **empty,
    )


def random_conditioning(model: str, batch_size: int, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """Random text embeddings of the real shapes (FLUX: T5 [B, 512, 4096] + CLIP pooled 768; SD3: [B, 333, 4096])."""
    spec = MODELS[model]
    width = spec.transformer["joint_attention_dim"]
    pooled = spec.transformer["pooled_projection_dim"]
    embeds = torch.randn(batch_size, spec.text_tokens, width, device=device, dtype=dtype)
    pooled_embeds = torch.randn(batch_size, pooled, device=device, dtype=dtype)
    if spec.family == "flux":
        text_ids = torch.zeros(spec.text_tokens, 3, device=device, dtype=dtype)
        return Conditioning(prompt_embeds=embeds, pooled=pooled_embeds, text_ids=text_ids)
    return Conditioning(
        prompt_embeds=embeds,
        pooled=pooled_embeds,
        negative_prompt_embeds=torch.randn_like(embeds),
        negative_pooled=torch.randn_like(pooled_embeds),
    )


class Setup:
    """A model, its conditioning and the step's fixed settings."""

    def __init__(
        self,
        model: str,
        device: torch.device,
        size: int,
        batch_size: int,
        folder: Path | None = None,
        lora_rank: int = 0,
    ):
        self.model, self.device, self.size = model, device, size
        self.prompts = (PROMPTS * batch_size)[:batch_size]
        if model == "tiny":
            self.adapter, _ = tiny_flux_adapter(device, TINY_TEXT_TOKENS, folder)
            self.cond = self.adapter.encode_prompts(self.prompts)
            self.dtype = torch.float32
        else:
            self.dtype = torch.bfloat16
            self.adapter = random_adapter(model, device, self.dtype)
            self.cond = random_conditioning(model, batch_size, device, self.dtype)
        self.lora_rank = lora_rank
        if lora_rank:
            apply_lora(self.adapter.transformer, lora_rank)
        self.guidance = 3.5 if MODELS[model].family == "flux" else 4.5
        self.criterion = RewardCriterion.single(ColorReward(), LAM)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.adapter.transformer.parameters() if p.requires_grad], lr=1e-6
        )
        self.reward_seconds = 0.0
        decode = self.adapter.decode

        def timed_decode(*args, **kwargs):  # instance attribute: the adapter's class is untouched
            start = _now(device)
            try:
                return decode(*args, **kwargs)
            finally:
                self.reward_seconds += _now(device) - start

        self.adapter.decode = timed_decode

    def checkpointing(self, enabled: bool) -> None:
        apply_activation_checkpointing(self.adapter.transformer, enabled)
        self.adapter.vae_gradient_checkpointing(enabled)


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------------------------------------------------
# One step


def train_step(setup: Setup, objective, seed: int) -> dict:
    """One rollout + forward_backward + AdamW step; returns timings and memory."""
    adapter, device, size = setup.adapter, setup.device, setup.size
    timer = Timer(device)
    plan = objective.plan()
    setup.reward_seconds = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        with timer.region("rollout"):
            x1 = adapter.prepare_noise(len(setup.prompts), size, size, [seed + b for b in range(len(setup.prompts))])
            grid = adapter.time_grid(objective.num_steps, size, size)
            trajectory = rollout(
                adapter,
                setup.cond,
                x1.to(device),
                grid,
                guidance_scale=setup.guidance,
                keep=plan.positions,
                dtype=setup.dtype,
                height=size,
                width=size,
            )
        batch = StepBatch(
            adapter=adapter,
            cond=setup.cond,
            prompts=setup.prompts,
            trajectory=trajectory,
            criterion=setup.criterion,
            height=size,
            width=size,
            guidance_scale=setup.guidance,
            generator=torch.Generator().manual_seed(seed),
            dtype=setup.dtype,
        )
        counter = SavedTensorCounter(exclude=[adapter.transformer, adapter.vae])
        handles = counter.attribute_module(adapter.transformer, "transformer")
        try:
            with timer.region("forward_backward"), counter:
                objective.forward_backward(batch, plan)
        finally:
            for handle in handles:
                handle.remove()
        with timer.region("optimizer"):
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
    seconds = timer.seconds
    return {
        "saved_bytes": counter.peak_bytes,
        "saved_total_bytes": counter.total_bytes,
        # saved inside transformer forwards (the gradient passes' graph; the rest is leap arithmetic and reward/VAE)
        "saved_transformer_bytes": counter.region_peak_bytes.get("transformer", 0),
        "saved_param_bytes": counter.param_bytes,
        "rss_peak_bytes": rss.peak_bytes,
        "rss_method": rss.method,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "time_rollout_s": seconds["rollout"],
        "time_reward_s": setup.reward_seconds,
        "time_gradient_s": seconds["forward_backward"] - setup.reward_seconds,
        "time_optimizer_s": seconds["optimizer"],
        "time_step_s": sum(seconds.values()),
    }


def run_case(
    setup: Setup, name: str, options: dict, label: str, num_steps: int, checkpointing: bool, repeats: int
) -> dict:
    """Warm-up step, then ``repeats`` timed steps; memory from the last one, times as medians (and spread)."""
    row = {
        "model": setup.model,
        "objective": name,
        "label": label,
        "leaps": options.get("n_leaps"),
        "T": num_steps,
        "checkpointing": checkpointing,
        "resolution": setup.size,
        "batch_size": len(setup.prompts),
        "dtype": str(setup.dtype).replace("torch.", ""),
        "lora_rank": setup.lora_rank,
    }
    setup.checkpointing(checkpointing)
    objective = build_objective(name, num_steps, seed=0, **objective_options(name, options, num_steps, checkpointing))
    try:
        train_step(setup, objective, seed=0)  # warm-up: allocator, AdamW states, kernels
        steps = [train_step(setup, objective, seed=1 + r) for r in range(repeats)]
    except torch.cuda.OutOfMemoryError:
        setup.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        row.update(peak_bytes="OOM", saved_bytes="OOM", rss_peak_bytes=None)
        return row
    finally:
        setup.checkpointing(False)
    last = steps[-1]
    row.update({k: last[k] for k in last if not k.startswith("time_")})
    for key in [k for k in last if k.startswith("time_")]:
        median, spread = median_spread([s[key] for s in steps])
        row[key] = median
        row[key.replace("_s", "_spread_s")] = spread
    row["repeats"] = repeats
    return row


# --------------------------------------------------------------------------------------------------------------------
# Calibration of the planner's activation formula (engine.memory), on isolated passes of the tiny model


def calibrate(setup: Setup) -> Calibration:
    """Fit the formula's constants from one isolated transformer pass and one decode+reward pass, each ckpt on/off."""
    adapter, size, spec = setup.adapter, setup.size, MODELS[setup.model]
    batch_size = len(setup.prompts)
    x = adapter.prepare_noise(batch_size, size, size, 0).to(setup.device)
    t = torch.full((batch_size,), 0.5, device=setup.device)
    element = torch.finfo(setup.dtype).bits // 8
    values = {}
    for checkpointing in (False, True):
        setup.checkpointing(checkpointing)
        with SavedTensorCounter(exclude=[adapter.transformer, adapter.vae]) as counter:
            v = adapter.velocity(x, t, setup.cond, guidance_scale=setup.guidance, height=size, width=size)
            v.sum().backward()
        block = counter.peak_bytes / (transformer_units(spec, size, size, batch_size) * element)
        latent = x.detach().requires_grad_(True)
        with SavedTensorCounter(exclude=[adapter.transformer, adapter.vae]) as counter:
            raw, _ = setup.criterion(adapter.decode(latent, size, size), setup.prompts)
            raw.sum().backward()
        vae = counter.peak_bytes / (vae_units(spec, size, size, batch_size) * element)
        values["checkpointed" if checkpointing else "plain"] = (block, vae)
    setup.checkpointing(False)
    adapter.transformer.zero_grad(set_to_none=True)
    return Calibration(
        block_plain=values["plain"][0],
        block_checkpointed=values["checkpointed"][0],
        vae_plain=values["plain"][1],
        vae_checkpointed=values["checkpointed"][1],
        source=f"tiny FLUX, {size}x{size}, batch {batch_size}, isolated passes ({setup.device.type})",
    )


# --------------------------------------------------------------------------------------------------------------------
# Outputs


def _mib(value) -> str:
    return value if isinstance(value, str) else ("—" if value is None else f"{value / 2**20:.2f}")


def write_markdown(rows: list[dict], path: Path, header: dict, skipped: list[str]) -> None:
    lines = [
        f"# Memory and time of one training step ({header['device']})",
        "",
        f"torch {header['torch']}, deepspeed {header['deepspeed']}, triton {header['triton']}, "
        f"diffusers {header['diffusers']}, {header['threads']} threads, commit `{header['commit']}`"
        f"{' (dirty tree)' if header['dirty'] else ''}, {header['date']}.",
        "",
        "saved = peak live bytes saved for backward during forward_backward (parameters excluded); in transformer = "
        "the part first saved inside transformer forwards (the gradient passes' graph); saved total = every storage "
        "saved during the step, each once (freed loss terms add up); RSS = peak resident growth of the step "
        "(VmHWM; malloc keeps freed memory, so a lower bound); times are medians in ms (rollout / reward = decode + "
        f"reward forward / gradient passes / optimizer); host load average {header['load_average']} (shared host: "
        "timings are noisy, memory is exact).",
        "",
        "| model | res | objective | T | ckpt | saved MiB | in transformer MiB | saved total MiB | RSS MiB "
        "| CUDA peak MiB | rollout | reward | grad | optim | step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        times = [r.get(k) for k in ("time_rollout_s", "time_reward_s", "time_gradient_s", "time_optimizer_s")]
        times.append(r.get("time_step_s"))
        fmt = ["—" if v is None else f"{1000 * v:.1f}" for v in times]
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['label']} | {r['T']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {_mib(r.get('saved_bytes'))} | {_mib(r.get('saved_transformer_bytes'))} "
            f"| {_mib(r.get('saved_total_bytes'))} | {_mib(r.get('rss_peak_bytes'))} "
            f"| {_mib(r.get('peak_bytes'))} | " + " | ".join(fmt) + " |"
        )
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], tag: str, output: Path = RESULTS) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs = []
    rows = [r for r in rows if isinstance(r.get("saved_bytes"), int)]
    for model, size in sorted({(r["model"], r["resolution"]) for r in rows}):
        subset = [r for r in rows if r["model"] == model and r["resolution"] == size]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for checkpointing, style in ((False, "-o"), (True, "--s")):
            ts = sorted({r["T"] for r in subset})
            for steps in ts:
                depth = [
                    (r["leaps"], r["saved_transformer_bytes"])
                    for r in subset
                    if r["objective"] == "leapalign" and r["T"] == steps and r["checkpointing"] == checkpointing
                ]
                depth.sort()
                full = [
                    r["saved_transformer_bytes"]
                    for r in subset
                    if r["objective"] == "full_backprop"
                    and r["T"] == steps
                    and r["checkpointing"] == checkpointing
                    and r["saved_transformer_bytes"] > 0  # checkpoint_steps keeps no transformer graph
                ]
                xs = [d for d, _ in depth] + ([steps] if full else [])
                ys = [b / 2**20 for _, b in depth] + ([full[0] / 2**20] if full else [])
                axes[0].plot(xs, ys, style, label=f"T={steps}, ckpt {'on' if checkpointing else 'off'}")
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("differentiated transformer passes (leaps 1-3; full backprop = T)")
        axes[0].set_ylabel("saved inside transformer passes (MiB)")
        axes[0].set_title(f"{model} {size}²: saved bytes vs leap depth")
        axes[0].legend(fontsize=7)
        for label in [o[2] for o in OBJECTIVES]:
            for checkpointing, style in ((False, "-o"), (True, "--s")):
                points = sorted(
                    (r["T"], r["saved_bytes"])
                    for r in subset
                    if r["label"] == label and r["checkpointing"] == checkpointing
                )
                if points:
                    axes[1].plot(
                        [p[0] for p in points],
                        [p[1] / 2**20 for p in points],
                        style,
                        label=f"{label} ckpt {'on' if checkpointing else 'off'}",
                    )
        axes[1].set_xlabel("rollout length T")
        axes[1].set_ylabel("saved for backward (MiB)")
        axes[1].set_yscale("log")
        axes[1].set_title("saved bytes vs T")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = output / f"saved_vs_depth_and_T_{model}_{size}_{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        outputs.append(path)
    return outputs


def planner_error(rows: list[dict], calibration: Calibration, path: Path) -> list[float]:
    """Predicted vs measured saved bytes for every measured row; writes the markdown error table."""
    lines = [
        "# Planner activation estimate vs measurement",
        "",
        f"Formula: `engine.memory.activation_bytes`; constants from `{calibration.source}` "
        f"(block plain {calibration.block_plain:.2f}, checkpointed {calibration.block_checkpointed:.2f}; "
        f"VAE plain {calibration.vae_plain:.2f}, checkpointed {calibration.vae_checkpointed:.2f}). "
        "Compared with each row's measured peak saved bytes (parameters excluded).",
        "",
        "| model | res | objective | T | ckpt | measured MiB | predicted MiB | error "
        "| transformer measured MiB | transformer predicted MiB | transformer error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows:
        if not isinstance(r.get("saved_bytes"), int):
            continue
        element = 4 if r["dtype"] == "float32" else 2
        prediction = activation_bytes(
            MODELS[r["model"]],
            r["objective"],
            n_leaps=r["leaps"] or 2,
            num_steps=r["T"],
            height=r["resolution"],
            width=r["resolution"],
            batch_size=r["batch_size"],
            checkpointing=r["checkpointing"],
            element_bytes=element,
            calibration=calibration,
        )
        predicted = prediction["peak"]
        error = predicted / r["saved_bytes"] - 1
        errors.append(error)
        graph, graph_predicted = r.get("saved_transformer_bytes", 0), prediction["transformer_graph"]
        graph_error = f"{graph_predicted / graph - 1:+.1%}" if graph else ("exact" if not graph_predicted else "—")
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['label']} | {r['T']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['saved_bytes'] / 2**20:.3f} | {predicted / 2**20:.3f} | {error:+.1%} "
            f"| {graph / 2**20:.3f} | {graph_predicted / 2**20:.3f} | {graph_error} |"
        )
    if errors:
        abs_errors = [abs(e) for e in errors]
        lines += [
            "",
            f"{len(errors)} rows: median |error| {statistics.median(abs_errors):.1%}, max {max(abs_errors):.1%}.",
        ]
    path.write_text("\n".join(lines) + "\n")
    return errors


# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU only (< 5 min on 2 cores)")
    parser.add_argument("--models", nargs="+", default=["tiny", "flux-dev", "sd35-medium"], choices=sorted(MODELS))
    parser.add_argument("--steps", nargs="+", type=int, default=list(STEPS), help="rollout lengths T")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[512, 720], help="full-size models (GPU)")
    parser.add_argument("--tiny-resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per row after one warm-up")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=64,
        help="LoRA rank of the full-size rows (0 = full fine-tuning: FLUX.1-dev's 11.9 B parameters with plain AdamW "
        "need ~96 GB in one process, so its rows would all be OOM); tiny rows always train every parameter",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see benchmarks.common.set_threads)")
    parser.add_argument("--objectives", nargs="+", default=[o[2] for o in OBJECTIVES])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="validate the planner with these fitted constants (e.g. from another resolution: a held-out check) "
        "instead of fitting new ones; the error table goes to planner_error_heldout.md",
    )
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(device, args.threads)
    models = ["tiny"] if args.quick else args.models
    skipped = []
    if device.type != "cuda":
        skipped = [f"{m}: needs CUDA" for m in models if m != "tiny"]
        models = [m for m in models if m == "tiny"]
    for line in skipped:
        logger.info("skipped %s", line)
    header = stamp(device)
    args.output.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device)
    objectives = [o for o in OBJECTIVES if o[2] in args.objectives]
    cases = []
    for model in models:
        sizes = [args.tiny_resolution] if model == "tiny" else args.resolutions
        for size in sizes:
            for label in objectives:
                for steps in args.steps:
                    for checkpointing in (False, True):
                        cases.append((model, size, label, steps, checkpointing))
    rows, setups, calibration = [], {}, None
    for model, size, (name, options, label), steps, checkpointing in tqdm(cases, desc="cases"):
        key = (model, size)
        if key not in setups:
            setups.clear()  # one full-size model in memory at a time
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            lora = 0 if model == "tiny" else args.lora_rank
            setups[key] = Setup(model, device, size, args.batch_size, lora_rank=lora)
            if model == "tiny" and calibration is None:
                calibration = calibrate(setups[key]) if args.calibration is None else load_calibration(args.calibration)
        row = run_case(setups[key], name, options, label, steps, checkpointing, args.repeats)
        row.update(header)
        rows.append(row)
    skipped_rows = [{"model": line.split(":")[0], "skipped": "needs CUDA", **header} for line in skipped]
    jsonl = write_jsonl(args.output / f"memory_vs_depth_{tag}.jsonl", rows + skipped_rows)
    write_markdown(rows, args.output / f"memory_vs_depth_{tag}.md", header, skipped)
    plot(rows, tag, args.output)
    if calibration is not None:
        name = "planner_error.md"
        if args.calibration is None:
            (args.output / "calibration.json").write_text(json.dumps(calibration.__dict__, indent=2) + "\n")
        else:
            name = "planner_error_heldout.md"
        errors = planner_error(rows, calibration, args.output / name)
        if errors:
            logger.info("planner: median |error| %.1f%%", 100 * statistics.median(abs(e) for e in errors))
    check_scaling(rows)
    logger.info("wrote %s", jsonl)
    return rows


def check_scaling(rows: list[dict]) -> None:
    """Log whether LeapAlign's saved bytes stay flat in T while full backprop's grow (they must, by construction)."""
    for model, size, checkpointing in sorted({(r["model"], r["resolution"], r["checkpointing"]) for r in rows}):
        for label in ("leapalign-1", "leapalign-2", "leapalign-3", "full_backprop"):
            series = sorted(
                (r["T"], r["saved_bytes"])
                for r in rows
                if r["label"] == label
                and r["model"] == model
                and r["resolution"] == size
                and r["checkpointing"] == checkpointing
                and isinstance(r.get("saved_bytes"), int)
            )
            if len(series) < 2:
                continue
            ratio = series[-1][1] / series[0][1]
            grows = not math.isclose(ratio, 1.0, rel_tol=0.01)
            logger.info(
                "%s %d ckpt=%s %s: saved(T=%d)/saved(T=%d) = %.2f (%s)",
                model,
                size,
                checkpointing,
                label,
                series[-1][0],
                series[0][0],
                ratio,
                "grows" if grows else "flat",
            )


if __name__ == "__main__":
    main()
