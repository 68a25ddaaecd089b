"""The text phase of start-up: every prompt's embedding into the on-disk store, before the transformer exists.

Only the prompts the store lacks are encoded (ranks take disjoint shares); the text encoders are loaded only then,
on ``model.text_encoder_device`` (default: the training device), and freed before the transformer is built, so the
T5-XXL (9.5 GB) and the transformer never share a device. The phase's peak is logged. ``launch/build_embeddings.py``
runs this phase alone, ahead of training, on a machine of the user's choice.
"""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import TrainConfig
from engine.embeddings import EmbeddingStore, text_encoder_identity
from engine.models.base import release_memory
from engine.models.kinds import model_kind

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_dtype_on(name: str, device: torch.device) -> torch.dtype:
    """CPU: bf16 VAE/text encoders are slower and gain no memory that matters, so they run in fp32 there."""
    return torch.float32 if device.type == "cpu" else DTYPES[name]


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def model_folder(model_cfg) -> Path:
    """The run's model folder: ``model.path``, or the embedded world's pretrained model committed with the code."""
    if model_cfg.path is not None:
        return Path(model_cfg.path)
    from engine.world.paths import MODEL_DIR

    return MODEL_DIR


def store_for(cfg: TrainConfig, folder: Path, output_dir: Path, text_device: torch.device) -> EmbeddingStore:
    """The store the run's settings select: keyed by the text encoders' files, tokenizer settings and dtype."""
    kind = model_kind(cfg.model.kind)
    key = {
        "format": 1,
        "kind": kind.name,
        "files": text_encoder_identity(folder, [p for p in kind.text_parts if p != "scheduler"]),
        "max_sequence_length": kind.adapter.sequence_length(folder),
        "negative_prompt": cfg.model.negative_prompt if kind.negative_prompt else None,
        "dtype": str(frozen_dtype_on(cfg.model.frozen_dtype, text_device)),
        "device_type": text_device.type,
    }
    root = Path(cfg.data.embedding_cache) if cfg.data.embedding_cache else Path(output_dir) / "embeddings"
    return EmbeddingStore(root, key)


def encode_prompts(
    cfg: TrainConfig,
    folder: Path,
    prompts: list[str],
    output_dir: Path,
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> EmbeddingStore:
    """Makes sure the store holds every prompt; returns it. Every rank calls it (a barrier inside when distributed)."""
    text_device = torch.device(cfg.model.text_encoder_device) if cfg.model.text_encoder_device else device
    store = store_for(cfg, folder, output_dir, text_device)
    share = store.missing(prompts)[rank::world]
    if text_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(text_device)
    before = rss_bytes()
    encode, text = None, None
    if share:
        kind = model_kind(cfg.model.kind)
        dtype = frozen_dtype_on(cfg.model.frozen_dtype, text_device)
        text = kind.adapter.from_pretrained(str(folder), device=text_device, dtype=dtype, parts=kind.text_parts)
        negative = [cfg.model.negative_prompt] if kind.negative_prompt else None
        encode = lambda chunk: text.encode_prompts(chunk, negative * len(chunk) if negative else None)  # noqa: E731
    with torch.no_grad():
        encoded = store.build(prompts, encode, rank=rank, world_size=world, progress=rank == 0 and cfg.logging.progress)
    if text_device.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(text_device), "device memory"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "host RSS growth"
    if text is not None:
        text.free_text_encoders()
        del text, encode
        release_memory()
    if rank == 0 or not dist.is_initialized():
        logger.info(
            "text phase: %d prompts, %d encoded here, store %s (%.3f MB per prompt on disk); peak %s %.2f GB",
            len(prompts),
            encoded,
            store.folder,
            store.bytes_on_disk / max(1, len(store.rows)) / 1e6,
            where,
            max(0, peak) / 1e9,
        )
    return store
