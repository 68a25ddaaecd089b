"""Gradient fidelity: how well each objective's gradient points along the exact full-trajectory gradient.

In the embedded world (its pretrained model and ``--reward``: ``world_clip`` or the structural ``world_scene``,
32², T = 25, fp32 on CPU), for each of
``--batches`` batches of fine-tuning prompts (the categories mixed, fixed noise per batch):

- the exact gradient: ``full_backprop`` (the hinge loss through all T Euler steps), deterministic;
- each objective's gradient over ``--draws`` draws of its random choices (anchor times, stop step, re-noising);

and reports the cosine of single draws with the exact gradient (mean ± sd) and the cosine of their mean (what an
average over many steps or ranks follows). The similarity weight rescales each sample's term, so LeapAlign's
direction differs from the exact one even with exact velocities; cosines are scale-free.

    python benchmarks/gradient_fidelity.py --gain    # ~15 min on 2 cores; benchmarks/results/gradient_fidelity_cpu.*
    python benchmarks/gradient_fidelity.py --reward world_scene --gain   # ..._cpu_world_scene.*

``--gain``: the *fresh-sample gain*. One step along an objective's gradient summed over n ∈ {8, 64, 256}
training samples (new noise), normalised to max |Δθ| = ``--step`` (1e-3), then ``--fresh`` fresh images (fine-tuning
prompts, seeds never used for training) are sampled before and after with the same noise: the paired change of
the reward and of the exact judge's verdicts, mean ± 95% CI. A reward whose gradient is a good
guide gains on fresh samples; one that is being hacked does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, stamp, write_jsonl  # noqa: E402
from engine.objectives import StepBatch, build_objective  # noqa: E402
from engine.rollout import rollout  # noqa: E402

STEPS, SIZE = 25, 32
# (label, objective, options): LeapAlign as the paper runs it, its ablations, and the baselines.
OBJECTIVES = [
    ("LeapAlign (2 leaps, α 0.3)", "leapalign", dict(n_leaps=2, alpha=0.3)),
    ("LeapAlign α 1", "leapalign", dict(n_leaps=2, alpha=1.0)),
    ("LeapAlign α 0", "leapalign", dict(n_leaps=2, alpha=0.0)),
    ("LeapAlign, no similarity weight", "leapalign", dict(n_leaps=2, alpha=0.3, similarity_weight=False)),
    ("LeapAlign 1 leap", "leapalign", dict(n_leaps=1, alpha=0.3)),
    ("LeapAlign 3 leaps", "leapalign", dict(n_leaps=3, alpha=0.3)),
    ("ReFL", "refl", {}),
    ("DRTune", "drtune", {}),
    ("DRaFT-LV", "draft_lv", {}),
]


def setup(reward_name: str = "world_clip"):
    from engine.models import FluxAdapter
    from engine.rewards import HingeTerm, RewardCriterion, load_reward
    from engine.world.evaluate import prompt_set
    from engine.world.paths import MODEL_DIR

    adapter = FluxAdapter.from_pretrained(str(MODEL_DIR), device="cpu", dtype=torch.float32)
    adapter.transformer.requires_grad_(True)
    reward = load_reward(reward_name, None, "cpu", torch.float32)
    criterion = RewardCriterion([HingeTerm(reward, reward.default_lam, 1.0)])
    by_category: dict[str, list[str]] = {}
    for prompt in prompt_set("finetune", per_category=64):
        by_category.setdefault(prompt.category, []).append(prompt.text)
    # round robin over the categories, so every batch mixes them
    prompts = [texts[i] for i in range(64) for texts in by_category.values() if i < len(texts)]
    return adapter, criterion, prompts, reward


def sampled_batch(adapter, criterion, prompts, seeds, keep, generator_seed: int = 0) -> StepBatch:
    """Prompts encoded, one fp32 rollout from the seeds' noise (keeping ``keep``), as an objective's StepBatch."""
    cond = adapter.encode_prompts(prompts)
    x1 = adapter.prepare_noise(len(prompts), SIZE, SIZE, seeds)
    grid = adapter.time_grid(STEPS, SIZE, SIZE)
    trajectory = rollout(
        adapter, cond, x1, grid, guidance_scale=3.5, keep=keep, dtype=torch.float32, height=SIZE, width=SIZE
    )
    return StepBatch(
        adapter=adapter, cond=cond, prompts=prompts, trajectory=trajectory, criterion=criterion, height=SIZE,
        width=SIZE, guidance_scale=3.5, generator=torch.Generator().manual_seed(generator_seed), dtype=torch.float32,
    )  # fmt: skip


def gradient(adapter, objective, batch: StepBatch, plan) -> torch.Tensor:
    params = [p for p in adapter.transformer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    objective.forward_backward(batch, plan)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--gain", action="store_true", help="also measure the fresh-sample gain (~10 min)")
    parser.add_argument("--fresh", type=int, default=504, help="fresh images per evaluation")
    parser.add_argument("--step", type=float, default=1e-3, help="max |Δθ| of the normalised step")
    parser.add_argument("--reward", default="world_clip", help="world_clip (default) or world_scene")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    adapter, criterion, pool, reward = setup(args.reward)
    suffix = "" if args.reward == "world_clip" else f"_{args.reward}"
    meta = stamp(torch.device("cpu"))
    started = time.perf_counter()
    rows = []
    for b in range(args.batches):
        prompts = pool[b * args.batch_size : (b + 1) * args.batch_size]
        batch = sampled_batch(adapter, criterion, prompts, [1000 * b + i for i in range(len(prompts))], "all")

        def batch_for(seed: int, batch=batch) -> StepBatch:
            return dataclasses.replace(batch, generator=torch.Generator().manual_seed(seed))

        exact_objective = build_objective("full_backprop", STEPS, checkpoint_steps=False)
        exact = gradient(adapter, exact_objective, batch_for(0), exact_objective.plan())
        for label, name, options in OBJECTIVES:
            objective = build_objective(name, STEPS, seed=b, **options)
            draws = [gradient(adapter, objective, batch_for(d), objective.plan()) for d in range(args.draws)]
            singles = [cosine(g, exact) for g in draws]
            rows.append(
                {
                    "objective": label, "batch": b, "draws": args.draws, "single_cosines": singles,
                    "mean_of_draws_cosine": cosine(torch.stack(draws).mean(0), exact), **meta,
                }
            )  # fmt: skip
            print(
                f"batch {b} {label}: single {statistics.mean(singles):.3f}, mean {rows[-1]['mean_of_draws_cosine']:.3f}"
            )
    seconds = time.perf_counter() - started
    args.output.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output / f"gradient_fidelity_cpu{suffix}.jsonl", rows)
    lines = [
        "# Gradient fidelity in the embedded world (CPU, fp32)",
        "",
        f"Commit {meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}, torch {meta['torch']}, {meta['date']}, "
        f"{seconds / 60:.1f} min for the cosines. world model + {args.reward}, 32², T = {STEPS}; {args.batches} "
        f"batches of {args.batch_size} fine-tuning prompts; {args.draws} draws per objective and batch. Cosine with "
        "the exact gradient through all 25 Euler steps (full backprop).",
        "",
        "| objective | single draw: cosine (mean ± sd, draws × batches) | mean of draws: cosine (mean over batches) |",
        "|---|---|---|",
    ]
    for label, _, _ in OBJECTIVES:
        mine = [r for r in rows if r["objective"] == label]
        singles = [c for r in mine for c in r["single_cosines"]]
        means = [r["mean_of_draws_cosine"] for r in mine]
        spread = statistics.stdev(singles) if len(singles) > 1 else 0.0
        lines.append(f"| {label} | {statistics.mean(singles):.3f} ± {spread:.3f} | {statistics.mean(means):.3f} |")
    if args.gain:
        gain_started = time.perf_counter()
        table = gain_table(adapter, criterion, reward, pool, args)
        table[0] += f" — {(time.perf_counter() - gain_started) / 60:.1f} min"
        lines += ["", *table]
    (args.output / f"gradient_fidelity_cpu{suffix}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, args.output / f"gradient_fidelity_cpu{suffix}.png")
    print("\n".join(lines))
    return 0


GAIN_OBJECTIVES = [
    ("exact (full backprop)", "full_backprop", dict(checkpoint_steps=False)),
    ("LeapAlign (2 leaps, α 0.3)", "leapalign", dict(n_leaps=2, alpha=0.3)),
    ("ReFL", "refl", {}),
    ("DRTune", "drtune", {}),
]


def _score(adapter, reward, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the reward and the judge's verdict (1/0), on the fixed fresh noise."""
    from engine.world.evaluate import generate
    from engine.world.judge import evaluate

    texts = [p.text for p in prompts]
    seeds = [10_000_000 + i for i in range(len(prompts))]
    with torch.no_grad():
        images = generate(adapter, texts, seeds, num_steps=STEPS, height=SIZE, width=SIZE)
        rewards = torch.cat([reward(images[i : i + 64], texts[i : i + 64]) for i in range(0, len(texts), 64)])
    verdicts = torch.tensor([float(j.correct) for j in evaluate(images, prompts).judgements])
    return rewards.float(), verdicts


def _ci(diff: torch.Tensor) -> str:
    mean, half = diff.mean().item(), 1.96 * diff.std().item() / len(diff) ** 0.5
    return f"{mean:+.4f} ± {half:.4f}"


def gain_table(adapter, criterion, reward, pool, args) -> list[str]:
    from engine.world.evaluate import prompt_set

    fresh = prompt_set("finetune", per_category=64)
    fresh = [fresh[i % len(fresh)] for i in range(args.fresh)]
    base_reward, base_judge = _score(adapter, reward, fresh)
    params = [p for p in adapter.transformer.parameters() if p.requires_grad]
    lines = [
        f"## Fresh-sample gain: one step of max |Δθ| = {args.step:g} from n training samples, {args.fresh} fresh "
        "images (paired, mean ± 95% CI)",
        "",
        f"Base model on the fresh images: {reward.name} {base_reward.mean():.4f}, judge {base_judge.mean():.4f}.",
        "",
        f"| objective | n | Δ {reward.name} | Δ judge |",
        "|---|---|---|---|",
    ]
    for label, name, options in GAIN_OBJECTIVES:
        for n in (8, 64, 256):
            objective = build_objective(name, STEPS, seed=n, **options)
            total = None
            for start in range(0, n, 8):
                prompts = [pool[(start + i) % len(pool)] for i in range(8)]
                plan = objective.plan()
                seeds = [5_000_000 + n * 1000 + start + i for i in range(8)]
                batch = sampled_batch(adapter, criterion, prompts, seeds, plan.positions, generator_seed=start)
                g = gradient(adapter, objective, batch, plan)
                total = g if total is None else total + g
            step = -args.step * total / total.abs().max()
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.add_(step[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            after_reward, after_judge = _score(adapter, reward, fresh)
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            lines.append(f"| {label} | {n} | {_ci(after_reward - base_reward)} | {_ci(after_judge - base_judge)} |")
            print(lines[-1])
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in OBJECTIVES]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["objective"] == label]
        singles = [c for r in mine for c in r["single_cosines"]]
        ax.scatter([i] * len(singles), singles, s=10, alpha=0.4, color="tab:blue")
        ax.scatter([i] * len(mine), [r["mean_of_draws_cosine"] for r in mine], s=40, marker="D", color="tab:red")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("cosine with the exact gradient")
    ax.set_title("Gradient fidelity (blue: single draws, red: mean of draws per batch)")
    ax.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
