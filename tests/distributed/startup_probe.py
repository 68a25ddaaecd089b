"""Start a trainer as ``launch/train.py`` would and report what start-up cost this rank (one JSON line per rank).

    [deepspeed --num_accelerators N] python tests/distributed/startup_probe.py OUT [--steps S] [key=value ...]

Writes ``OUT/startup_rank<r>.json``: the peak host RSS growth over start-up above the process's baseline after
imports (Linux VmHWM − VmRSS), the trainable transformer's full bytes, whether the transformer was ever loaded whole
(``ModelMixin.from_pretrained`` of the transformer class), each parameter's partition size, the RSS after
``--steps`` training steps, and on rank 0 the largest difference between the consolidated weights and the
checkpoint's. Used by ``test_partitioned_loading.py`` and ``benchmarks/startup_memory.py`` (also on older trees).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# The code under test: this checkout, or the one named by LEAPALIGN_REPO (benchmarks/startup_memory.py --repo).
sys.path.insert(0, os.environ.get("LEAPALIGN_REPO") or str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from diffusers import ModelMixin  # noqa: E402


def status(key: str) -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str]) -> None:
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    out, rest = Path(argv[0]), argv[1:]
    steps = 0
    if rest[:1] == ["--steps"]:
        steps, rest = int(rest[1]), rest[2:]
    ds_json, overrides = rest[0], rest[1:]

    from engine import checkpoint as ckpt
    from engine.config import load_config, resolve_deepspeed_config
    from engine.trainer import Trainer
    from launch.train import init_distributed

    init_distributed(600)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [*overrides, f"output_dir={out / 'run'}"])
    ds_config = resolve_deepspeed_config(ds_json, world_size)
    whole_loads = []
    original = ModelMixin.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        if "Transformer" in cls.__name__:
            whole_loads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    ModelMixin.from_pretrained = classmethod(recording)
    (out / "run").mkdir(parents=True, exist_ok=True)
    # The baseline is the process with its libraries loaded: the model classes' modules are imported first, so the
    # growth measured is what start-up allocates for models and data, not Python code.
    import diffusers
    import transformers

    for name in ("CLIPTextModel", "T5EncoderModel", "CLIPTokenizer", "T5TokenizerFast"):
        getattr(transformers, name)
    for name in ("AutoencoderKL", "FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler", "FluxPipeline"):
        getattr(diffusers, name)
    baseline = status("VmRSS")
    trainer = Trainer(cfg, ds_config)
    startup_peak = status("VmHWM") - baseline
    rank = trainer.rank
    params = list(trainer.transformer.named_parameters())
    elements = sum(getattr(p, "ds_numel", p.numel()) for _, p in params)
    partitions_ok = all(
        hasattr(p, "ds_tensor") and p.ds_tensor.numel() == math.ceil(p.ds_numel / world_size) for _, p in params
    )
    report = {
        "rank": rank,
        "world_size": world_size,
        "startup_peak_rss_growth": startup_peak,
        "baseline_rss": baseline,
        "transformer_elements": elements,
        "transformer_bytes": elements * torch.finfo(trainer.train_dtype).bits // 8,
        "whole_transformer_loads": whole_loads,
        "partitions_ok": partitions_ok,
        "prompts": len(trainer.prompts),
    }
    if steps:
        from engine.host import keep_heap_warm

        keep_heap_warm(trainer.device)  # as Trainer.train does before its first step
    for _ in range(steps):
        trainer.train_step()
    report["rss_after_steps"] = status("VmRSS")
    report["peak_rss_after_steps"] = status("VmHWM")
    if cfg.optim.lora_rank == 0 and steps == 0:
        from engine.models.partitioned import weight_headers
        from engine.models.safetensors_io import read_tensor

        state = ckpt.consolidated_state_dict(trainer.engine, trainer.zero_stage, trainer.rank)
        if rank == 0:
            folder = Path(cfg.model.path) / "transformer"
            diff = 0.0
            for name, (file, info) in weight_headers(folder).items():
                with open(file, "rb") as handle:
                    expected = read_tensor(handle, info).to(state[name].dtype)
                diff = max(diff, (state[name] - expected).abs().max().item())
            report["max_weight_diff_vs_checkpoint"] = diff
    out.mkdir(parents=True, exist_ok=True)
    (out / f"startup_rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from launch.train import run_then_shut_down  # the entry point's own exit: no gloo thread outlives the interpreter

    run_then_shut_down(main, sys.argv[1:])
