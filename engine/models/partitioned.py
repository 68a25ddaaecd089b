"""Build a diffusers transformer already partitioned by ZeRO-3 and fill each rank's partition from the checkpoint.

``from_pretrained(...).to(device)`` puts the whole FLUX.1-dev transformer (23.8 GB in bf16) on every GPU and a
whole host copy in every rank's RAM before ``deepspeed.initialize`` partitions it: an OOM on 24 and 40 GB cards and
≈ 190 GB of host RAM on an 8-GPU node. Here:

1. the module is constructed inside ``deepspeed.zero.Init``: each parameter is partitioned as its sub-module is
   created, so a rank holds 1/world of the weights (plus, for a moment, the one sub-module being built);
2. each rank reads from the safetensors files only the flat element range its partition covers (ZeRO-3 gives rank
   r elements ``[r·P, (r+1)·P)`` of the flattened parameter, P = ``ds_tensor.numel()``, the last one padded),
   with plain file reads (``engine.models.safetensors_io``): host memory is the rank's share plus one chunk, and
   no rank ever materialises a full parameter of the checkpoint.

The weights equal a plain ``from_pretrained`` load exactly (``tests/distributed/test_partitioned_loading.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine.host import fix_mmap_threshold
from engine.models import loading
from engine.models.safetensors_io import SafetensorsError, TensorInfo, read_tensor

logger = logging.getLogger(__name__)


def weight_headers(folder: Path) -> dict[str, tuple[Path, TensorInfo]]:
    """Tensor name → (file, header entry) over a component folder's single or sharded safetensors."""
    headers = loading.weight_headers(Path(folder))
    if headers is None:
        raise SafetensorsError(f"{folder} holds no safetensors weights (or their index); partitioned loading reads "
                               "safetensors only")  # fmt: skip
    return headers


def build_partitioned(model_cls: type, folder: str | Path, ds_config: dict, dtype: torch.dtype) -> nn.Module:
    """``model_cls`` (a diffusers ``ModelMixin``) from ``folder``'s config, built under ``zero.Init``, with each
    rank's partitions read from ``folder``'s safetensors. Call on every rank (construction is collective)."""
    import deepspeed

    from engine.config import deepspeed_precision

    folder = Path(folder)
    config = model_cls.load_config(folder)
    if dtype != deepspeed_precision(ds_config):
        raise ValueError(f"build_partitioned: dtype {dtype} differs from the DeepSpeed config's precision")
    fix_mmap_threshold()
    # dtype=None: zero.Init then takes the precision from the config. An explicit dtype goes through
    # `dtype or torch.float16 if is_fp16_supported() else torch.bfloat16 ...` (DeepSpeed 0.19.8,
    # Init._set_dtype), which ignores it where the accelerator reports no fp16: on such CPUs an fp32 run was
    # built, and trained, in bf16 (measured: every parameter bf16 on an AMD EPYC).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None):
        model = model_cls.from_config(config)
    read = load_partitions(model, folder)
    logger.info("%s built partitioned; this rank read %.1f MB of %s", model_cls.__name__, read / 2**20, folder)
    return model.eval()


@torch.no_grad()
def load_partitions(model: nn.Module, folder: str | Path) -> int:
    """Copies into every ZeRO-3 parameter's local partition its elements from the checkpoint; returns bytes read.

    Names and shapes are checked against the checkpoint first (one-line error naming both). Buffers stored in the
    checkpoint are read whole (they are small and every rank keeps them).
    """
    folder = Path(folder)
    headers = weight_headers(folder)
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if n in headers}
    missing = sorted(set(params) - set(headers))
    unexpected = sorted(set(headers) - set(params) - set(buffers))
    if missing or unexpected:
        raise SafetensorsError(
            f"{folder}: the checkpoint does not match config.json: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(headers[name][1].shape) != shape:
            raise SafetensorsError(
                f"{folder}: {name} has shape {headers[name][1].shape} in the checkpoint but {shape} in config.json"
            )
    rank = dist.get_rank() if dist.is_initialized() else 0
    handles: dict[Path, object] = {}
    read = 0
    try:
        for name, param in params.items():
            file, info = headers[name]
            handle = handles.setdefault(file, open(file, "rb"))  # noqa: SIM115 - closed in finally
            if hasattr(param, "ds_tensor"):
                local = param.ds_tensor.view(-1)
                start = min(rank * local.numel(), info.numel)
                count = min(local.numel(), info.numel - start)
                chunk = read_tensor(handle, info, (start, start + count))
                local[:count].copy_(chunk.to(local.dtype))
            else:  # not partitioned (a parameter created outside zero.Init): whole
                chunk = read_tensor(handle, info)
                param.data.copy_(chunk.to(param.dtype))
            read += chunk.numel() * chunk.element_size()
        for name, buffer in buffers.items():
            file, info = headers[name]
            handle = handles.setdefault(file, open(file, "rb"))  # noqa: SIM115
            buffer.copy_(read_tensor(handle, info).to(buffer.dtype))
    finally:
        for handle in handles.values():
            handle.close()
    return read
