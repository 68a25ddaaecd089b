"""Exponential moving average of the trained weights: float32 shards of the optimizer's fp32 master weights.

The paper's EMA is of the trained weights, so it averages what the optimizer updates, not their 16-bit copies: a
bf16 weight moves only when an update crosses a bf16 step, and 0.995-weighted averages of such steps lose most of
the signal. Each rank averages the master elements it owns, so no rank holds a full EMA:

- ZeRO-3: the fp32 partition of every parameter (``deepspeed.utils.safe_get_local_fp32_param``), ranks owning
  consecutive chunks of the flattened parameter (the last one padded). Persistent parameters (fewer elements than
  ``stage3_param_persistence_threshold``) are partitioned in the optimizer too; only their 16-bit copy is kept
  whole on every rank, which is why the EMA never reads or writes ``param.data``/``ds_tensor`` to average.
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fp32 fragment mapped to this rank (``param._hp_mapping``: the
  fragment and its offset in the flattened parameter; a rank may own none of a parameter).
- No DeepSpeed optimizer (plain fp32 parameters are their own masters): a 1/world slice of the flattened parameter.

Export and evaluation assemble a full EMA tensor one parameter at a time (:meth:`ShardedEMA.full`, a collective),
so the peak is one parameter, never the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Source:
    """Where a parameter's fp32 master elements owned by this rank live: ``count`` elements from ``start``."""

    kind: str  # "zero3" | "fragment" | "slice"
    start: int
    count: int
    numel: int
    shape: torch.Size


def _source(param: nn.Parameter, rank: int, world_size: int) -> _Source:
    if hasattr(param, "ds_id"):  # ZeRO-3: ranks own consecutive chunks of ds_tensor.numel() elements
        per_rank = param.ds_tensor.numel()
        start = min(rank * per_rank, param.ds_numel)
        return _Source("zero3", start, min(per_rank, param.ds_numel - start), param.ds_numel, param.ds_shape)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
        mapping = param._hp_mapping
        start, count = (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel) if mapping else (0, 0)
        return _Source("fragment", start, count, param.numel(), param.shape)
    base, extra = divmod(param.numel(), world_size)  # tensor_split's sizes: the first `extra` ranks get one more
    sizes = [base + (r < extra) for r in range(world_size)]
    return _Source("slice", sum(sizes[:rank]), sizes[rank], param.numel(), param.shape)


def master_shard(param: nn.Parameter, source: _Source) -> torch.Tensor:
    """This rank's fp32 master elements of ``param`` (flat, ``source.count`` long; a view where DeepSpeed has one)."""
    if source.kind == "zero3":
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(param).view(-1)[: source.count]
    if source.kind == "fragment":
        mapping = param._hp_mapping
        return mapping.get_hp_fragment().view(-1) if mapping else param.new_empty(0, dtype=torch.float32)
    return param.detach().view(-1)[source.start : source.start + source.count]


class ShardedEMA:
    """``ema ← d·ema + (1 − d)·θ_master`` on this rank's float32 master shards, starting from the initial weights.

    Without warm-up ``d`` is ``decay`` at every step, so after n updates the initial weights still carry
    ``decay**n`` of the average (0.28 after 128 steps at 0.99, 0.22 after the paper's 300 at 0.995). With warm-up
    ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update (n from 0), the ramp of Flow-GRPO's and diffusers'
    EMAs: early updates are followed closely, the initial weights' share falls to ≈ 2e-9 within 128 steps, and
    from step 890 (decay 0.99) or 1790 (0.995) on the decay is ``decay`` itself.

    Args:
        params: The trainable parameters, after ``deepspeed.initialize`` (so the masters exist).
        decay: In (0, 1) (paper: 0.995).
        rank: This rank in the data-parallel group.
        world_size: Size of that group.
        device: Where the EMA shards live; default: where the masters live (the CPU under optimizer offload).
        warmup: Ramp the decay up as above.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        decay: float,
        rank: int,
        world_size: int,
        device: torch.device | str | None = None,
        warmup: bool = False,
    ):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must lie in (0, 1)")
        self.params = params
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.rank = rank
        self.world_size = world_size
        self.sources = [_source(p, rank, world_size) for p in params]
        self.shards = []
        for param, source in zip(params, self.sources):
            master = master_shard(param, source)
            self.shards.append(master.detach().to(device or master.device, torch.float32, copy=True))

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step; call after every applied optimizer step."""
        weight = 1.0 - self.current_decay()
        for shard, param, source in zip(self.shards, self.params, self.sources):
            shard.lerp_(master_shard(param, source).to(shard.device, torch.float32), weight)
        self.updates += 1

    @torch.no_grad()
    def full(self, index: int) -> torch.Tensor:
        """The whole float32 EMA of ``params[index]`` on every rank (a collective: every rank calls it in turn)."""
        source, shard = self.sources[index], self.shards[index]
        full = torch.zeros(source.numel, dtype=torch.float32, device=shard.device)
        full[source.start : source.start + source.count] = shard[: source.count]
        if self.world_size > 1:
            # Ranks own disjoint elements, so a sum assembles the tensor whatever the partitioning (export and
            # evaluation only: world× the bytes of an all-gather, one parameter at a time).
            on_device = dist.get_backend() == "nccl" and not full.is_cuda  # NCCL reduces CUDA tensors only
            collective = full.cuda() if on_device else full
            dist.all_reduce(collective)
            full = collective.to(shard.device)
        return full.view(source.shape)

    @contextmanager
    def swapped_in(self):
        """Temporarily make the module compute with the EMA weights (for evaluation); restores them exactly after.

        ZeRO-3 computes from ``ds_tensor`` (gathered per call), except persistent parameters, whose whole 16-bit
        copy stays in ``param.data`` on every rank: both are written. Elsewhere every rank holds the whole
        parameter. Backups of whole parameters go to the CPU.
        """
        backups = []
        try:
            with torch.no_grad():
                for index, (param, source) in enumerate(zip(self.params, self.sources)):
                    zero3 = source.kind == "zero3"
                    whole = not zero3 or getattr(param, "ds_persist", False)  # the same set on every rank
                    # Every backup before any write: on one rank a persistent parameter's data can alias ds_tensor.
                    backup = {"ds_tensor": param.ds_tensor.detach().clone()} if zero3 else {}
                    if whole:
                        backup["data"] = param.data.detach().cpu().clone()
                    backups.append(backup)
                    if zero3:
                        local = param.ds_tensor.view(-1)
                        local[: source.count].copy_(self.shards[index][: source.count].to(local))
                    if whole:
                        param.data.copy_(self.full(index).to(param.data))
            yield
        finally:
            with torch.no_grad():
                for param, backup in zip(self.params, backups):
                    if "ds_tensor" in backup:
                        param.ds_tensor.copy_(backup["ds_tensor"])
                    if "data" in backup:
                        param.data.copy_(backup["data"].to(param.data.device))

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "shards": [s.cpu() for s in self.shards],
        }

    def load_state_dict(self, state: dict) -> None:
        shards = state["shards"]
        if len(shards) != len(self.shards) or any(a.shape != b.shape for a, b in zip(shards, self.shards)):
            raise ValueError("EMA state does not match this model's shards (different model, LoRA or world size)")
        for mine, saved in zip(self.shards, shards):
            mine.copy_(saved)
        self.updates = state.get("updates", 0)  # checkpoints from before warm-up existed never used it
