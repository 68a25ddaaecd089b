"""Train a few steps, keeping an EMA of the fp32 master weights computed independently of ``engine.ema``.

Run by ``test_ema_export.py`` (one process, or several through the ``deepspeed`` launcher)::

    python tests/distributed/ema_reference_run.py DS_JSON OUT [key=value ...]

After every applied step the full fp32 masters come from DeepSpeed's public ``safe_get_full_fp32_param`` and are
averaged in float64 on rank 0. At the end rank 0 writes ``OUT/ema_check.json``: the exported EMA, the weights seen
inside ``ShardedEMA.swapped_in()`` and after it, each against the reference, and how many parameters ZeRO-3 kept
persistent (whole on every rank) or partitioned.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from engine import checkpoint as ckpt  # noqa: E402
from engine.config import load_config, resolve_deepspeed_config  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from launch.train import init_distributed  # noqa: E402


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def main(argv: list[str]) -> None:
    ds_json, out, *overrides = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    init_distributed(600)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [*overrides, f"output_dir={out}"])
    Path(out).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, resolve_deepspeed_config(ds_json, world_size))
    named = [(n, p) for n, p in trainer.transformer.named_parameters() if p.requires_grad]

    def masters() -> dict[str, torch.Tensor]:  # a collective under ZeRO: every rank calls it
        return {n: safe_get_full_fp32_param(p).detach().double().cpu() for n, p in named}

    decay = cfg.optim.ema_decay
    base = masters()
    reference = dict(base)
    applied = 0
    while trainer.step < cfg.optim.max_steps:
        metrics = trainer.train_step()
        assert metrics is None or metrics["applied"], metrics
        current = masters()
        reference = {n: decay * reference[n] + (1 - decay) * current[n] for n in reference}
        applied += 1
    with trainer.ema.swapped_in():
        inside = ckpt.consolidated_state_dict(trainer.engine, trainer.zero_stage, trainer.rank)
    after = ckpt.consolidated_state_dict(trainer.engine, trainer.zero_stage, trainer.rank)
    trainer.export()
    if trainer.rank == 0:
        export = Path(out) / "export"
        ema = load_file(export / "transformer_ema" / "diffusion_pytorch_model.safetensors")
        trained = load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")
        persistent = sum(bool(getattr(p, "ds_persist", False)) for _, p in named)
        report = {
            "steps": applied,
            "world_size": world_size,
            "persistent": persistent,
            "partitioned": sum(hasattr(p, "ds_id") for _, p in named) - persistent,
            "export_ema_vs_reference": max_diff(ema, reference),
            "swapped_in_vs_reference": max_diff(inside, reference),
            "after_swap_vs_masters": max_diff(after, current),
            "export_trained_vs_masters": max_diff(trained, current),
            "ema_vs_trained": max_diff(ema, trained),
            "ema_minus_base_norm": sum(((ema[k].double() - base[k]) ** 2).sum().item() for k in base) ** 0.5,
            "trained_minus_base_norm": sum(((trained[k].double() - base[k]) ** 2).sum().item() for k in base) ** 0.5,
        }
        (Path(out) / "ema_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from launch.train import run_then_shut_down  # the entry point's own exit: no gloo thread outlives the interpreter

    run_then_shut_down(main, sys.argv[1:])
