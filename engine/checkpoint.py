"""Crash-safe checkpoints, resume and export.

Layout under ``<output_dir>/checkpoints``::

    step_000010/            a complete checkpoint (DeepSpeed model + optimizer shards, per-rank trainer state)
        <DeepSpeed files>
        trainer_rank0.pt    step, prompt position, objective draws, EMA shard, RNG states (weights_only-loadable)
        COMPLETE            written last, by rank 0, after every rank finished
    .tmp-step_000020/       being written: never picked up by resume
    latest                  the name of the newest complete checkpoint (atomically replaced)

Write, then rename: every rank writes into ``.tmp-step_N``; after a barrier rank 0 writes ``COMPLETE``, renames the
folder to ``step_N`` and atomically replaces ``latest``. A crash at any moment leaves either the previous complete
checkpoint or the new one, never a half-written one that looks complete. The last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from engine.trainer import Trainer

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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(trainer: Trainer) -> Path:
    """Write a checkpoint of the trainer at its current step (all ranks call this)."""
    root = trainer.out / "checkpoints"
    tag = f"{PREFIX}{trainer.step:06d}"
    final = root / tag
    tmp = root / f"{TMP_PREFIX}{tag}"
    if trainer.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # a leftover of a crash while writing this same step
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if final.exists() and (final / "COMPLETE").exists():
        return final  # already saved at this step (e.g. the periodic and the final save coincide)
    trainer.engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    state = {
        "step": trainer.step,
        "world_size": trainer.world_size,
        "skipped_steps": trainer.skipped_steps,
        "bad_in_a_row": trainer.bad_in_a_row,
        "objective": trainer.objective.state_dict(),
        "noise_generator": trainer.noise_generator.get_state(),
        "rng": _rng_state(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
    }
    torch.save(state, tmp / f"trainer_rank{trainer.rank}.pt")
    dist.barrier()
    if trainer.rank == 0:
        meta = {
            "step": trainer.step,
            "world_size": trainer.world_size,
            "depends": depends(trainer.cfg, trainer.ds_config),
        }
        _atomic_write(tmp / "COMPLETE", json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(root / "latest", tag)
        (trainer.out / INCOMPLETE).unlink(missing_ok=True)  # the run folder now has a checkpoint to trust
        _prune(root, trainer.cfg.checkpoint.keep_last)
        logger.info("checkpoint %s written", final)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "COMPLETE").exists())
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def load(trainer: Trainer, path: Path) -> dict:
    """Restore model, optimizer, EMA, objective draws, prompt position and RNG from a complete checkpoint."""
    meta = json.loads((path / "COMPLETE").read_text())
    if meta["world_size"] != trainer.world_size:
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} rank(s) but this run has {trainer.world_size}; "
            "resume with the same number of ranks, or convert it with DeepSpeed's ds_to_universal.py first"
        )
    load_path, _ = trainer.engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
    state = torch.load(path / f"trainer_rank{trainer.rank}.pt", weights_only=True)
    trainer.step = state["step"]
    trainer.skipped_steps = state["skipped_steps"]
    trainer.bad_in_a_row = state["bad_in_a_row"]
    trainer.objective.load_state_dict(state["objective"])
    trainer.noise_generator.set_state(state["noise_generator"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    if trainer.ema is not None and state["ema"] is not None:
        trainer.ema.load_state_dict(state["ema"])
    return state


def _consolidated_state_dict(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The full 16-bit state dict on rank 0 (all ranks must call; others get an empty dict)."""
    engine = trainer.engine
    # ZeRO-3: gathers the partitions, rank 0 gets the tensors. Stages 0-2 hold full parameters on every rank.
    state = engine._zero3_consolidated_16bit_state_dict() if trainer.zero_stage == 3 else engine.module.state_dict()
    # A copy even on CPU ranks, where .cpu() would alias the live (gathered or persistent) parameter storage.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()} if trainer.rank == 0 else {}


def export(trainer: Trainer) -> Path:
    """Write diffusers-loadable weights of the trained (and EMA) transformer to ``<output_dir>/export``.

    Weights keep the training precision (bf16 runs export bf16, as DeepSpeed's 16-bit consolidation gives them);
    the EMA is assembled from its float32 shards of the master weights, one parameter at a time, and rounded to
    the same precision.

    Full fine-tuning: ``export/transformer`` (config.json + safetensors) loads with ``<Model>.from_pretrained``.
    LoRA: ``export/lora`` loads with the pipeline's ``load_lora_weights``. Never ``save_pretrained`` on a ZeRO-3
    module: its parameters are empty partitions there.
    """
    out = trainer.out / "export"
    state = _consolidated_state_dict(trainer)
    if trainer.rank == 0:
        _write_export(trainer, state, out, "")
    if trainer.ema is not None:
        # Replace the trained entries in place: rank 0 holds one 16-bit copy of the model plus one fp32 tensor.
        for index, name in enumerate(trainer.trainable_names):
            full = trainer.ema.full(index)  # a collective: every rank, in the same order
            if trainer.rank == 0:
                state[name] = full.to(dtype=state[name].dtype, device="cpu").contiguous()
        if trainer.rank == 0:
            _write_export(trainer, state, out, "_ema")
    dist.barrier()
    return out


def _write_export(trainer: Trainer, state: dict[str, torch.Tensor], out: Path, suffix: str) -> None:
    from safetensors.torch import save_file

    from engine.models.loading import strip_machine_paths

    module = trainer.engine.module
    if trainer.cfg.optim.lora_rank > 0:
        from peft.utils import get_peft_model_state_dict

        lora_state = get_peft_model_state_dict(module, state_dict=state)
        target = out / f"lora{suffix}"
        pipeline_cls = _pipeline_class(trainer)
        pipeline_cls.save_lora_weights(str(target), transformer_lora_layers=lora_state, safe_serialization=True)
    else:
        target = out / f"transformer{suffix}"
        target.mkdir(parents=True, exist_ok=True)
        module.save_config(str(target))  # config.json only: ConfigMixin, no weights involved
        strip_machine_paths(target)
        save_file(state, str(target / "diffusion_pytorch_model.safetensors"))
    logger.info("exported %s", target)


def _pipeline_class(trainer: Trainer):
    from engine.models.kinds import model_kind

    return model_kind(trainer.cfg.model.kind).pipeline
