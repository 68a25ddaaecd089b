"""The README's main command, measured: runs it, then writes its before/after grid and the judge's scores.

    python benchmarks/default_run.py            # = deepspeed launch/train.py --deepspeed configs/zero3.json

Outputs (``benchmarks/results/``): ``default_run_<device>.png`` (held-out prompts before | after, judge and reward
in the titles) and ``default_run_<device>.md`` (the judge's per-category scores, reward, wall time, stamp).
"""

from __future__ import annotations

import argparse
import json
import math
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


def verdict_changes(folder: Path, records: dict, path: Path, heading: str, pairs_per_row: int = 4) -> tuple[int, int]:
    """Every held-out image whose judge verdict changed between the start and end grids, as before | after pairs cut
    from the trainer's own grid PNGs (whole captions, reward and ✓/✗ as drawn there): the images that turned ✓
    first, then those that turned ✗. Returns the two counts."""
    from engine.evaluation import grid_captions
    from engine.images import grid_layout

    grids = {tag: Image.open(folder / f"{tag}.png").convert("RGB") for tag in ("start", "end")}
    layouts = {tag: grid_layout(grid_captions(r["prompts"], r["reward"])) for tag, r in records.items()}
    before, after = records["start"]["correct"], records["end"]["correct"]
    gained = [i for i, (b, a) in enumerate(zip(before, after)) if a and not b]
    lost = [i for i, (b, a) in enumerate(zip(before, after)) if b and not a]
    tile_w = layouts["start"].cell
    tile_h = max(layout.box(0)[3] - layout.box(0)[1] for layout in layouts.values())
    pair_w, gap, header = 2 * tile_w + 4, 16, 20
    # Plain ASCII titles: PIL's default font has no check marks or arrows.
    sections = [(f"judged wrong before training, right after: {len(gained)} images (before | after)", gained),
                (f"judged right before training, wrong after: {len(lost)} images (before | after)", lost)]  # fmt: skip

    def section_height(items: list[int]) -> int:  # one row of pairs at least, so an empty section keeps its title
        return max(1, math.ceil(len(items) / pairs_per_row)) * (tile_h + 6)

    height = header + sum(header + section_height(items) for _, items in sections)
    canvas = Image.new("RGB", (pairs_per_row * (pair_w + gap), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), heading, fill="black")
    y = header
    for title, items in sections:
        draw.text((4, y + 4), title, fill="black")
        y += header
        for n, index in enumerate(items):
            x, row = (n % pairs_per_row) * (pair_w + gap), y + (n // pairs_per_row) * (tile_h + 6)
            for k, tag in enumerate(("start", "end")):
                canvas.paste(grids[tag].crop(layouts[tag].box(index)), (x + k * (tile_w + 4), row))
            draw.line((x + tile_w + 2, row, x + tile_w + 2, row + tile_h), fill="gray")
        y += section_height(items)
    canvas.save(path)
    return len(gained), len(lost)


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

    count = len(records["start"]["prompts"])
    per_category = count // len(CATEGORY_ORDER)
    change = np.asarray(records["end"]["correct"], float) - np.asarray(records["start"]["correct"], float)
    half_width = 1.96 * change.std(ddof=1) / np.sqrt(count)
    args.out.mkdir(parents=True, exist_ok=True)
    # The full 300-image grids stay in the run folder; the figure shows what changed, readable at full scale.
    heading = f"{title('start')} | {title('end')} | paired {change.mean():+.3f} ± {half_width:.3f} ({count} images)"
    verdict_changes(args.output_dir / "images", records, args.out / f"default_run_{tag}.png", heading)
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
