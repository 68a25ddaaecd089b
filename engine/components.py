"""Building a run's components from its config: the model adapter with its trainable transformer, and the reward
criterion. The trainer calls these once at start-up; benchmarks and tools can build the same pieces without it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.models.kinds import model_kind
from engine.models.partitioned import build_partitioned
from engine.parallelize import apply_activation_checkpointing, apply_attention_backend, apply_lora
from engine.rewards import HingeTerm, RewardCriterion, load_reward
from engine.text_phase import frozen_dtype_on


def build_model(model_cfg, optim_cfg, folder: Path, ds_config: dict, train_dtype: torch.dtype, device: torch.device):
    """The VAE (frozen, every rank) and the trainable transformer: partitioned as it is built under ZeRO-3.

    Args:
        model_cfg, optim_cfg: the run's ``model`` and ``optim`` sections (LoRA, checkpointing, attention backend).
        folder: the local diffusers folder.
        ds_config: the resolved DeepSpeed config (its ZeRO stage decides how the transformer is built).
        train_dtype: the training precision the transformer is loaded in.
        device: this rank's device.

    Returns:
        ``(adapter, transformer)``: the adapter holds the VAE and scheduler and runs the transformer; the transformer
        is ready for ``deepspeed.initialize`` (trainable parameters marked, checkpointing and attention applied).
    """
    kind = model_kind(model_cfg.kind)
    frozen_dtype = frozen_dtype_on(model_cfg.frozen_dtype, device)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # No rank ever holds the whole transformer: zero.Init partitions it as it is built, and each rank
        # reads only its partitions' elements from the checkpoint.
        transformer = build_partitioned(kind.transformer, folder / "transformer", ds_config, train_dtype)
        adapter = kind.adapter.from_pretrained(
            str(folder), device=device, dtype=frozen_dtype, parts=("vae", "scheduler"), transformer=transformer
        )
    else:
        # The transformer is loaded in the training precision: DeepSpeed keeps fp32 masters in the optimizer.
        adapter = kind.adapter.from_pretrained(
            str(folder), device=device, dtype=frozen_dtype, parts=("transformer", "vae", "scheduler")
        )
        transformer = adapter.transformer.to(train_dtype)
    if kind.negative_prompt:
        adapter.cfg_negative_no_grad = model_cfg.cfg_negative_no_grad
    adapter.vae_gradient_checkpointing(model_cfg.vae_gradient_checkpointing)

    if optim_cfg.lora_rank > 0:
        apply_lora(transformer, optim_cfg.lora_rank, alpha=optim_cfg.lora_alpha, targets=optim_cfg.lora_targets)
    else:
        transformer.requires_grad_(True)
    if model_cfg.gradient_checkpointing:
        apply_activation_checkpointing(transformer)
    apply_attention_backend(transformer, model_cfg.attention_backend)
    return adapter, transformer


def build_criterion(reward_cfgs, device: torch.device) -> tuple[RewardCriterion, list]:
    """The weighted hinge criterion of the configured rewards (each loaded in float32 on ``device``).

    Each section's ``lam`` left null is filled with the reward's default, in place: the value used goes to
    ``config.yaml``.

    Returns:
        ``(criterion, rewards)``: the criterion and the loaded reward models, in config order.
    """
    terms, rewards = [], []
    for reward_cfg in reward_cfgs:
        reward = load_reward(reward_cfg.name, reward_cfg.path, device, torch.float32)
        if reward_cfg.lam is None:
            reward_cfg.lam = reward.default_lam
        terms.append(HingeTerm(reward, reward_cfg.lam, reward_cfg.weight))
        rewards.append(reward)
    return RewardCriterion(terms), rewards


def rank_device(world_size: int) -> torch.device:
    """This rank's device (``cuda:LOCAL_RANK`` where CUDA exists, else the CPU, with its share of the cores)."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    # CPU ranks share the cores: more threads than cores makes OpenMP spin and slows tiny ops ~10x.
    # An explicit OMP_NUM_THREADS (e.g. several runs side by side) wins.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1) // local_world
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu")
