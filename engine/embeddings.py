"""A persistent prompt-embedding store: prompts are encoded once, on disk, and read back row by row.

FLUX.1-dev's T5 embedding of one prompt is [512, 4096] bf16 = 4 MiB: the paper's 50,000 prompts are 195 GiB, far
too much to keep in every rank's RAM. The store keeps them on disk and a step reads only its micro-batch's rows.

Layout: ``<root>/<key digest>/``

    key.json                 what the vectors depend on (model kind, text-encoder files, tokenizer settings, dtype)
    shared.safetensors       tensors the batch shares (FLUX ``text_ids``)
    <rank>-<n>.safetensors   shards: ``prompt_embeds`` [n, L, D], ``pooled`` [n, P] (+ SD3's negatives) ...
    <rank>-<n>.json          ... and the sha256 of each row's prompt, in row order

A shard and its row list are written to temporary names, fsynced and renamed, row list last: a shard without its
row list is never read, so a crash mid-build leaves nothing that is later trusted. A changed model, tokenizer
setting or dtype has another digest (another folder); a changed prompt list reuses every row it still needs and
encodes only the new prompts. Ranks encode disjoint shares of the missing prompts in parallel.

Reading: a prompt's row is a contiguous byte range of each field's tensor, read with a plain file read
(``engine.models.safetensors_io``): host memory holds the row index (a hash per prompt) and one micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist

from engine.models.base import Conditioning
from engine.models.safetensors_io import read_header, read_tensor

logger = logging.getLogger(__name__)

ROWS_PER_SHARD = 256
_SHARED = "shared.safetensors"


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def _file_identity(path: Path) -> dict:
    """Content identity of a model file without reading all of it: size, and sha256 of its first and last MiB.

    (Safetensors and configs change in their header when a model is re-saved; fine-tuned weights of the same shapes
    change the data, which the sampled MiB catch with overwhelming probability for real checkpoints.)"""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(1 << 20))
        if size > 2 << 20:
            file.seek(size - (1 << 20))
            digest.update(file.read(1 << 20))
    return {"size": size, "sha256_head_tail": digest.hexdigest()}


def text_encoder_identity(folder: str | Path, subfolders: Sequence[str]) -> dict:
    """Identity of the files in the text-encoder and tokenizer subfolders of a model folder."""
    folder = Path(folder)
    identity = {}
    for sub in subfolders:
        for path in sorted((folder / sub).glob("*")):
            if path.is_file():
                identity[f"{sub}/{path.name}"] = _file_identity(path)
    return identity


def _fsync_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may race for the same name
    write(tmp)
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)


class EmbeddingStore:
    """Embeddings of prompts under ``root``, keyed by ``key`` (a JSON-serialisable dict)."""

    def __init__(self, root: str | Path, key: dict):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.rows: dict[str, tuple[str, int]] = {}  # prompt hash -> (shard name, row)
        self._headers: dict[str, dict] = {}
        self.shared: dict[str, torch.Tensor] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-reads the row lists of every complete shard (after other ranks wrote theirs)."""
        self.rows.clear()
        if not self.folder.is_dir():
            return
        for rows_file in sorted(self.folder.glob("*.json")):
            if rows_file.name == "key.json" or rows_file.name.startswith("."):
                continue
            shard = rows_file.stem
            if not (self.folder / f"{shard}.safetensors").is_file():
                continue
            for row, digest in enumerate(json.loads(rows_file.read_text(encoding="utf-8"))):
                self.rows.setdefault(digest, (shard, row))
        if (self.folder / _SHARED).is_file():
            from safetensors.torch import load_file

            self.shared = load_file(self.folder / _SHARED)

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts without a stored row, in a fixed order (the same on every rank)."""
        return sorted({p for p in prompts if prompt_hash(p) not in self.rows}, key=prompt_hash)

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors")) if self.folder.is_dir() else 0

    def build(
        self,
        prompts: Sequence[str],
        encode: Callable[[list[str]], Conditioning],
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 16,
        progress: bool = False,
    ) -> int:
        """Encodes this rank's share of the missing prompts into new shards; returns how many this rank encoded.

        Every rank calls it (a barrier at the end when distributed). ``encode`` maps a list of prompts to their
        Conditioning (the adapter's ``encode_prompts``).
        """
        todo = self.missing(prompts)[rank::world_size]
        if todo or rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        if rank == 0 and not (self.folder / "key.json").is_file():
            _fsync_write(self.folder / "key.json", lambda p: p.write_text(json.dumps(self.key, indent=1)))
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"encode prompts (rank {rank})", dynamic_ncols=True)
        existing = len(list(self.folder.glob(f"r{rank}-*.json"))) if self.folder.is_dir() else 0
        for index, start in enumerate(range(0, len(todo), ROWS_PER_SHARD)):
            chunk = todo[start : start + ROWS_PER_SHARD]
            parts = []
            for b in range(0, len(chunk), batch_size):
                parts.append(encode(chunk[b : b + batch_size]).to("cpu"))
                if bar is not None:
                    bar.update(len(chunk[b : b + batch_size]))
            self._write_shard(f"r{rank}-{existing + index:05d}", chunk, parts)
        if bar is not None:
            bar.close()
        if dist.is_initialized() and world_size > 1:
            dist.barrier()
        self.refresh()
        absent = self.missing(prompts)
        if absent:
            raise RuntimeError(f"embedding store {self.folder}: {len(absent)} prompts still missing after the build")
        return len(todo)

    def _write_shard(self, name: str, prompts: list[str], parts: list[Conditioning]) -> None:
        from safetensors.torch import save_file

        batched, shared = {}, {}
        for f in fields(Conditioning):
            values = [getattr(c, f.name) for c in parts]
            if values[0] is None:
                continue
            if f.name in Conditioning._SHARED:
                shared[f.name] = values[0].contiguous()
            else:
                batched[f.name] = torch.cat(values).contiguous()
        if shared and not (self.folder / _SHARED).is_file():
            _fsync_write(self.folder / _SHARED, lambda p: save_file(shared, str(p)))
        _fsync_write(self.folder / f"{name}.safetensors", lambda p: save_file(batched, str(p)))
        digests = [prompt_hash(p) for p in prompts]
        _fsync_write(self.folder / f"{name}.json", lambda p: p.write_text(json.dumps(digests)))

    def get(self, prompts: Sequence[str]) -> Conditioning:
        """The stored Conditioning of ``prompts`` (CPU), in order, reading only their rows."""
        if not self.shared and (self.folder / _SHARED).is_file():
            self.refresh()
        located = []
        for prompt in prompts:
            found = self.rows.get(prompt_hash(prompt))
            if found is None:
                raise KeyError(f"prompt {prompt[:60]!r} is not in the embedding store {self.folder}; build it first")
            located.append(found)
        values: dict[str, list[torch.Tensor]] = {}
        handles = {}
        try:
            for shard, row in located:
                header = self._headers.get(shard)
                if header is None:
                    header = self._headers[shard] = read_header(self.folder / f"{shard}.safetensors")
                handle = handles.get(shard)
                if handle is None:
                    handle = handles[shard] = open(self.folder / f"{shard}.safetensors", "rb")  # noqa: SIM115
                for name, info in header.items():
                    per_row = info.numel // info.shape[0]
                    rows = read_tensor(handle, info, (row * per_row, (row + 1) * per_row))
                    values.setdefault(name, []).append(rows.view(1, *info.shape[1:]))
        finally:
            for handle in handles.values():
                handle.close()
        tensors = {name: torch.cat(parts) for name, parts in values.items()}
        tensors.update({name: t.clone() for name, t in self.shared.items()})
        return Conditioning(**tensors)
