"""A transformer built partitioned under ``zero.Init`` has the DeepSpeed config's precision on every machine.

DeepSpeed 0.19.8's ``Init._set_dtype`` reads an explicit ``dtype`` as ``dtype or torch.float16 if
is_fp16_supported() else torch.bfloat16 ...``: where the accelerator reports no fp16 (a CPU without fp16
instructions, e.g. an AMD EPYC), any dtype became bf16, so an fp32 ZeRO-3 run trained bf16 weights. On such a machine
this test fails on the code that passed ``dtype`` explicitly; on others both pass."""

from __future__ import annotations

import json

import torch

from tests.one_rank import run_in_one_rank


def _build(folder: str) -> str:
    from diffusers import FluxTransformer2DModel

    from engine.models.partitioned import build_partitioned

    found = {}
    for name, precision in (("fp32", {}), ("bf16", {"bf16": {"enabled": True}})):
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, **precision}
        dtype = torch.bfloat16 if precision else torch.float32
        model = build_partitioned(FluxTransformer2DModel, f"{folder}/transformer", ds, dtype)
        found[name] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
    return json.dumps(found)


def test_partitioned_build_has_the_configs_precision(tiny_flux_dir):
    found = json.loads(run_in_one_rank(_build, str(tiny_flux_dir)))
    assert found == {"fp32": ["torch.float32"], "bf16": ["torch.bfloat16"]}, found
