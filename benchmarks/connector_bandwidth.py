"""Leap connector bandwidth: fused Triton kernel vs the unfused PyTorch expression vs a plain device copy.

Per call, B·N elements of E bytes: the connector must read x̂ and x and write the connected latent and the next
leap's velocity input, ``4·B·N·E`` bytes (``kernels/connector.py``'s budget; the distance's partial sums are
negligible). Every row reports that budget divided by its median time (effective GB/s), and the percentage of the
bandwidth ``dst.copy_(src)`` (``2·B·N·E`` bytes) reaches on the same device: the copy is the practical ceiling.

Rows:
- ``copy``: ``dst.copy_(src)``.
- ``unfused``: the PyTorch expression the kernel replaces, ``x̂ + (x − x̂).detach()``, the α mixing
  ``α·x_c + (1 − α)·x_c.detach()`` and ``(x − x̂).abs().float().mean``.
- ``reference``: ``kernels.reference.connector_forward_reference`` (two clones + float32 distance).
- ``fused``: ``kernels.leap_connector(backend="triton")``, CUDA only. On CPU Triton runs only in its interpreter,
  which is not a speed measurement: the row is listed as skipped.

Shapes come from the real configs: FLUX packed latents [1, (H/16)·(W/16), 64] at 720² ([1, 2025, 64]) and 1024²
([1, 4096, 64]); SD3 latents [1, 16, H/8, W/8] at 720² ([1, 16, 90, 90]) and 1024² ([1, 16, 128, 128]).

    python benchmarks/connector_bandwidth.py            # writes benchmarks/results/kernels_<device>.{jsonl,md}
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
from engine.memory import MODELS  # noqa: E402

ALPHA = 0.3


def shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(name, latent shape) from the FLUX.1-dev and SD3.5-M configs at 720² and 1024²."""
    out = []
    for size in (720, 1024):
        flux = MODELS["flux-dev"]
        out.append((f"flux-dev {size}²", (1, flux.image_tokens(size, size), flux.transformer["in_channels"])))
    for size in (720, 1024):
        sd3 = MODELS["sd35-medium"]
        out.append((f"sd35-medium {size}²", (1, sd3.latent_channels, size // sd3.vae_scale, size // sd3.vae_scale)))
    return out


def unfused(prediction: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA):
    connected = prediction + (target - prediction).detach()
    velocity_input = alpha * connected + (1 - alpha) * connected.detach()
    distance = (target - prediction).abs().float().flatten(1).mean(dim=1)
    return connected, velocity_input, distance


def time_call(fn, device: torch.device, min_time: float = 0.02, samples: int = 9) -> tuple[float, float, float]:
    """(median, spread = max − min, best) seconds per call; each sample loops until ``min_time`` has passed.

    The loop count comes from the fastest of five single calls, so one preempted call (a shared CPU) cannot
    shrink it to one; the best sample is reported beside the median for the same reason.
    """
    for _ in range(3):
        fn()  # warm-up: allocator, kernel compilation / autotuning
    singles = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        singles.append(time.perf_counter() - start)
    loops = max(1, int(min_time / max(min(singles), 1e-7)))
    results = []
    for _ in range(samples):
        sync(device)
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        sync(device)
        results.append((time.perf_counter() - start) / loops)
    return statistics.median(results), max(results) - min(results), min(results)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (see benchmarks.common.set_threads)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(device, args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from leap_kernels import leap_connector
    from leap_kernels.reference import connector_forward_reference

    header = stamp(device)
    rows = []
    for name, shape in shapes():
        prediction = torch.randn(shape, device=device, dtype=dtype)
        target = torch.randn(shape, device=device, dtype=dtype)
        dst = torch.empty_like(target)
        numel, element = target.numel(), target.element_size()
        budget = 4 * numel * element
        copy_s, copy_spread, copy_best = time_call(lambda t=target, d=dst: d.copy_(t), device)
        copy_gbs = 2 * numel * element / copy_s / 1e9
        copy_best_gbs = 2 * numel * element / copy_best / 1e9
        candidates = {
            "unfused": lambda p=prediction, t=target: unfused(p, t),
            "reference": lambda p=prediction, t=target: connector_forward_reference(p, t, True),
        }
        if device.type == "cuda":
            candidates["fused"] = lambda p=prediction, t=target: leap_connector(p, t, ALPHA, backend="triton")
        base = {"shape": list(shape), "latent": name, "dtype": str(dtype).replace("torch.", ""), **header}
        rows.append(
            {**base, "impl": "copy", "seconds": copy_s, "spread_s": copy_spread, "bytes": 2 * numel * element}
            | {"gb_per_s": copy_gbs, "pct_of_copy": 100.0, "best_gb_per_s": copy_best_gbs, "best_pct_of_copy": 100.0}
        )
        for impl, fn in candidates.items():
            seconds, spread, best = time_call(fn, device)
            gbs, best_gbs = budget / seconds / 1e9, budget / best / 1e9
            rows.append(
                {**base, "impl": impl, "seconds": seconds, "spread_s": spread, "bytes": budget, "gb_per_s": gbs}
                | {"pct_of_copy": 100 * gbs / copy_gbs, "best_gb_per_s": best_gbs}
                | {"best_pct_of_copy": 100 * best_gbs / copy_best_gbs}
            )
        if device.type != "cuda":
            rows.append({**base, "impl": "fused", "skipped": "needs CUDA: Triton on CPU runs only in the interpreter"})
    tag = device_tag(device)
    write_jsonl(args.output / f"kernels_{tag}.jsonl", rows)
    lines = [
        f"# Leap connector vs copy bandwidth ({header['device']}, {str(dtype).replace('torch.', '')})",
        "",
        f"torch {header['torch']}, triton {header['triton']}, {header['threads']} threads, commit "
        f"`{header['commit']}`{' (dirty tree)' if header['dirty'] else ''}, {header['date']}, load average "
        f"{header['load_average']}. Effective GB/s = "
        "the connector's budget 4·N·E (copy: 2·N·E) ÷ median time; % of the measured copy bandwidth.",
    ]
    if device.type != "cuda":
        lines += [
            "",
            "**CPU run**: the fused Triton kernel is not timed (on CPU it runs only in Triton's interpreter, which "
            "is not a speed measurement); only the unfused/reference PyTorch expressions and the copy are.",
        ]
    lines += [
        "",
        "| latent | shape | impl | µs (median) | spread µs | GB/s | % of copy | best GB/s | best % of copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['latent']} | {r['shape']} | {r['impl']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['latent']} | {r['shape']} | {r['impl']} | {1e6 * r['seconds']:.1f} | {1e6 * r['spread_s']:.1f} "
            f"| {r['gb_per_s']:.2f} | {r['pct_of_copy']:.0f}% "
            f"| {r['best_gb_per_s']:.2f} | {r['best_pct_of_copy']:.0f}% |"
        )
    (args.output / f"kernels_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
