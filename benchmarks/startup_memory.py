"""Start-up memory at scale, measured on CPU: per-rank host RSS while a ZeRO-3 run starts, and RSS vs prompts.

    python benchmarks/startup_memory.py --label after                       # this tree
    python benchmarks/startup_memory.py --label before --repo /tmp/old      # another checkout (e.g. the old code)

Rows (appended to ``benchmarks/results/startup_memory_cpu.jsonl``, table in ``startup_memory_cpu.md``):

- ``startup``: a 147M-parameter FLUX architecture (``engine.models.tiny.MID_FLUX_TRANSFORMER``, random weights
  saved as a diffusers folder), LoRA rank 8 so optimizer states do not count, 2 gloo ranks through the
  ``deepspeed`` launcher: each rank's peak RSS growth over start-up (``Trainer`` construction) above the process
  baseline with its libraries imported, against the transformer's bytes.
- ``prompts``: one rank, 200 and 5,000 prompts with 256 KiB of embedding each (T5 width 128 × 512 tokens), RSS
  after two training steps.

The runs go through this checkout's ``tests/distributed/startup_probe.py`` with ``--repo``'s code on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, ROOT, stamp, write_jsonl  # noqa: E402
from engine.models.tiny import MID_FLUX_TRANSFORMER, WIDE_T5_TRANSFORMER, build_tiny_flux  # noqa: E402

PROBE = Path("tests/distributed/startup_probe.py")
DS = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "memory_efficient_linear": False},
    "steps_per_print": 1000000,
}


def probe(repo: Path, work: Path, out: Path, ranks: int, steps: int, overrides: list[str]) -> list[dict]:
    ds = work / "ds.json"
    ds.write_text(json.dumps(DS))
    cmd = [str(ROOT / PROBE), str(out), *(["--steps", str(steps)] if steps else []), str(ds)]
    cmd += ["rewards.0.name=tiny_color", "logging.progress=false", "logging.tensorboard=false", *overrides]
    if ranks > 1:
        cmd = [shutil.which("deepspeed"), "--num_accelerators", str(ranks), "--master_port", "29611", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "LEAPALIGN_REPO": str(repo)}
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)
    return [json.loads((out / f"startup_rank{r}.json").read_text()) for r in range(ranks)]


def _row(r: dict, cells: list) -> str:
    commit = f"{(r['commit'] or '')[:10]}{' (dirty)' if r['dirty'] else ''}"
    return "| " + " | ".join(str(c) for c in [r["label"], commit, *cells]) + " |"


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = [
        "# Start-up host memory (CPU, gloo)",
        "",
        "Per-rank peak RSS growth while the trainer starts (ZeRO-3, 2 ranks, LoRA r=8), 147M-parameter FLUX",
        "architecture; bound used by `tests/distributed/test_partitioned_loading.py`: < 0.75 × the transformer.",
        "",
        "| label | commit | rank | start-up peak growth (MiB) | transformer (MiB) | ratio | whole-transformer loads |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["row"] == "startup":
            growth, size = r["startup_peak_rss_growth"], r["transformer_bytes"]
            cells = [r["rank"], f"{growth / 2**20:.0f}", f"{size / 2**20:.0f}", f"{growth / size:.2f}"]
            lines.append(_row(r, [*cells, len(r["whole_transformer_loads"])]))
    lines += [
        "",
        "Host RSS after 2 training steps vs the number of prompts (1 rank, 256 KiB of embedding per prompt):",
        "",
        "| label | commit | prompts | RSS after 2 steps (MiB) | store on disk (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["row"] == "prompts":
            lines.append(
                _row(r, [r["prompts"], f"{r['rss_after_steps'] / 2**20:.0f}", f"{r['store_bytes'] / 2**20:.0f}"])
            )
    stamps = {(r["device"], r["torch"], r["deepspeed"]) for r in rows}
    lines += ["", "Device, torch, deepspeed: " + "; ".join(", ".join(map(str, s)) for s in sorted(stamps))]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose code runs (default: this one)")
    parser.add_argument("--label", required=True, help="row label, e.g. before / after")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    repo = args.repo.resolve()
    context = {"label": args.label, **stamp(torch.device("cpu"), repo)}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        mid = build_tiny_flux(work / "mid", transformer=MID_FLUX_TRANSFORMER)
        for report in probe(repo, work, work / "startup", 2, 0, [f"model.path={mid}", "optim.lora_rank=8"]):
            rows.append({"row": "startup", **context, **report})
            print(f"rank {report['rank']}: +{report['startup_peak_rss_growth'] / 2**20:.0f} MiB at start-up")
        wide = build_tiny_flux(work / "wide", transformer=WIDE_T5_TRANSFORMER)
        for count in (200, 5000):
            prompts = work / f"prompts_{count}.txt"
            prompts.write_text("".join(f"a photo of object number {i}\n" for i in range(count)))
            out = work / f"prompts_{count}"
            overrides = [f"model.path={wide}", f"data.prompts={prompts}", "rollout.num_steps=4"]
            (report,) = probe(repo, work, out, 1, 2, overrides)
            store = sum(p.stat().st_size for p in (out / "run").rglob("*.safetensors") if "embeddings" in p.parts)
            rows.append({"row": "prompts", **context, **report, "store_bytes": store})
            print(f"{count} prompts: RSS {report['rss_after_steps'] / 2**20:.0f} MiB after 2 steps")
    jsonl = args.output / "startup_memory_cpu.jsonl"
    previous = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    previous = [r for r in previous if r["label"] != args.label]
    write_jsonl(jsonl, previous + rows)
    write_markdown(previous + rows, args.output / "startup_memory_cpu.md")


if __name__ == "__main__":
    main()
