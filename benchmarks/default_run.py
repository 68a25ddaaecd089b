"""The README's main command, measured: runs it, then writes its before/after grid and the judge's scores.

    python benchmarks/default_run.py            # = deepspeed launch/train.py --deepspeed configs/zero3.json

Outputs (``benchmarks/results/``): ``default_run_<device>.png`` (held-out prompts before | after, judge and reward
in the titles) and ``default_run_<device>.md`` (the judge's per-category scores, reward, wall time, stamp).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.common import RESULTS, ROOT, stamp  # noqa: E402

CATEGORY_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def side_by_side(before: Path, after: Path, titles: tuple[str, str], path: Path, scale: float = 1.0) -> Path:
    """Two grids next to each other under their titles, downscaled by ``scale`` (nearest: pixels stay crisp)."""
    images = [Image.open(before).convert("RGB"), Image.open(after).convert("RGB")]
    width, height = images[0].size
    width, height = int(width * scale), int(height * scale)
    header, gap = 18, 16
    canvas = Image.new("RGB", (2 * width + gap, height + header), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, title) in enumerate(zip(images, titles)):
        x = i * (width + gap)
        canvas.paste(image.resize((width, height), Image.NEAREST), (x, header))
        draw.text((x + 2, 3), title, fill="black")
    canvas.save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "default_measured")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for launch/train.py")
    args = parser.parse_args(argv)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    command = ["deepspeed", "launch/train.py", "--deepspeed", "configs/zero3.json"]
    command += [f"output_dir={args.output_dir}", *args.overrides]
    start = time.time()
    code = subprocess.run(command, cwd=ROOT).returncode
    seconds = time.time() - start
    if code != 0:
        print(f"default_run: {' '.join(command)} exited with {code}", file=sys.stderr)
        return code
    records = {tag: json.loads((args.output_dir / "images" / f"{tag}.json").read_text()) for tag in ("start", "end")}
    metrics = [json.loads(line) for line in (args.output_dir / "metrics.jsonl").read_text().splitlines()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tag = device.type
    env = stamp(device)

    def title(name: str) -> str:
        record = records[name]
        return (
            f"{name} (step {record['step']}): judge {record['judge']['overall']:.3f}, "
            f"reward {np.mean(record['reward']):.3f}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    side_by_side(
        args.output_dir / "images" / "start.png",
        args.output_dir / "images" / "end.png",
        (title("start"), title("end")),
        args.out / f"default_run_{tag}.png",
        scale=0.5 if len(records["start"]["prompts"]) > 48 else 1.0,  # 300 images: keep the PNG a few MB at most
    )
    count = len(records["start"]["prompts"])
    per_category = count // len(CATEGORY_ORDER)
    change = np.asarray(records["end"]["correct"], float) - np.asarray(records["start"]["correct"], float)
    half_width = 1.96 * change.std(ddof=1) / np.sqrt(count)
    lines = [
        f"# The README's main command ({env['device']}, torch {env['torch']}, deepspeed {env['deepspeed']}, "
        f"commit {str(env['commit'])[:10]}{' (dirty)' if env['dirty'] else ''}, {env['date']})",
        "",
        f"`{' '.join(command[:4])}`: {len(metrics)} steps in {seconds:.0f} s wall (launcher, loading and both "
        f"evaluations included). {count} held-out prompts ({per_category} per category, pairings never seen in "
        "fine-tuning), fixed seeds, the same at start and end. One training seed: a demonstration, not a ranking.",
        "",
        "| | judge overall | " + " | ".join(CATEGORY_ORDER) + " | held-out reward |",
        "|---|" + "---|" * (len(CATEGORY_ORDER) + 2),
    ]
    for name in ("start", "end"):
        judge = records[name]["judge"]
        cells = [f"{judge.get(c, float('nan')):.3f}" for c in CATEGORY_ORDER]
        reward = np.mean(records[name]["reward"])
        lines.append(f"| {name} | {judge['overall']:.3f} | " + " | ".join(cells) + f" | {reward:.4f} |")
    found = {name: records[name]["objects"].get("found", 0) for name in ("start", "end")}
    total = {name: sum(records[name]["objects"].values()) for name in ("start", "end")}
    first, last = metrics[:5], metrics[-5:]
    lines += [
        "",
        f"Judge change, paired over the {count} images: **{change.mean():+.3f} ± {half_width:.3f}** (95 % normal "
        f"interval); {int((change > 0).sum())} images turned ✓, {int((change < 0).sum())} turned ✗. Objects of the "
        f"prompts found: {found['start']} → {found['end']} of {total['start']}.",
        "",
        f"Training reward (`reward_mean`): {np.mean([m['reward_mean'] for m in first]):.3f} over the first 5 steps, "
        f"{np.mean([m['reward_mean'] for m in last]):.3f} over the last 5.",
    ]
    (args.out / f"default_run_{tag}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
