"""A transformer built partitioned under ``zero.Init`` has the DeepSpeed config's precision on every machine.

DeepSpeed 0.19.8's ``Init._set_dtype`` reads an explicit ``dtype`` as ``dtype or torch.float16 if
is_fp16_supported() else torch.bfloat16 ...``: where the accelerator reports no fp16 (a CPU without fp16
instructions, e.g. an AMD EPYC), any dtype became bf16, so an fp32 ZeRO-3 run trained bf16 weights. On such a machine
this test fails on the code that passed ``dtype`` explicitly; on others both pass."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import torch


def _build(folder: str, port: int, queue) -> None:
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from engine.models.partitioned import build_partitioned

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        found = {}
        for name, precision in (("fp32", {}), ("bf16", {"bf16": {"enabled": True}})):
            ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, **precision}
            dtype = torch.bfloat16 if precision else torch.float32
            model = build_partitioned(FluxTransformer2DModel, f"{folder}/transformer", ds, dtype)
            found[name] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
        queue.put(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_partitioned_build_has_the_configs_precision(tiny_flux_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_build, args=(str(tiny_flux_dir), port, queue))
    process.start()
    try:
        found = json.loads(queue.get(timeout=120))
    finally:
        process.join(timeout=60)
    assert process.exitcode == 0
    assert found == {"fp32": ["torch.float32"], "bf16": ["torch.bfloat16"]}, found
