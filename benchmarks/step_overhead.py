"""Step time against its lower bound, and our rollout against diffusers' own denoising loop (tiny FLUX).

Lower bound of one training step: the rollout cannot beat T no-grad transformer forwards, and the gradient passes
cannot beat one forward+backward each, so

    bound = T × t_forward(no grad) + passes × t_forward+backward        (decode/reward/optimizer not counted)

with passes = n leaps (LeapAlign), T (full backprop), 1 (ReFL), 1 + renoise = 3 (DRaFT-LV), K = 2 (+1 no-grad
forward, DRTune). The report is measured step ÷ bound (1.0 = no overhead). The rollout is also timed against
``FluxPipeline(..., output_type="latent")`` with the same steps, size and precomputed prompt embeddings.

    python benchmarks/step_overhead.py      # writes benchmarks/results/step_overhead_<device>.{jsonl,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, device_tag, set_threads, stamp, sync, write_jsonl  # noqa: E402
from benchmarks.memory_vs_depth import OBJECTIVES, Setup, objective_options, train_step  # noqa: E402
from engine.objectives import build_objective  # noqa: E402
from engine.rollout import rollout  # noqa: E402


def median_time(fn, device, repeats: int, best: bool = False) -> float:
    """Median (or, with ``best``, minimum) seconds of ``repeats`` calls after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def gradient_passes(name: str, options: dict, num_steps: int) -> tuple[int, int]:
    """(passes with gradient, extra no-grad forwards) of one objective step."""
    if name == "leapalign":
        return options["n_leaps"], 0
    if name == "full_backprop":
        return num_steps, 0
    if name == "draft_lv":
        return 3, 0
    if name == "drtune":
        return 2, 1
    return 1, 0


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see benchmarks.common.set_threads)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(device, args.threads)
    setup = Setup("tiny", device, args.resolution, args.batch_size)
    adapter, size, steps = setup.adapter, args.resolution, args.steps
    header = stamp(device)
    batch_size = len(setup.prompts)
    x = adapter.prepare_noise(batch_size, size, size, 0).to(device)
    t = torch.full((batch_size,), 0.5, device=device)

    def forward_no_grad():
        with torch.no_grad():
            adapter.velocity(x, t, setup.cond, guidance_scale=setup.guidance, height=size, width=size)

    def forward_backward():
        adapter.velocity(x, t, setup.cond, guidance_scale=setup.guidance, height=size, width=size).sum().backward()

    # The bound uses the fastest observed calls (a shared host only ever slows a call down).
    t_forward = median_time(forward_no_grad, device, 20, best=True)
    t_forward_backward = median_time(forward_backward, device, 20, best=True)
    adapter.transformer.zero_grad(set_to_none=True)
    rows = []
    for name, options, label in OBJECTIVES:
        objective = build_objective(name, steps, seed=0, **objective_options(name, options, steps, False))
        train_step(setup, objective, seed=0)  # warm-up
        measured = [train_step(setup, objective, seed=1 + r) for r in range(args.repeats)]
        step = statistics.median(m["time_step_s"] for m in measured)
        step_best = min(m["time_step_s"] for m in measured)
        passes, extra = gradient_passes(name, options, steps)
        bound = (steps + extra) * t_forward + passes * t_forward_backward
        rows.append(
            {"kind": "step", "objective": label, "T": steps, "step_s": step, "bound_s": bound, "ratio": step / bound}
            | {"step_best_s": step_best, "ratio_best": step_best / bound}
            | {"forward_s": t_forward, "forward_backward_s": t_forward_backward, "resolution": size, **header}
        )

    # Rollout vs the pipeline's own loop, same latents, steps, size and prompt embeddings.
    from diffusers import FluxPipeline

    from benchmarks.common import tiny_flux_adapter

    _, folder = tiny_flux_adapter(device, 64)
    pipeline = FluxPipeline.from_pretrained(folder, local_files_only=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    x1 = adapter.prepare_noise(batch_size, size, size, [0, 1][:batch_size])
    grid = adapter.time_grid(steps, size, size)
    ours = median_time(
        lambda: rollout(adapter, setup.cond, x1, grid, guidance_scale=setup.guidance, keep=[], dtype=torch.float32),
        device,
        args.repeats,
    )
    theirs = median_time(
        lambda: pipeline(
            prompt_embeds=setup.cond.prompt_embeds,
            pooled_prompt_embeds=setup.cond.pooled,
            latents=x1,
            num_inference_steps=steps,
            guidance_scale=setup.guidance,
            height=size,
            width=size,
            output_type="latent",
        ),
        device,
        args.repeats,
    )
    rows.append(
        {"kind": "rollout_vs_pipeline", "T": steps, "rollout_s": ours, "pipeline_s": theirs, "ratio": ours / theirs}
        | {"resolution": size, **header}
    )
    tag = device_tag(device)
    write_jsonl(args.output / f"step_overhead_{tag}.jsonl", rows)
    lines = [
        f"# Step time vs lower bound (tiny FLUX, {size}², batch {batch_size}, T={steps}, {header['device']})",
        "",
        f"torch {header['torch']}, diffusers {header['diffusers']}, {header['threads']} threads, load average "
        f"{header['load_average']}, commit `{header['commit']}`, {header['date']}. Checkpointing off. "
        f"No-grad forward {1e3 * t_forward:.2f} ms, forward+backward {1e3 * t_forward_backward:.2f} ms "
        "(fastest of 20: the bound uses best-case costs).",
        "",
        "bound = (T + extra no-grad) × forward + passes × forward+backward; ratio = measured step ÷ bound.",
        "",
        "| objective | step ms (median) | step ms (best) | bound ms | ratio (median) | ratio (best) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "step":
            lines.append(
                f"| {r['objective']} | {1e3 * r['step_s']:.1f} | {1e3 * r['step_best_s']:.1f} "
                f"| {1e3 * r['bound_s']:.1f} | {r['ratio']:.2f} | {r['ratio_best']:.2f} |"
            )
    last = rows[-1]
    lines += [
        "",
        f"Rollout {1e3 * last['rollout_s']:.1f} ms vs FluxPipeline(output_type='latent') {1e3 * last['pipeline_s']:.1f}"
        f" ms for the same {steps} steps: ratio {last['ratio']:.2f}.",
    ]
    (args.output / f"step_overhead_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
