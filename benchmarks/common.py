"""Shared benchmark helpers: environment stamp, timers, and building models for the benchmark rows.

Every benchmark row carries ``stamp()`` (device, versions, commit, date) as STYLE.md asks.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def device_tag(device: torch.device) -> str:
    """Short tag used in result file names: ``cpu`` or ``cuda``."""
    return device.type


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional package is recorded as None
        return None


def stamp(device: torch.device, repo: Path = ROOT) -> dict:
    """Device, versions, the commit of ``repo`` (the tree whose code ran) and whether it was dirty, and the date."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        # other jobs share the host: the 1-minute load average says how contended the timings were
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def set_threads(device: torch.device, threads: int) -> None:
    """CPU runs use ``threads`` intra-op threads (default 1): on a shared host an OpenMP region waits for its slowest
    thread, and a descheduled thread turns a 10 µs copy into a multi-millisecond one. Recorded in every row."""
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the timer must see finished GPU work


class Timer:
    """Accumulates wall time of named regions (synchronising CUDA at both ends)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def region(self, name: str):
        timer = self

        class _Region:
            def __enter__(self):
                sync(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Region()


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, max − min)."""
    return statistics.median(values), (max(values) - min(values)) if values else 0.0


_TINY_DIR: Path | None = None


def tiny_flux_adapter(device: torch.device, max_sequence_length: int, folder: str | Path | None = None):
    """The tiny random FLUX of ``engine/models/tiny.py`` through the real loader (built once per process).

    ``folder``: an existing tiny FLUX folder to load instead (tests pass their session fixture's).
    """
    global _TINY_DIR
    from engine.models import FluxAdapter
    from engine.models.tiny import build_tiny_flux

    if folder is not None:
        _TINY_DIR = Path(folder)
    if _TINY_DIR is None:
        _TINY_DIR = build_tiny_flux(Path(tempfile.mkdtemp(prefix="tiny_flux_")) / "model")
    adapter = FluxAdapter.from_pretrained(
        _TINY_DIR, device=device, dtype=torch.float32, max_sequence_length=max_sequence_length
    )
    adapter.transformer.requires_grad_(True)
    return adapter, _TINY_DIR


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line; the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return path
