"""Checks that run before any expensive work: every input the run will read or write, one line per problem.

Called by ``launch/train.py`` before the process group, the model or the output folder exist, so a bad input costs
seconds and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.config import ConfigError, TrainConfig
from engine.data import read_prompts


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output_dir: str) -> None:
    """The run folder exists and is writable, or can be created (without creating it here)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} is a file, not a folder; choose another output_dir")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise ConfigError(f"output_dir={output_dir!r} lies under {anchor}, which is a file; choose another output_dir")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={output_dir!r} is not writable ({anchor} denies writes); choose a writable path")


def check_model(cfg: TrainConfig) -> None:
    """A configured model folder is a complete diffusers folder of the configured kind."""
    if cfg.model.path is None:
        return
    from engine.models.flux import FLUX_COMPONENTS
    from engine.models.loading import check_model_folder
    from engine.models.sd3 import SD3_COMPONENTS

    if cfg.model.kind == "flux":
        check_model_folder(cfg.model.path, pipeline_class="FluxPipeline", components=FLUX_COMPONENTS)
    else:
        check_model_folder(cfg.model.path, pipeline_class="StableDiffusion3Pipeline", components=SD3_COMPONENTS)


def check_resume(cfg: TrainConfig, world_size: int) -> None:
    """A checkpoint to resume from was written by the same number of ranks (DeepSpeed shards are per rank)."""
    from engine.checkpoint import latest_complete

    resume = cfg.checkpoint.resume
    if resume == "never":
        return
    root = Path(cfg.output_dir) / "checkpoints" if resume == "auto" else Path(resume)
    found = latest_complete(root)
    if found is None:
        if resume != "auto":
            raise ConfigError(f"checkpoint.resume={resume!r} holds no complete checkpoint; give a step_* folder")
        return
    saved = json.loads((found / "COMPLETE").read_text())["world_size"]
    if saved != world_size:
        raise ConfigError(
            f"checkpoint {found} was written by {saved} rank(s) but this run has {world_size}; resume with "
            f"{saved} rank(s), or convert it with DeepSpeed's ds_to_universal.py and start a new output_dir"
        )


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Every cheap check of the run's inputs; raises ConfigError or ValueError with one line."""
    cfg.check_paths()
    from engine.rewards import REGISTRY

    cfg.validate_names(set(REGISTRY))
    for index, reward in enumerate(cfg.rewards):
        spec = REGISTRY[reward.name]
        if spec.needs_path and not reward.path:
            raise ConfigError(f"rewards.{index}.path is not set; reward {reward.name!r} needs {spec.files}")
    check_output_dir(cfg.output_dir)
    check_model(cfg)
    from engine.parallelize import check_attention_backend

    try:
        check_attention_backend(cfg.model.attention_backend)
    except RuntimeError as error:
        raise ConfigError(f"model.{error}") from None
    if cfg.data.prompts:
        read_prompts(cfg.data.prompts, "data.prompts")
    if cfg.data.eval_prompts:
        read_prompts(cfg.data.eval_prompts, "data.eval_prompts")
    check_resume(cfg, world_size)
