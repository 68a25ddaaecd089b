"""The DeepSpeed JSON: the single source of ZeRO, precision, optimizer, learning-rate and batch settings.

:func:`resolve_deepspeed_config` reads it, fills the ``"auto"`` values plain DeepSpeed cannot resolve (batch sizes
from the world size, gradient clipping) and checks the batch arithmetic and precision; nothing in Python duplicates
its values.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from engine.sections import ConfigError

__all__ = ["DEEPSPEED_OPTIMIZERS", "DEEPSPEED_SCHEDULERS", "deepspeed_precision", "resolve_deepspeed_config"]


def _dotted(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _batch_value(ds: dict[str, Any], key: str, path: str) -> int | None:
    value = ds.get(key)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'deepspeed config {path}: {key}={value!r} must be a positive integer or "auto"')
    return value


def _resolve_batch(ds: dict[str, Any], world_size: int, path: str) -> None:
    """Fill the batch triple from the given values; DeepSpeed then checks what we check here, less readably."""
    total, micro, accum = (_batch_value(ds, key, path) for key in _BATCH_KEYS)
    where = f"deepspeed config {path}"

    def divide(numerator: int, denominator: int, what: str) -> int:
        if numerator % denominator:
            raise ConfigError(
                f"{where}: train_batch_size={numerator} is not divisible by {what}={denominator} "
                f'(world_size={world_size}); change train_batch_size or set it to "auto"'
            )
        return numerator // denominator

    if total is None and micro is None:
        raise ConfigError(f'{where}: give train_micro_batch_size_per_gpu or train_batch_size (both are unset/"auto")')
    if total is None:
        accum = accum or 1
        total = micro * accum * world_size
    elif micro is None:
        accum = accum or 1
        micro = divide(total, accum * world_size, "gradient_accumulation_steps × world_size")
    elif accum is None:
        accum = divide(total, micro * world_size, "train_micro_batch_size_per_gpu × world_size")
    if micro * accum * world_size != total:
        raise ConfigError(
            f"{where}: train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size = "
            f"{micro} × {accum} × {world_size} = {micro * accum * world_size} != train_batch_size={total}; "
            f'set train_batch_size to {micro * accum * world_size} or "auto"'
        )
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)


def _find_auto(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _find_auto(value, _dotted(prefix, key))]
    if isinstance(node, list):
        return [k for index, value in enumerate(node) for k in _find_auto(value, _dotted(prefix, index))]
    return [prefix] if node == "auto" else []


def _precision_sections(ds: dict[str, Any]) -> dict[str, Any]:
    # "bfloat16" is DeepSpeed's older name of the "bf16" section.
    return {key: ds[key] for key in ("bf16", "bfloat16", "fp16") if isinstance(ds.get(key), dict)}


def deepspeed_precision(ds: dict[str, Any]) -> torch.dtype:
    """The training precision a DeepSpeed config asks for: bfloat16, float16, or float32 when neither is enabled.

    Args:
        ds: A DeepSpeed config dict (resolved or not).

    Raises:
        ConfigError: bf16 and fp16 are both enabled, or ``enabled`` is not a boolean.
    """
    enabled: list[str] = []
    for key, section in _precision_sections(ds).items():
        flag = section.get("enabled", False)
        if not isinstance(flag, bool):
            raise ConfigError(f"deepspeed config: {key}.enabled={flag!r} must be true or false")
        if flag:
            enabled.append(key)
    if len(enabled) > 1:
        raise ConfigError(f"deepspeed config: {' and '.join(enabled)} are both enabled; enable at most one")
    if not enabled:
        return torch.float32
    return torch.float16 if enabled[0] == "fp16" else torch.bfloat16


# DeepSpeed's built-in optimizer and scheduler names (deepspeed.runtime.config / lr_schedules), compared lower-case.
DEEPSPEED_OPTIMIZERS = ("adam", "adamw", "lamb", "onebitadam", "zerooneadam", "onebitlamb", "adagrad", "lion")
DEEPSPEED_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_types(ds: dict[str, Any], path: str) -> None:
    """Types of the precision, batch, clipping and ZeRO-stage entries, each error naming the key.

    (:func:`_check_optimizer` follows the batch arithmetic: an optimizer without ``params.lr`` would train at
    DeepSpeed's default, 1e-3 with no weight decay, without a word, so it is refused, as is a missing optimizer.)
    """

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"deepspeed config {path}: {key}: {problem}")

    for key in ("bf16", "bfloat16", "fp16"):
        if key in ds and not isinstance(ds[key], dict):
            fail(key, f'must be an object such as {{"enabled": true}}, got {json.dumps(ds[key])}')
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds.get(key)
        if value is not None and value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            fail(key, f'must be a positive integer or "auto", got {json.dumps(value)}')
    clipping = ds.get("gradient_clipping")
    if clipping is not None and clipping != "auto" and (not _is_number(clipping) or clipping < 0):
        fail("gradient_clipping", f"must be a number >= 0 (1.0 in the paper), got {json.dumps(clipping)}")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        stage = zero["stage"]
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
            fail("zero_optimization.stage", f"must be the integer 0, 1, 2 or 3, got {json.dumps(stage)}")


def _check_optimizer(ds: dict[str, Any], path: str) -> None:
    """The optimizer (required: the JSON is the only source of the learning rate) and the scheduler, if any."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"deepspeed config {path}: {key}: {problem}")

    optimizer = ds.get("optimizer")
    if optimizer is None:
        fail("optimizer", 'is missing; add {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 1e-4}}')
    if not isinstance(optimizer, dict):
        fail("optimizer", f"must be an object with type and params, got {json.dumps(optimizer)}")
    kind = optimizer.get("type")
    if not isinstance(kind, str) or kind.lower() not in DEEPSPEED_OPTIMIZERS:
        fail("optimizer.type", f"{json.dumps(kind)} is not a DeepSpeed optimizer; use AdamW (or one of "
             f"{', '.join(DEEPSPEED_OPTIMIZERS)})")  # fmt: skip
    params = optimizer.get("params")
    if not isinstance(params, dict) or "lr" not in params:
        fail("optimizer.params.lr", "is missing: DeepSpeed would train at its default lr 1e-3 with no weight decay; "
             "set it (paper: lr 1e-5, weight_decay 1e-4)")  # fmt: skip
    lr = params["lr"]
    if not _is_number(lr) or lr <= 0:
        fail("optimizer.params.lr", f"must be a number > 0 (paper: 1e-5), got {json.dumps(lr)}")
    for key in ("weight_decay", "eps"):
        value = params.get(key)
        if value is not None and (not _is_number(value) or value < 0):
            fail(f"optimizer.params.{key}", f"must be a number >= 0, got {json.dumps(value)}")
    betas = params.get("betas")
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        fail("optimizer.params.betas", f"must be two numbers in [0, 1) such as [0.9, 0.999], got {json.dumps(betas)}")
    for key in ("torch_adam", "adam_w_mode"):
        if key in params and not isinstance(params[key], bool):
            fail(f"optimizer.params.{key}", f"must be true or false, got {json.dumps(params[key])}")

    scheduler = ds.get("scheduler")
    if scheduler is not None:
        if not isinstance(scheduler, dict) or scheduler.get("type") not in DEEPSPEED_SCHEDULERS:
            got = scheduler.get("type") if isinstance(scheduler, dict) else scheduler
            fail("scheduler.type", f"{json.dumps(got)} is not a DeepSpeed scheduler; use one of "
                 f"{', '.join(DEEPSPEED_SCHEDULERS)} or drop the section")  # fmt: skip
        if not isinstance(scheduler.get("params", {}), dict):
            fail("scheduler.params", "must be an object")


def _check_zero(ds: dict[str, Any], path: str) -> None:
    """Validate the ZeRO section with DeepSpeed's own schema, turning its multi-line error into one line."""
    zero = ds.get("zero_optimization")
    if zero is None:
        return
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed config {path}: zero_optimization must be an object")
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError
    except ImportError:  # deepspeed absent: the trainer will fail loudly anyway; nothing to check against
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise ConfigError(
            f"deepspeed config {path}: zero_optimization.{location}: {first['msg']} (DeepSpeed's ZeRO schema)"
        ) from None


def resolve_deepspeed_config(path: str, world_size: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON, fill its ``"auto"`` values for ``world_size`` ranks and check it.

    Filled: the batch triple ``train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps ×
    world_size`` from whichever two are given (one alone: accumulation 1), and ``gradient_clipping: "auto"`` (1.0).
    ``zero_optimization.memory_efficient_linear`` is filled ``false`` (``true`` is refused; see ``_torch_linear``).
    ZeRO ``"auto"`` bucket sizes are left to DeepSpeed, which resolves them itself. The file is not modified.

    Args:
        path: The JSON file.
        world_size: Data-parallel ranks of the run.

    Returns:
        The resolved config, a new dict, ready for ``deepspeed.initialize(config=...)``.

    Raises:
        ConfigError: Unreadable file or invalid JSON (with its position), batch arithmetic that does not hold,
            ``"auto"`` in optimizer/scheduler settings (training hyper-parameters: set them), both bf16 and fp16
            enabled, or a ZeRO section DeepSpeed rejects.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be a positive integer")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError(f"deepspeed config {path}: cannot read it ({error.strerror or error})") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"deepspeed config {path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed config {path}: expected a JSON object at the top, got {type(ds).__name__}")

    for section in ("optimizer", "scheduler"):
        autos = _find_auto(ds.get(section), section)
        if autos:
            raise ConfigError(
                f'deepspeed config {path}: {autos[0]} is "auto" but it is a training hyper-parameter; set it '
                "(paper: AdamW lr 1e-5, weight_decay 1e-4)"
            )
    for key, section in _precision_sections(ds).items():
        if section.get("enabled") == "auto":
            raise ConfigError(f'deepspeed config {path}: {key}.enabled is "auto"; set it to true or false')

    _check_types(ds, path)
    _resolve_batch(ds, world_size, path)
    _check_optimizer(ds, path)
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 1.0
    leftover = [key for key in _find_auto(ds, "") if not key.startswith("zero_optimization.")]
    if leftover:
        raise ConfigError(f'deepspeed config {path}: {leftover[0]} is "auto", which nothing resolves; set a value')
    try:
        deepspeed_precision(ds)
    except ConfigError as error:
        raise ConfigError(str(error).replace("deepspeed config:", f"deepspeed config {path}:", 1)) from None
    _check_zero(ds, path)
    _torch_linear(ds, path)
    return ds


def _torch_linear(ds: dict[str, Any], path: str) -> None:
    """Keep torch's own ``nn.functional.linear``: DeepSpeed's ``memory_efficient_linear`` (on by default) makes
    ``zero.Init`` replace it for the whole process, the frozen reward models and the VAE included, and never put it
    back, so ZeRO-3 would no longer compute what one process does. Filled ``false`` when absent; ``true`` refused."""
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("memory_efficient_linear", False) is not False:
        raise ConfigError(
            f"deepspeed config {path}: zero_optimization.memory_efficient_linear="
            f"{json.dumps(zero['memory_efficient_linear'])} replaces torch.nn.functional.linear for the whole "
            "process (reward models and VAE included), which the engine does not support; set it to false"
        )
    zero["memory_efficient_linear"] = False
