"""Exponential moving average of the trainable weights, kept as per-rank float32 shards.

Under ZeRO-3 each rank owns a partition of every parameter (``param.ds_tensor``); its EMA shard is a float32 copy
of exactly that partition, so no rank ever holds a full copy of the EMA weights. Without ZeRO-3 partitions (ZeRO
0-2 keep full parameters on every rank) each rank keeps the EMA of its 1/world slice of the flattened parameter.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def local_shard(param: nn.Parameter, rank: int, world_size: int) -> torch.Tensor:
    """The part of ``param`` this rank owns, as a flat view: the ZeRO-3 partition or a 1/world slice."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.view(-1)
    return param.data.view(-1).tensor_split(world_size)[rank]


class ShardedEMA:
    """``ema ← decay·ema + (1 − decay)·θ`` on this rank's shards, in float32."""

    def __init__(self, params: list[nn.Parameter], decay: float, rank: int, world_size: int):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must lie in (0, 1)")
        self.params = params
        self.decay = decay
        self.rank = rank
        self.world_size = world_size
        self.shards = [local_shard(p, rank, world_size).detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for shard, param in zip(self.shards, self.params):
            shard.lerp_(local_shard(param, self.rank, self.world_size).float(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        """Temporarily load the EMA weights into the parameters' shards (for export or evaluation)."""
        backup = [local_shard(p, self.rank, self.world_size).clone() for p in self.params]
        try:
            with torch.no_grad():
                for shard, param in zip(self.shards, self.params):
                    local = local_shard(param, self.rank, self.world_size)
                    local.copy_(shard.to(local.dtype))
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(backup, self.params):
                    local_shard(param, self.rank, self.world_size).copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shards": [s.cpu() for s in self.shards]}

    def load_state_dict(self, state: dict) -> None:
        shards = state["shards"]
        if len(shards) != len(self.shards) or any(a.shape != b.shape for a, b in zip(shards, self.shards)):
            raise ValueError("EMA state does not match this model's shards (different model, LoRA or world size)")
        for mine, saved in zip(self.shards, shards):
            mine.copy_(saved)
