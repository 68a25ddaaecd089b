"""LeapAlign against its baselines and its own ablations, in the embedded world, judged by an exact evaluator.

Every method fine-tunes the embedded world's pretrained model (``engine/world/assets/model``) on the world_clip
reward with the same budget: the same prompts and noise seeds per step, one rollout per sample per step, the same
number of optimizer steps, the same DeepSpeed config (AdamW, lr, batch), the same prompt order. DRaFT-LV is the one
exception by design: its re-noise loops evaluate the reward ``draft_lv_renoise`` extra times per sample (its
paper's definition); the table says so.

Methods (``METHODS``): LeapAlign (2 leaps, α = the reward's 0.3, similarity weight, anchors over the whole
trajectory), ReFL, DRaFT-LV, DRTune, full-trajectory backprop; LeapAlign with α = 0, without the similarity weight,
with 1 and with 3 leaps, and with anchors restricted to the later half of the trajectory (levels ≤ T/2).

Each run goes through the real entry point (``launch/train.py``, one process per run, ZeRO-3; ``--jobs`` runs side
by side, each with cores / jobs threads). Every ``--eval-every``
steps the trainer renders its default evaluation prompts (the world's held-out split: colour–shape pairings
fine-tuning never sees, 8 per GenEval category) with fixed per-prompt seeds, scores them with the reward and
with the exact judge (``engine/world/judge.py``, GenEval's rules). A finished run keeps its
``summary.json``; re-running the script reuses it, so an interrupted benchmark resumes where it stopped.

Outputs (``benchmarks/results/``): ``methods_<device>.jsonl`` (one row per run and eval step, stamped with device,
versions and commit), ``methods_<device>.md`` (mean ± 95% CI over seeds at the last step) and
``methods_<device>.png`` (held-out reward and judge overall against steps).

Usage:
    python benchmarks/methods.py                      # 10 methods × 3 seeds on CPU
    python benchmarks/methods.py --methods leapalign refl --seeds 0 --steps 4 --eval-every 2   # smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, ROOT, stamp, write_jsonl  # noqa: E402
from engine.config import MethodConfig  # noqa: E402
from engine.data import EMBEDDED_EVAL_PER_CATEGORY  # noqa: E402

logger = logging.getLogger("methods")

NUM_STEPS = 25  # rollout grid (the paper's)
METHODS: dict[str, list[str]] = {
    "LeapAlign": [],
    "ReFL": ["method.objective=refl"],
    "DRaFT-LV": ["method.objective=draft_lv"],
    "DRTune": ["method.objective=drtune"],
    "Full backprop": ["method.objective=full_backprop"],
    "LeapAlign α=0": ["method.leapalign.alpha=0"],
    "LeapAlign no sim. weight": ["method.leapalign.similarity_weight=false"],
    "LeapAlign 1 leap": ["method.leapalign.n_leaps=1"],
    "LeapAlign 3 leaps": ["method.leapalign.n_leaps=3"],
    "LeapAlign later half": [f"method.leapalign.max_level={NUM_STEPS // 2}"],
}
CATEGORY_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Two-sided 97.5% Student-t quantiles by degrees of freedom (1–10), then the normal value.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), 0.0
    quantile = _T975[len(array) - 2] if len(array) - 1 <= len(_T975) else 1.96
    return float(array.mean()), float(quantile * array.std(ddof=1) / math.sqrt(len(array)))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower().replace("α", "alpha")).strip("_")


def _deepspeed_config(folder: Path, micro_batch: int, lr: float) -> Path:
    """The benchmark's DeepSpeed JSON: configs/zero3.json with this batch and learning rate, fp32 on CPU."""
    config = json.loads((ROOT / "configs" / "zero3.json").read_text(encoding="utf-8"))
    config.pop("_comment", None)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["optimizer"]["params"]["lr"] = lr
    if not torch.cuda.is_available():
        # CPU: fp32 weights and rollouts, so bf16 rounding of a 1.8M-parameter model is no second source of
        # difference between methods (bf16 forwards would be ~1.4x faster here: 29 vs 41 ms at batch 8).
        config["bf16"] = {"enabled": False}
    path = folder / "ds_config.json"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def run_one(name: str, seed: int, args, ds_config: Path, threads: int) -> dict:
    """Fine-tunes one method with one seed through launch/train.py (a child process); returns its summary.

    The summary is cached on disk: a finished run with the same settings is not redone.
    """
    folder = args.runs / f"{_slug(name)}_seed{seed}"
    summary_file = folder / "summary.json"
    if summary_file.exists() and not args.fresh:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if summary.get("settings") == _settings(args):
            return summary
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    overrides = [
        f"output_dir={folder}",
        f"optim.seed={seed}",
        f"optim.max_steps={args.steps}",
        "optim.ema_decay=null",
        f"rollout.num_steps={NUM_STEPS}",
        f"rollout.dtype={'bf16' if torch.cuda.is_available() else 'fp32'}",
        f"logging.image_every={args.eval_every}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.export=false",
        "checkpoint.keep_last=1",
        *METHODS[name],
    ]
    # A fresh process per run: DeepSpeed keeps process-global state that a second run in one process trips over.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["MASTER_PORT"] = str(29500 + 7 * seed + list(METHODS).index(name) * 50 % 1000)
    start = time.time()
    with (folder / "train.log").open("w") as log:
        command = [sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ds_config), *overrides]
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{name} seed {seed}: launch/train.py exited with {code}; see {folder / 'train.log'}")
    curve = []
    for record_file in sorted((folder / "images").glob("*.json")):
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record_file.stem == "end":
            continue  # the same step as the last step_N grid
        curve.append({"step": record["step"], "reward": float(np.mean(record["reward"])), "judge": record["judge"]})
    curve.sort(key=lambda row: row["step"])
    train = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = {
        "method": name,
        "seed": seed,
        "overrides": METHODS[name],
        "curve": curve,
        "train_reward": [row.get("reward_mean") for row in train],
        "seconds": round(time.time() - start, 1),
        "threads": threads,
        "settings": _settings(args),
    }
    summary_file.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    # Keep the summary, the log and the image grids; drop the checkpoint (tens of MB per run).
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return summary


def _settings(args) -> dict:
    return {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "micro_batch": args.batch,
        "lr": args.lr,
        "eval_per_category": EMBEDDED_EVAL_PER_CATEGORY,
    }


def table(summaries: list[dict], methods: list[str]) -> str:
    """Markdown: held-out reward and judge (overall, per category) at the last step, mean ± 95% CI over seeds."""
    base = summaries[0]["curve"][0]
    header = ["method", "seeds", "held-out reward", "judge overall", *CATEGORY_ORDER, "train reward Δ", "train s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cats = [c for c in CATEGORY_ORDER if c in base["judge"]]
    base_row = ["base model (step 0)", "–", f"{base['reward']:.4f}", f"{base['judge']['overall']:.3f}"]
    base_row += [f"{base['judge'][c]:.3f}" if c in cats else "–" for c in CATEGORY_ORDER] + ["–", "–"]
    lines.append("| " + " | ".join(base_row) + " |")
    for name in methods:
        runs = [s for s in summaries if s["method"] == name]
        if not runs:
            continue
        last = [r["curve"][-1] for r in runs]

        def cell(values, digits=3):
            mean, half = mean_ci95(values)
            return f"{mean:.{digits}f} ± {half:.{digits}f}"

        row = [name, str(len(runs)), cell([x["reward"] for x in last], 4), cell([x["judge"]["overall"] for x in last])]
        row += [cell([x["judge"][c] for x in last]) if c in cats else "–" for c in CATEGORY_ORDER]
        # Training-prompt reward, mean of the last 10 steps minus the first 10: did the method optimise its reward?
        trained = [r["train_reward"] for r in runs if len(r.get("train_reward") or []) >= 20]
        row.append(cell([np.mean(t[-10:]) - np.mean(t[:10]) for t in trained], 4) if trained else "–")
        row.append(f"{np.mean([r['seconds'] for r in runs]):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(summaries: list[dict], methods: list[str], reference: str = "LeapAlign") -> str:
    """Markdown: ``reference`` minus each other method, paired by seed (same prompts, noise and evaluation seeds),
    mean ± 95% CI over seeds, at the last step; an interval that excludes 0 is marked."""
    by_key = {(s["method"], s["seed"]): s["curve"][-1] for s in summaries}
    lines = [
        f"| {reference} minus | seeds | Δ held-out reward | Δ judge overall |",
        "|---|---|---|---|",
    ]
    for name in methods:
        if name == reference:
            continue
        seeds = sorted(seed for (method, seed) in by_key if method == name and (reference, seed) in by_key)
        if not seeds:
            continue
        cells = []
        for pick in (lambda p: p["reward"], lambda p: p["judge"]["overall"]):
            mean, half = mean_ci95([pick(by_key[(reference, s)]) - pick(by_key[(name, s)]) for s in seeds])
            mark = " *" if len(seeds) > 1 and abs(mean) > half else ""
            cells.append(f"{mean:+.3f} ± {half:.3f}{mark}")
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in methods:
        runs = [s for s in summaries if s["method"] == name]
        if not runs:
            continue
        steps = [row["step"] for row in runs[0]["curve"]]
        style = "-" if name in ("LeapAlign",) else ("--" if name.startswith("LeapAlign") else "-.")
        width = 2.5 if name == "LeapAlign" else 1.3
        for ax, key in zip(axes, ("reward", "judge")):
            pick = (lambda row: row["reward"]) if key == "reward" else (lambda row: row["judge"]["overall"])
            values = np.array([[pick(row) for row in r["curve"]] for r in runs])
            stats = [mean_ci95(values[:, i]) for i in range(values.shape[1])]
            mean = np.array([m for m, _ in stats])
            half = np.array([h for _, h in stats])
            (line,) = ax.plot(steps, mean, style, linewidth=width, label=name)
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.08)
    axes[0].set_title("held-out reward (world_clip), mean ± 95% CI")
    axes[1].set_title("judge overall (GenEval rules, held-out prompts)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="samples (rollouts) per step")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "methods", help="run folders (resumable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default=None, help="result file suffix (default: the device type)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs and redo them")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (CPU: each gets cores / jobs threads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("engine", "deepspeed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    args.runs.mkdir(parents=True, exist_ok=True)
    ds_config = _deepspeed_config(args.runs, args.batch, args.lr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tag = args.tag or device.type

    jobs = [(name, seed) for seed in args.seeds for name in args.methods]  # seed-major: every method gets seed 0 first
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    summaries: dict[tuple[str, int], dict] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, name, seed, args, ds_config, threads): (name, seed) for name, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            name, seed = futures[future]
            summary = summaries[(name, seed)] = future.result()
            last = summary["curve"][-1]
            logger.info(
                "[%d/%d] %s seed %d: held-out reward %.4f, judge %.3f (%.0f s)",
                len(summaries), len(jobs), name, seed, last["reward"], last["judge"]["overall"], summary["seconds"],
            )  # fmt: skip
    summaries = [summaries[job] for job in jobs]

    env = stamp(device)
    rows = [
        {"method": s["method"], "seed": s["seed"], **point, "seconds": s["seconds"], **s["settings"], **env}
        for s in summaries
        for point in s["curve"]
    ]
    write_jsonl(args.out / f"methods_{tag}.jsonl", rows)
    settings = _settings(args)
    header = (
        f"# Methods in the embedded world ({env['device']}, torch {env['torch']}, deepspeed {env['deepspeed']}, "
        f"commit {str(env['commit'])[:10]}{' (dirty)' if env['dirty'] else ''}, {env['date']})\n\n"
        f"Each method fine-tunes the embedded world's base model on `world_clip` for {settings['steps']} steps of "
        f"{settings['micro_batch']} rollouts (T = {NUM_STEPS}, lr {settings['lr']}, ZeRO-3, 1 process), seeds "
        f"{args.seeds}; values at the last step on {6 * settings['eval_per_category']} held-out prompts "
        f"({settings['eval_per_category']} per GenEval category, pairings never seen in fine-tuning), mean ± 95% CI "
        f"(Student t) over seeds. DRaFT-LV evaluates the reward {1 + MethodConfig().draft_lv_renoise} times per sample "
        "(its re-noise loops); every "
        "other method once.\n\n"
    )
    paired = ""
    if "LeapAlign" in args.methods and len(args.seeds) > 1:
        paired = (
            "\n\nPaired by seed (every method of a seed saw the same prompts, noise and evaluation seeds), LeapAlign "
            "minus each other method at the last step, mean ± 95% CI; * = the interval excludes 0.\n\n"
            + paired_table(summaries, args.methods)
        )
    report = header + table(summaries, args.methods) + paired + "\n"
    (args.out / f"methods_{tag}.md").write_text(report, encoding="utf-8")
    plot(summaries, args.methods, args.out / f"methods_{tag}.png")
    logger.info("wrote %s", args.out / f"methods_{tag}.md")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
