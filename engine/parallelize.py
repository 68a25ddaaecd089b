"""Transforms applied to diffusers modules from the outside: activation checkpointing, attention backend, LoRA.

The model code stays untouched (torchtitan's ``parallelize.py`` pattern): each ``apply_*`` takes a module and
changes how it runs through the hooks the library already exposes, never by editing or copying its source.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

AttentionBackend = Literal["sdpa", "xformers", "flash"]
# Our names -> diffusers' attention-dispatch names, and the package each one needs.
_DIFFUSERS_BACKEND = {"sdpa": "native", "xformers": "xformers", "flash": "flash"}
_BACKEND_PACKAGE = {"xformers": ("xformers", "xformers"), "flash": ("flash_attn", "flash-attn")}


def _non_reentrant_checkpoint(module: nn.Module, *args):
    # Non-reentrant: works with ZeRO-3's parameter hooks (parameters are re-gathered in the recompute), with inputs
    # that do not require grad (leap passes start from rollout latents) and with keyword-free block calls.
    return checkpoint(module.__call__, *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute each transformer block's activations in backward instead of storing them.

    Uses the diffusers model's own block-level hook (``enable_gradient_checkpointing``) with a non-reentrant
    ``torch.utils.checkpoint``; it only acts when gradients are enabled, so no-grad rollouts are unaffected.
    Gradients are identical with and without it (``tests/unit/test_objectives.py``).
    """
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} has no block-level gradient checkpointing hook")
    if enabled:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=_non_reentrant_checkpoint)
    else:
        model.disable_gradient_checkpointing()
    return model


def check_attention_backend(backend: str) -> None:
    """The backend exists and can run here (its package installed, a CUDA device); preflight calls it too.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the backend's package is not installed or there is no CUDA device — never a silent fallback.
    """
    if backend not in _DIFFUSERS_BACKEND:
        raise ValueError(f"attention_backend={backend!r} is unknown; choose one of {sorted(_DIFFUSERS_BACKEND)}")
    if backend in _BACKEND_PACKAGE:
        module_name, package = _BACKEND_PACKAGE[backend]
        if importlib.util.find_spec(module_name) is None:
            raise RuntimeError(
                f"attention_backend={backend!r} needs the {package} package, which is not installed; "
                f"install it with pip install -e '.[gpu]' on a CUDA machine, or use attention_backend='sdpa'"
            )
        if not torch.cuda.is_available():
            raise RuntimeError(f"attention_backend={backend!r} needs a CUDA device; use attention_backend='sdpa'")


def apply_attention_backend(model: nn.Module, backend: AttentionBackend = "sdpa") -> nn.Module:
    """Route the model's attention through PyTorch SDPA (default), xformers or flash-attn.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the backend's package is not installed or there is no CUDA device — never a silent fallback.
    """
    check_attention_backend(backend)
    if backend == "sdpa":
        model.reset_attention_backend()  # diffusers' default dispatch: torch SDPA
    else:
        model.set_attention_backend(_DIFFUSERS_BACKEND[backend])
    return model


def apply_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    adapter_name: str = "default",
) -> nn.Module:
    """Add LoRA adapters (peft) to ``model`` and make them its only trainable parameters.

    Must run before ``deepspeed.initialize`` so that ZeRO partitions the adapter weights with the rest. The LoRA
    ``B`` matrices start at zero: the adapted model's outputs equal the base model's at step 0.

    Args:
        model: a diffusers model with ``add_adapter`` (PeftAdapterMixin).
        rank: LoRA rank r ≥ 1.
        alpha: LoRA scaling numerator (``lora_alpha``); defaults to ``rank`` (scale 1).
        targets: module-name suffixes to adapt (attention projections by default).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be >= 1 (use full fine-tuning with rank 0)")
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets), init_lora_weights=True
    )
    model.add_adapter(config, adapter_name=adapter_name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"LoRA targets {list(targets)} matched no module of {type(model).__name__}")
    logger.info("LoRA rank %d on %d tensors", rank, len(trainable))
    return model


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def hook_free_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its parameter and buffer objects but carries no module hooks.

    ZeRO-3 hangs fetch/release hooks on every submodule; with every parameter already gathered (a no-grad rollout
    under ``GatheredParameters``) they only cost time — on a small model they triple a forward's cost. The twin
    runs the same forward code on the same tensors (no copy: the deep copy's memo maps every parameter and buffer
    to itself), so its outputs are bit-identical (``tests/unit/test_parallelize.py``). Use it only while the
    parameters are gathered, and call nothing hooked in between: a hooked forward releases the parameters it used
    when it ends (even inside ``GatheredParameters``), and nothing would gather them again for the twin.
    """
    import copy

    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    twin = copy.deepcopy(module, memo)
    for sub in twin.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(sub, name, None)
            if hooks:
                setattr(sub, name, type(hooks)())
        # ZeRO-3 swaps in a parameter dict that fetches on access; the twin reads its (gathered) tensors directly.
        sub._parameters = dict(sub._parameters)
    return twin
