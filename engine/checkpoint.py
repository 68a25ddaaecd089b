"""Crash-safe checkpoints, resume and export.

Layout under ``<output_dir>/checkpoints``::

    step_000010/            a complete checkpoint (DeepSpeed model + optimizer shards, per-rank trainer state)
        <DeepSpeed files>
        trainer_rank0.pt    each state's state_dict (trainer: step, counters, RNG; objective draws; EMA shard;
                            prompt order), weights_only-loadable
        COMPLETE            written last, by rank 0, after every rank finished
    .tmp-step_000020/       being written: never picked up by resume
    latest                  the name of the newest complete checkpoint (atomically replaced)

Write, then rename: every rank writes into ``.tmp-step_N``; after a barrier rank 0 writes ``COMPLETE``, renames the
folder to ``step_N`` and atomically replaces ``latest``. A crash at any moment leaves either the previous complete
checkpoint or the new one, never a half-written one that looks complete. The last ``keep_last`` are kept.

Stateful, as torchtitan's ``CheckpointManager``: a :class:`CheckpointManager` is handed the DeepSpeed engine (model
and optimizer shards) and named objects with ``state_dict()/load_state_dict()`` (the trainer, its objective, EMA and
prompt order); it never reads their attributes and imports nothing of the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from engine.sections import ConfigError

logger = logging.getLogger(__name__)

PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# In output_dir from the moment a fresh run writes anything there until its first complete checkpoint: a run folder
# holding it and no checkpoint belongs to a run that stopped early, whose logs and images are not to be appended to.
INCOMPLETE = "INCOMPLETE"
# What a fresh start discards from such a folder (the embedding store is keyed and atomic: it is kept).
RUN_LOGS = ("config.yaml", "deepspeed_config.json", "metrics.jsonl", "images", "tensorboard", "export")


def start_fresh(out: Path) -> bool:
    """Marks ``out`` incomplete for a run starting at step 0, first discarding what an earlier run that stopped
    before its first checkpoint left there. Returns whether anything was discarded. Rank 0 only."""
    out.mkdir(parents=True, exist_ok=True)
    stale = (out / INCOMPLETE).exists() or (out / "metrics.jsonl").exists()
    if stale:
        for name in RUN_LOGS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    _atomic_write(out / INCOMPLETE, "a run started here and has no complete checkpoint yet\n")
    return stale


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def depends(cfg, ds_config: dict) -> dict:
    """What a checkpoint's shards depend on: resuming with another value would fail inside DeepSpeed or silently
    train something else, so preflight refuses it (``engine.preflight.check_resume``)."""
    from engine.config import deepspeed_precision

    return {
        "model.kind": cfg.model.kind,
        "model.path": str(Path(cfg.model.path).resolve()) if cfg.model.path else None,
        "method.objective": cfg.method.objective,
        "optim.lora_rank": cfg.optim.lora_rank,
        "optim.lora_targets": sorted(cfg.optim.lora_targets) if cfg.optim.lora_rank else None,
        "optim.ema_decay is set": cfg.optim.ema_decay is not None,
        "zero_optimization.stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "precision": str(deepspeed_precision(ds_config)),
    }


def check_shared_folder(folder: Path, rank: int, world_size: int) -> None:
    """Several ranks (nodes): checks that ``folder`` is the same folder on every rank, else one-line ValueError.

    Checkpoints are written by every rank into one folder and completed by rank 0; the embedding store is built by
    all ranks and read by each. Both need one filesystem that every node mounts. Rank 0 writes a token; every rank
    must read it back.
    """
    if world_size == 1:
        return
    import secrets

    folder = Path(folder)
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = folder / f".shared-check-{token[0]}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(marker, token[0])
    dist.barrier()
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    everyone = [None] * world_size
    dist.all_gather_object(everyone, seen)  # objects: works under gloo and NCCL alike
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(everyone) if not ok]
    if blind:
        raise ValueError(
            f"{folder} is not the same folder on every rank (ranks {blind} cannot see what rank 0 wrote there): put "
            "output_dir and data.embedding_cache on a filesystem every node mounts (NFS, Lustre, ...); node-local "
            "disks cannot hold one checkpoint or one embedding store"
        )


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one), else None."""
    root = Path(root)
    if (root / "COMPLETE").exists():
        return root
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "COMPLETE").exists())
    return complete[-1] if complete else None


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def resolve_resume(cfg) -> Path | None:
    """The complete checkpoint a run resumes from (``checkpoint.resume``), or None for a fresh start.

    ``auto``: the newest complete one under ``<output_dir>/checkpoints``, if any; ``never``: None; a path: the newest
    complete one there (or the path itself), which must exist. Shared by preflight and the trainer.

    Raises:
        ConfigError: an explicit path holds no complete checkpoint.
    """
    resume = cfg.checkpoint.resume
    if resume == "never":
        return None
    root = Path(cfg.output_dir) / "checkpoints" if resume == "auto" else Path(resume)
    found = latest_complete(root)
    if found is None and resume != "auto":
        raise ConfigError(f"checkpoint.resume={resume!r} holds no complete checkpoint; give a step_* folder")
    return found


def checkpoint_meta(path: Path) -> dict:
    """What rank 0 wrote into a complete checkpoint's ``COMPLETE``: ``step``, ``world_size``, ``depends``."""
    return json.loads((Path(path) / "COMPLETE").read_text())


class CheckpointManager:
    """Saves and restores a DeepSpeed engine and named :class:`Stateful` objects under ``<run_dir>/checkpoints``.

    Args:
        run_dir: the run folder (its ``INCOMPLETE`` marker is removed at the first complete checkpoint).
        engine: the DeepSpeed engine; its model and optimizer shards are written by DeepSpeed.
        states: name → object with ``state_dict()/load_state_dict()``; each rank saves its own (RNG, EMA shards).
        rank, world_size: this process's place; a checkpoint loads only with the world size that wrote it.
        keep_last: complete checkpoints kept.
        depends: the settings the shards depend on (:func:`depends`), recorded for preflight's resume check.
    """

    def __init__(
        self,
        run_dir: Path,
        engine: Any,
        states: Mapping[str, Stateful],
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        depends: dict,
    ):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.engine = engine
        self.states = dict(states)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.depends = depends

    def save(self, step: int) -> Path:
        """Write a checkpoint at ``step`` (all ranks call this)."""
        tag = f"{PREFIX}{step:06d}"
        final = self.root / tag
        tmp = self.root / f"{TMP_PREFIX}{tag}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # a leftover of a crash while writing this same step
            self.root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if final.exists() and (final / "COMPLETE").exists():
            return final  # already saved at this step (e.g. the periodic and the final save coincide)
        self.engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        state = {name: obj.state_dict() for name, obj in self.states.items()}
        torch.save(state, tmp / f"trainer_rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "depends": self.depends}
            _atomic_write(tmp / "COMPLETE", json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", tag)
            (self.run_dir / INCOMPLETE).unlink(missing_ok=True)  # the run folder now has a checkpoint to trust
            _prune(self.root, self.keep_last)
            logger.info("checkpoint %s written", final)
        dist.barrier()
        return final

    def load(self, path: Path) -> None:
        """Restore the engine's shards and every state from the complete checkpoint ``path``."""
        path = Path(path)
        saved = checkpoint_meta(path)["world_size"]
        if saved != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {saved} rank(s) but this run has {self.world_size}; resume with "
                "the same number of ranks, or convert it with DeepSpeed's ds_to_universal.py first"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
        state = torch.load(path / f"trainer_rank{self.rank}.pt", weights_only=True)
        missing = sorted(set(self.states) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} holds no state for {', '.join(missing)}; start a new output_dir")
        for name, obj in self.states.items():
            obj.load_state_dict(state[name])


def rng_state() -> dict:
    """The global torch (and CUDA) RNG states, for a ``state_dict``."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "COMPLETE").exists())
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def consolidated_state_dict(engine: Any, zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    """The full 16-bit state dict on rank 0 (all ranks must call; others get an empty dict)."""
    # ZeRO-3: gathers the partitions, rank 0 gets the tensors. Stages 0-2 hold full parameters on every rank.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    # A copy even on CPU ranks, where .cpu() would alias the live (gathered or persistent) parameter storage.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()} if rank == 0 else {}


def export(
    out: Path,
    engine: Any,
    *,
    zero_stage: int,
    rank: int,
    trainable_names: list[str],
    ema: Any = None,
    lora_pipeline: Any = None,
) -> Path:
    """Write diffusers-loadable weights of the trained (and EMA) transformer to ``out`` (all ranks call this).

    Weights keep the training precision (bf16 runs export bf16, as DeepSpeed's 16-bit consolidation gives them);
    the EMA (``ema``: its ``full(index)`` assembles trainable parameter ``index`` from the float32 shards of the
    master weights, a collective) is written one parameter at a time, rounded to the same precision.

    Full fine-tuning (``lora_pipeline`` None): ``out/transformer`` (config.json + safetensors) loads with
    ``<Model>.from_pretrained``. LoRA: ``out/lora`` loads with the pipeline's ``load_lora_weights``
    (``lora_pipeline`` is that pipeline class). Never ``save_pretrained`` on a ZeRO-3 module: its parameters are
    empty partitions there.
    """
    out = Path(out)
    state = consolidated_state_dict(engine, zero_stage, rank)
    if rank == 0:
        _write_export(engine.module, state, out, "", lora_pipeline)
    if ema is not None:
        # Replace the trained entries in place: rank 0 holds one 16-bit copy of the model plus one fp32 tensor.
        for index, name in enumerate(trainable_names):
            full = ema.full(index)  # a collective: every rank, in the same order
            if rank == 0:
                state[name] = full.to(dtype=state[name].dtype, device="cpu").contiguous()
        if rank == 0:
            _write_export(engine.module, state, out, "_ema", lora_pipeline)
    dist.barrier()
    return out


def _write_export(module: Any, state: dict[str, torch.Tensor], out: Path, suffix: str, lora_pipeline: Any) -> None:
    from safetensors.torch import save_file

    from engine.models.loading import strip_machine_paths

    if lora_pipeline is not None:
        from peft.utils import get_peft_model_state_dict

        lora_state = get_peft_model_state_dict(module, state_dict=state)
        target = out / f"lora{suffix}"
        lora_pipeline.save_lora_weights(str(target), transformer_lora_layers=lora_state, safe_serialization=True)
    else:
        target = out / f"transformer{suffix}"
        target.mkdir(parents=True, exist_ok=True)
        module.save_config(str(target))  # config.json only: ConfigMixin, no weights involved
        strip_machine_paths(target)
        save_file(state, str(target / "diffusion_pytorch_model.safetensors"))
    logger.info("exported %s", target)
