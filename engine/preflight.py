"""Checks that run before any expensive work: every input the run will read or write, one line per problem.

Called by ``launch/train.py`` before the process group, the model or the output folder exist, so a bad input costs
seconds and leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.config import ConfigError, TrainConfig
from engine.data import read_prompts

# What a run writes into output_dir: a folder holding none of these is someone else's.
RUN_ENTRIES = frozenset(
    {"config.yaml", "deepspeed_config.json", "metrics.jsonl", "checkpoints", "images", "export", "tensorboard",
     "embeddings", "INCOMPLETE"}
)  # fmt: skip


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
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not any(name in RUN_ENTRIES for name in entries):
            raise ConfigError(
                f"output_dir={output_dir!r} holds files this engine did not write (e.g. {entries[0]!r}); they would "
                "be overwritten or appended to: choose a new or empty output_dir"
            )


def check_model(cfg: TrainConfig) -> None:
    """A configured model folder is a complete diffusers folder of the configured kind, whose every JSON, tokenizer
    and safetensors header reads and whose weights have the names and shapes its configs describe."""
    if cfg.model.path is None:
        return
    from engine.models.kinds import model_kind

    model_kind(cfg.model.kind).adapter.check_folder(cfg.model.path)


def check_resume(cfg: TrainConfig, world_size: int, ds_config: dict | None = None) -> None:
    """A checkpoint to resume from was written by the same number of ranks (DeepSpeed shards are per rank) and
    with the same settings its shards depend on (``engine.checkpoint.depends``)."""
    from engine.checkpoint import checkpoint_meta, depends, resolve_resume

    found = resolve_resume(cfg)
    if found is None:
        return
    meta = checkpoint_meta(found)
    saved = meta["world_size"]
    if saved != world_size:
        raise ConfigError(
            f"checkpoint {found} was written by {saved} rank(s) but this run has {world_size}; resume with "
            f"{saved} rank(s), or convert it with DeepSpeed's ds_to_universal.py and start a new output_dir"
        )
    if ds_config is None or "depends" not in meta:
        return
    for key, now in depends(cfg, ds_config).items():
        then = meta["depends"].get(key)
        if then != now:
            where = "--deepspeed" if key in ("zero_optimization.stage", "precision") else "the config"
            raise ConfigError(
                f"checkpoint {found} was written with {key}={then!r} but this run has {key}={now!r} ({where}); "
                "resume with the same setting, or start a new output_dir (checkpoint.resume=never trains anew)"
            )


def preflight(cfg: TrainConfig, world_size: int, ds_config: dict | None = None) -> None:
    """Every cheap check of the run's inputs; raises ConfigError or ValueError with one line."""
    cfg.check_paths()
    from engine.rewards import REGISTRY

    cfg.validate_names(set(REGISTRY))
    for index, reward in enumerate(cfg.rewards):
        spec = REGISTRY[reward.name]
        if spec.needs_path and not reward.path:
            raise ConfigError(f"rewards.{index}.path is not set; reward {reward.name!r} needs {spec.files}")
        if reward.path and not spec.takes_path:
            raise ConfigError(
                f"rewards.{index}.path={reward.path!r} is set but reward {reward.name!r} has no weights and would "
                f"ignore it; drop rewards.{index}.path or name the reward that file belongs to"
            )
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
    check_resume(cfg, world_size, ds_config)
    if ds_config is not None:
        check_cpu_adam(ds_config)
    check_seed(cfg)
    if cfg.optim.lora_rank > 0:
        check_lora_targets(cfg)


def check_cpu_adam(ds_config: dict) -> None:
    """Offloaded optimizer states step with DeepSpeedCPUAdam unless ``torch_adam: true``: its ``cpu_adam`` op must
    build (or be prebuilt) here. Built now, once (torch caches it), so a missing compiler stops the run before any
    model loads instead of after."""
    zero = ds_config.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    if offload == "none" or params.get("torch_adam", False):
        return
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure is the same bad input: name it, give the fix
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError(
            "deepspeed config: zero_optimization.offload_optimizer steps with DeepSpeedCPUAdam, whose cpu_adam op "
            f"cannot be built here ({first}); fix: install a C++ compiler and ninja (or a DeepSpeed built with "
            "DS_BUILD_CPU_ADAM=1), or set optimizer.params.torch_adam: true (torch's AdamW, a much slower offloaded "
            "step)"
        ) from None


# Per-sample noise seeds are seed · 1_000_000_007 + global position (engine.trainer); torch seeds are 64-bit.
SEED_STRIDE = 1_000_000_007


def check_seed(cfg: TrainConfig) -> None:
    """The per-sample seed arithmetic stays inside a signed 64-bit seed for the whole run."""
    largest = cfg.optim.seed * SEED_STRIDE + 10**12  # generous bound on any global sample position
    if largest >= 2**63:
        limit = (2**63 - 10**12) // SEED_STRIDE
        raise ConfigError(f"optim.seed={cfg.optim.seed} overflows the per-sample noise seeds; use a seed <= {limit}")


def check_lora_targets(cfg: TrainConfig) -> None:
    """LoRA targets match modules of the transformer, checked on a meta-device copy built from its config."""
    import torch

    from engine.models.kinds import model_kind
    from engine.text_phase import model_folder

    cls = model_kind(cfg.model.kind).transformer
    folder = model_folder(cfg.model) / "transformer"
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    names = [name for name, _ in model.named_modules()]
    for index, target in enumerate(cfg.optim.lora_targets):
        if not any(name == target or name.endswith("." + target) for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names if "attn." in name} - set("0123456789"))[:8]
            raise ConfigError(
                f"optim.lora_targets.{index}={target!r} matches no module of {folder}'s {cls.__name__}; use "
                f"module-name suffixes such as {', '.join(leaves)}"
            )
