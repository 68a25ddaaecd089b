"""Where a run's numbers go: the step timer, and the metrics log (``metrics.jsonl`` and TensorBoard, rank 0)."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class StepTimer:
    """Wall-clock phases of a step. On CUDA each mark synchronises (a deliberate host sync, once per phase)."""

    device: torch.device

    def __post_init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync point: phase timing
        now = time.perf_counter()
        self.times[f"time_{phase}"] = self.times.get(f"time_{phase}", 0.0) + now - self._last
        self._last = now


class MetricsLog:
    """One JSON row per logged step in ``<run>/metrics.jsonl`` and, optionally, TensorBoard scalars; rank 0 writes,
    other ranks' calls do nothing."""

    def __init__(self, run_dir: Path, rank: int, *, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rank = rank
        self.tensorboard = tensorboard
        self._writer = None

    def write(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(_json_safe(metrics)) + "\n")
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.path.parent / "tensorboard"))
            for key, value in metrics.items():
                if isinstance(value, int | float) and key != "step":
                    self._writer.add_scalar(key, value, metrics["step"])

    def truncate(self, step: int) -> None:
        """Drop rows after ``step``: a run killed after its last checkpoint logged steps that will be redone."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by the kill: everything after it is lost anyway
            if row.get("step", 0) > step:
                break
            kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def mean_over_ranks(loss: torch.Tensor, reward: torch.Tensor, outputs: list, world_size: int) -> dict[str, float]:
    """``loss``, ``reward_mean`` and each per-method scalar of the objective's outputs: the mean over this step's
    micro-batches, then over ranks in one collective (a sync point: logging steps only)."""
    keys = [k for k, v in outputs[0].metrics.items() if isinstance(v, torch.Tensor | float | int)]
    local = [float(loss), float(reward.mean())]
    local += [sum(float(o.metrics[k]) for o in outputs) / len(outputs) for k in keys]
    values = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(values)
    values /= world_size
    return {"loss": values[0].item(), "reward_mean": values[1].item(), **{k: values[2 + i].item() for i, k in
            enumerate(keys)}}  # fmt: skip


def peak_memory(device: torch.device) -> dict[str, int]:
    """This step's peak GPU memory (CUDA), or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _json_safe(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
