"""The typed run configuration and the DeepSpeed JSON resolver.

One tree of dataclasses holds every setting the engine owns. Values resolve in three layers: the dataclass defaults,
then a YAML file, then ``key=value`` overrides with dotted keys (``method.alpha=0.1``, ``rewards.0.name=pickscore``,
``output_dir=runs/x``). Every field is type-checked and range-checked in ``__post_init__``; every error is a
:class:`ConfigError` with a one-line message naming the dotted field and the fix.

The DeepSpeed JSON is the single source of ZeRO, precision, optimizer, learning-rate and batch settings: nothing
here duplicates them. :func:`resolve_deepspeed_config` reads the JSON, fills the ``"auto"`` values plain DeepSpeed
cannot resolve (batch sizes from the world size, gradient clipping) and checks the batch arithmetic and precision.

Example::

    cfg = load_config("configs/flux_hpsv21.yaml", ["method.alpha=0.2", "optim.max_steps=10"])
    ds = resolve_deepspeed_config("configs/zero3.json", world_size=16)
    save_config(cfg, f"{cfg.output_dir}/config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainConfig",
    "config_help",
    "config_to_dict",
    "deepspeed_precision",
    "load_config",
    "resolve_deepspeed_config",
    "save_config",
]


class ConfigError(ValueError):
    """A bad setting. The message is one line: the dotted field, its value and the fix."""


def _field(default: Any, help_text: str) -> Any:
    """A dataclass field with a one-line help string; lists and sections get a fresh copy per instance."""
    metadata = {"help": help_text}
    if isinstance(default, type):  # a nested section: build its defaults per instance
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _fail(name: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{name}={value!r} {why}")


class _TypeMismatch(ConfigError):
    """A value of the wrong type (a union tries its next member); other ConfigErrors are final."""


# --------------------------------------------------------------------------------------------------------------------
# Type checking, shared by every section
# --------------------------------------------------------------------------------------------------------------------

# PyYAML (YAML 1.1) reads ``1e-5`` (no dot) as a string; accept such numbers for float fields.
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _list_item(hint: Any) -> Any | None:
    """The item type of a ``list[...]`` hint, else None."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else None


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    item = _list_item(hint)
    if item is not None:
        return f"a list of {_type_name(item)}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


def _check_type(value: Any, hint: Any, name: str) -> Any:
    """Return ``value`` if it has type ``hint`` (ints widen to float), else raise a one-line ConfigError."""
    wrong = f"{name}={value!r} has type {type(value).__name__}; expected {_type_name(hint)}"
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        for option in options:
            try:
                return _check_type(value, option, name)
            except _TypeMismatch:
                continue
        raise _TypeMismatch(wrong)
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint) or isinstance(value, bool):
            raise _TypeMismatch(f"{name}={value!r} is not a valid choice; choose {_type_name(hint)}")
        return value
    item = _list_item(hint)
    if item is not None:
        if not isinstance(value, list | tuple):
            raise _TypeMismatch(wrong)
        return [_check_type(element, item, f"{name}.{index}") for index, element in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise _TypeMismatch(wrong)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _TypeMismatch(wrong)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _TypeMismatch(wrong)
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _TypeMismatch(wrong)
        if not math.isfinite(value):
            _fail(name, value, "must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _TypeMismatch(wrong)
        return value
    raise TypeError(f"config field {name} has an unsupported type hint {hint!r}")  # a bug in this file


class _Section:
    """Type-checks every field after ``__init__``, then runs the section's own range checks (``_validate``)."""

    _prefix: ClassVar[str] = ""  # the dotted name of the section in the tree, for error messages

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(getattr(self, f.name), hints[f.name], self._name(f.name)))
        self._validate()

    def _name(self, field_name: str) -> str:
        return f"{self._prefix}.{field_name}" if self._prefix else field_name

    def _validate(self) -> None:
        pass

    def _positive(self, *field_names: str, minimum: int = 1) -> None:
        for field_name in field_names:
            value = getattr(self, field_name)
            if value is not None and value < minimum:
                _fail(self._name(field_name), value, f"must be >= {minimum}")


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(_Section):
    """The flow transformer being trained and how it runs."""

    _prefix: ClassVar[str] = "model"

    kind: Literal["flux", "sd3"] = _field("flux", "model family: FLUX (guidance-distilled) or SD3 (true CFG)")
    path: str | None = _field(None, "local diffusers folder; null = the embedded world's pretrained model")
    height: int = _field(32, "image height in pixels; a multiple of 16 (paper: 720)")
    width: int = _field(32, "image width in pixels; a multiple of 16 (paper: 720)")
    guidance_scale: float = _field(3.5, "FLUX: embedded guidance; SD3: classifier-free guidance scale (paper: 3.5)")
    negative_prompt: str = _field("", "negative prompt for true CFG (SD3)")
    cfg_negative_no_grad: bool = _field(True, "run the CFG negative branch without gradient (halves leap memory)")
    attention_backend: Literal["sdpa", "xformers", "flash"] = _field("sdpa", "attention kernel of the transformer")
    gradient_checkpointing: bool = _field(True, "recompute transformer blocks in backward")
    vae_gradient_checkpointing: bool = _field(True, "recompute VAE decoder blocks in the reward backward")
    frozen_dtype: Literal["fp32", "bf16", "fp16"] = _field("bf16", "dtype of the frozen VAE, text encoders, rewards")
    text_encoder_device: str | None = _field(
        None, "device the text encoders run on while prompts are encoded (e.g. cpu); null = the training device"
    )

    def _validate(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                # FLUX packs 2x2 latent patches of an 8x VAE; SD3 patches (2) of an 8x VAE: both need 16 | size.
                nearest = max(16, round(value / 16) * 16)
                _fail(self._name(name), value, f"must be a positive multiple of 16; use e.g. {nearest}")
        if self.guidance_scale < 0:
            _fail(self._name("guidance_scale"), self.guidance_scale, "must be >= 0 (paper: 3.5)")
        if self.path is not None and not self.path.strip():
            _fail(self._name("path"), self.path, "is empty; give a local diffusers folder or null for the tiny model")


@dataclass
class RewardConfig(_Section):
    """One reward model; the training loss is the weighted sum of the rewards' hinge losses."""

    _prefix: ClassVar[str] = "reward"

    name: str = _field("world_clip", "registered reward name (e.g. hpsv21, pickscore, hpsv3)")
    path: str | None = _field(None, "local checkpoint of the reward model; null = the reward's default location")
    lam: float | None = _field(None, "hinge threshold λ in max(0, λ − r); null = the reward's paper default")
    weight: float = _field(1.0, "weight of this reward's loss in the combination")

    def _validate(self) -> None:
        if not self.name.strip():
            _fail(self._name("name"), self.name, "is empty; name a registered reward")
        if self.weight <= 0:
            _fail(self._name("weight"), self.weight, "must be > 0; drop the reward instead of weighting it 0")
        if self.path is not None and not self.path.strip():
            _fail(self._name("path"), self.path, "is empty; give a local checkpoint or null")


@dataclass
class MethodConfig(_Section):
    """The training objective and its hyper-parameters."""

    _prefix: ClassVar[str] = "method"

    objective: Literal["leapalign", "full_backprop", "refl", "draft_lv", "drtune"] = _field(
        "leapalign", "training objective: LeapAlign or a direct-gradient baseline"
    )
    # LeapAlign
    n_leaps: int = _field(2, "LeapAlign: leaps per trajectory, 1 to 3 (paper: 2)")
    alpha: float | None = _field(None, "LeapAlign: nested-gradient discount in [0, 1]; null = the reward's default")
    tau: float = _field(0.1, "LeapAlign: floor of the leap distances in the similarity weight (paper: 0.1)")
    similarity_weight: bool = _field(True, "LeapAlign: weight each trajectory by its similarity to the rollout")
    min_level: int = _field(1, "LeapAlign: lowest anchor level (grid steps before x_0)")
    max_level: int | None = _field(None, "LeapAlign: highest anchor level; null = rollout.num_steps")
    fixed_distance: int | None = _field(None, "LeapAlign: consecutive anchors exactly this many levels apart")
    pairs_per_rollout: int = _field(1, "LeapAlign: anchor draws trained per rollout (needs decouple_reward)")
    decouple_reward: bool = _field(True, "compute ∂reward/∂x_0 once, apart from the leap graph (exact; less memory)")
    # Baselines
    refl_last_steps: int = _field(11, "ReFL: the training step is drawn from the last this-many grid steps")
    draft_lv_renoise: int = _field(2, "DRaFT-LV: re-noise/denoise loops of the last step")
    drtune_train_steps: int = _field(2, "DRTune: grid steps trained per trajectory")
    drtune_stop_fraction: float = _field(0.4, "DRTune: fraction in (0, 1] of the trajectory trained (from x_1)")
    truncate_steps: int | None = _field(None, "full backprop: gradient through the last K steps only (DRaFT-K)")
    checkpoint_steps: bool = _field(True, "full backprop: recompute each sampling step in backward")

    def _validate(self) -> None:
        if not 1 <= self.n_leaps <= 3:
            _fail(self._name("n_leaps"), self.n_leaps, "must be 1, 2 or 3 (paper: 2)")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            _fail(
                self._name("alpha"), self.alpha, "must lie in [0, 1] (paper: 0.3 for HPSv2.1, 0.1 for PickScore/HPSv3)"
            )
        if self.tau <= 0:
            _fail(self._name("tau"), self.tau, "must be > 0 (paper: 0.1)")
        self._positive("min_level", "max_level", "fixed_distance", "pairs_per_rollout")
        self._positive("refl_last_steps", "draft_lv_renoise", "drtune_train_steps", "truncate_steps")
        if self.max_level is not None and self.min_level > self.max_level:
            _fail(
                self._name("min_level"),
                self.min_level,
                f"> method.max_level={self.max_level}: the anchor range is empty; set min_level <= max_level",
            )
        if self.fixed_distance is not None and self.n_leaps < 2:
            _fail(
                self._name("fixed_distance"),
                self.fixed_distance,
                "spaces consecutive anchors; it needs method.n_leaps >= 2",
            )
        if self.pairs_per_rollout > 1 and not self.decouple_reward:
            _fail(
                self._name("pairs_per_rollout"),
                self.pairs_per_rollout,
                "> 1 reuses one reward gradient for several leap draws; set method.decouple_reward=true",
            )
        if not 0.0 < self.drtune_stop_fraction <= 1.0:
            _fail(self._name("drtune_stop_fraction"), self.drtune_stop_fraction, "must lie in (0, 1]")


@dataclass
class RolloutConfig(_Section):
    """The no-grad sampling run that every objective starts from."""

    _prefix: ClassVar[str] = "rollout"

    num_steps: int = _field(25, "Euler sampling steps of the training rollout (paper: 25)")
    dtype: Literal["bf16", "fp32"] = _field("bf16", "compute dtype of the rollout")
    cache: Literal["anchors", "all"] = _field("anchors", "latents kept on CPU: the drawn anchors only, or every step")
    gather_params: Literal["once", "per_call"] = _field(
        "once", "ZeRO-3: gather the parameters once per rollout (fast) or per transformer call (less memory)"
    )
    eval_num_steps: int | None = _field(None, "sampling steps for evaluation images; null = num_steps (paper: 50)")

    def _validate(self) -> None:
        self._positive("num_steps", "eval_num_steps")


@dataclass
class DataConfig(_Section):
    """Prompt sources."""

    _prefix: ClassVar[str] = "data"

    prompts: str | None = _field(
        None, "training prompts, a text file with one prompt a line; null = the world's fine-tuning prompts"
    )
    eval_prompts: str | None = _field(None, "evaluation prompts, same format; null = the world's held-out prompts")
    shuffle: bool = _field(True, "shuffle the training prompts each epoch")
    embedding_cache: str | None = _field(
        None, "folder of the prompt-embedding store (reused across runs); null = <output_dir>/embeddings"
    )

    def _validate(self) -> None:
        for name in ("prompts", "eval_prompts"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                _fail(self._name(name), value, "is empty; give a text file or null for the embedded list")


@dataclass
class OptimConfig(_Section):
    """What is trained and for how long; the optimizer, LR and batch live in the DeepSpeed JSON."""

    _prefix: ClassVar[str] = "optim"

    max_steps: int = _field(40, "optimizer steps (paper: 300)")
    lora_rank: int = _field(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float | None = _field(None, "LoRA scale numerator; null = lora_rank (scale 1)")
    lora_targets: list[str] = _field(["to_q", "to_k", "to_v", "to_out.0"], "module-name suffixes that get LoRA")
    ema_decay: float | None = _field(0.995, "EMA decay of the trained weights in (0, 1); null = no EMA (paper: 0.995)")
    max_consecutive_bad_steps: int = _field(5, "stop after this many consecutive non-finite loss/grad steps")
    seed: int = _field(0, "base seed: noise per rank, anchor draws shared by every rank")

    def _validate(self) -> None:
        self._positive("max_steps", "max_consecutive_bad_steps")
        self._positive("lora_rank", "seed", minimum=0)
        if self.lora_alpha is not None:
            if self.lora_alpha <= 0:
                _fail(self._name("lora_alpha"), self.lora_alpha, "must be > 0 or null")
            if self.lora_rank == 0:
                _fail(self._name("lora_alpha"), self.lora_alpha, "needs optim.lora_rank > 0; set lora_alpha: null")
        if self.lora_rank > 0 and not self.lora_targets:
            _fail(self._name("lora_targets"), self.lora_targets, "is empty; name the modules that get LoRA")
        for index, target in enumerate(self.lora_targets):
            if not target.strip():
                _fail(self._name(f"lora_targets.{index}"), target, "is empty; give a module-name suffix")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            _fail(self._name("ema_decay"), self.ema_decay, "must lie in (0, 1), or be null for no EMA (paper: 0.995)")


@dataclass
class CheckpointConfig(_Section):
    """Saving and resuming."""

    _prefix: ClassVar[str] = "checkpoint"

    every: int = _field(0, "save every this many steps; 0 = only at the end")
    keep_last: int = _field(2, "training checkpoints kept on disk")
    resume: str = _field("auto", "'auto' (latest in output_dir if any), 'never', or a checkpoint path")
    export: bool = _field(True, "write the trained (EMA) transformer as a diffusers folder at the end")

    def _validate(self) -> None:
        self._positive("every", minimum=0)
        self._positive("keep_last")
        if not self.resume.strip():
            _fail(self._name("resume"), self.resume, "is empty; use 'auto', 'never' or a checkpoint path")


@dataclass
class LoggingConfig(_Section):
    """Metrics and images."""

    _prefix: ClassVar[str] = "logging"

    log_every: int = _field(1, "log metrics every this many steps (the only host syncs of the loop)")
    image_every: int = _field(0, "log evaluation images every this many steps; 0 = at the start and end only")
    tensorboard: bool = _field(True, "write TensorBoard events under output_dir")
    progress: bool = _field(True, "show a progress bar on rank 0")
    eval_weights: Literal["trained", "ema"] = _field(
        "trained", "weights the evaluation grids sample: the trained ones, or their EMA (the paper evaluates the EMA)"
    )

    def _validate(self) -> None:
        self._positive("log_every")
        self._positive("image_every", minimum=0)


@dataclass
class TrainConfig(_Section):
    """The whole run."""

    output_dir: str = _field("runs/default", "run folder: resolved config, logs, checkpoints, images, export")
    collective_timeout_s: int = _field(
        600, "seconds a collective may wait before the run stops (a dead or hung rank ends every rank)"
    )
    model: ModelConfig = _field(ModelConfig, "the transformer being trained")
    rewards: list[RewardConfig] = field(
        default_factory=lambda: [RewardConfig()], metadata={"help": "reward models, combined by weight"}
    )
    method: MethodConfig = _field(MethodConfig, "training objective")
    rollout: RolloutConfig = _field(RolloutConfig, "no-grad sampling")
    data: DataConfig = _field(DataConfig, "prompts")
    optim: OptimConfig = _field(OptimConfig, "training length, LoRA, EMA")
    checkpoint: CheckpointConfig = _field(CheckpointConfig, "saving and resuming")
    logging: LoggingConfig = _field(LoggingConfig, "metrics and images")

    def _validate(self) -> None:
        self._positive("collective_timeout_s")
        if not self.output_dir.strip():
            _fail("output_dir", self.output_dir, "is empty; name the run folder")
        if not self.rewards:
            _fail("rewards", self.rewards, "is empty; give at least one reward, e.g. rewards: [{name: hpsv21}]")
        seen: dict[str, int] = {}
        for index, reward in enumerate(self.rewards):
            if reward.name in seen:
                _fail(
                    f"rewards.{index}.name",
                    reward.name,
                    f"repeats rewards.{seen[reward.name]}; merge them into one entry with a larger weight",
                )
            seen[reward.name] = index
        if self.logging.eval_weights == "ema" and self.optim.ema_decay is None:
            fix = "needs an EMA; set optim.ema_decay (paper: 0.995) or eval_weights: trained"
            _fail("logging.eval_weights", "ema", fix)
        self._validate_method()

    def _validate_method(self) -> None:
        """Checks of the chosen objective against the rollout grid (other objectives' fields are unused)."""
        method, num_steps = self.method, self.rollout.num_steps
        grid = f"rollout.num_steps={num_steps}"
        if method.objective == "leapalign":
            if method.max_level is not None and method.max_level > num_steps:
                _fail("method.max_level", method.max_level, f"exceeds {grid}; set max_level <= {num_steps} or null")
            max_level = num_steps if method.max_level is None else method.max_level
            if method.min_level > max_level:
                _fail(
                    "method.min_level",
                    method.min_level,
                    f"leaves the anchor range [{method.min_level}, {max_level}] empty; set it <= {max_level}",
                )
            available = max_level - method.min_level + 1
            if method.n_leaps > available:
                _fail(
                    "method.n_leaps",
                    method.n_leaps,
                    f"needs {method.n_leaps} anchor levels but [{method.min_level}, {max_level}] has {available}; "
                    "widen method.min_level/max_level, raise rollout.num_steps or use fewer leaps",
                )
            if method.fixed_distance is not None:
                widest = (max_level - method.min_level) // (method.n_leaps - 1)
                if method.fixed_distance > widest:
                    _fail(
                        "method.fixed_distance",
                        method.fixed_distance,
                        f"does not fit {method.n_leaps} anchors in [{method.min_level}, {max_level}]; "
                        f"use 1 <= fixed_distance <= {widest}",
                    )
        elif method.objective == "refl" and method.refl_last_steps > num_steps:
            _fail("method.refl_last_steps", method.refl_last_steps, f"exceeds {grid}; set it <= {num_steps}")
        elif method.objective == "drtune" and method.drtune_train_steps > num_steps:
            _fail("method.drtune_train_steps", method.drtune_train_steps, f"exceeds {grid}; set it <= {num_steps}")
        elif method.objective == "drtune":
            # DRTune trains only before its earliest stop, the last stop_fraction of the steps (engine.objectives).
            first_stop = num_steps - max(1, math.floor(method.drtune_stop_fraction * num_steps))
            if method.drtune_train_steps > first_stop:
                _fail(
                    "method.drtune_train_steps",
                    method.drtune_train_steps,
                    f"exceeds the {first_stop} steps before DRTune's earliest stop ({grid}, drtune_stop_fraction="
                    f"{method.drtune_stop_fraction}); set it <= {first_stop} or raise rollout.num_steps",
                )
        elif (
            method.objective == "full_backprop"
            and method.truncate_steps is not None
            and method.truncate_steps > num_steps
        ):
            _fail("method.truncate_steps", method.truncate_steps, f"exceeds {grid}; set it <= {num_steps} or null")

    def validate_names(self, known_rewards: set[str]) -> None:
        """Check every reward name against the reward registry.

        Args:
            known_rewards: The registered reward names.

        Raises:
            ConfigError: A reward name is not registered.
        """
        for index, reward in enumerate(self.rewards):
            if reward.name not in known_rewards:
                near = difflib.get_close_matches(reward.name, sorted(known_rewards), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                _fail(
                    f"rewards.{index}.name",
                    reward.name,
                    f"is unknown{hint}; choose one of {', '.join(sorted(known_rewards))}",
                )

    def check_paths(self) -> None:
        """Check that every local path the run reads exists, before any work starts.

        Raises:
            ConfigError: A configured path is missing.
        """
        checks: list[tuple[str, str | None, bool]] = [
            ("model.path", self.model.path, True),
            ("data.prompts", self.data.prompts, False),
            ("data.eval_prompts", self.data.eval_prompts, False),
        ]
        checks += [(f"rewards.{i}.path", reward.path, False) for i, reward in enumerate(self.rewards)]
        if self.checkpoint.resume not in ("auto", "never"):
            checks.append(("checkpoint.resume", self.checkpoint.resume, False))
        for name, path, is_dir in checks:
            if path is None:
                continue
            if not os.path.exists(path):
                _fail(name, path, "does not exist; give a local path (nothing is downloaded)")
            if is_dir and not os.path.isdir(path):
                _fail(name, path, "is not a folder; give a local diffusers folder")


# --------------------------------------------------------------------------------------------------------------------
# Loading, overriding and saving
# --------------------------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain nested dicts and lists, in field order."""
    return dataclasses.asdict(cfg)


def _dotted(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


@functools.cache
def _all_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Every dotted leaf key of ``cls`` (list sections as ``rewards.0.*``), for suggestions."""
    keys: list[str] = []
    for name, hint in _hints(cls).items():
        if name.startswith("_"):
            continue
        item = _list_item(hint)
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, _dotted(prefix, name))
        elif item is not None and dataclasses.is_dataclass(item):
            keys += _all_keys(item, _dotted(prefix, f"{name}.0"))
        else:
            keys.append(_dotted(prefix, name))
    return tuple(keys)


def _unknown_key(key: Any, cls: type, prefix: str) -> typing.NoReturn:
    name = _dotted(prefix, key)
    names = [f.name for f in dataclasses.fields(cls)]
    near = [_dotted(prefix, match) for match in difflib.get_close_matches(str(key), names, n=3)]
    if not near:  # a setting given in the wrong section, e.g. `alpha` for `method.alpha`
        leaves = _all_keys(TrainConfig)
        near = [k for k in leaves if difflib.get_close_matches(str(key), [k.rsplit(".", 1)[-1]], cutoff=0.8)][:3]
    if near:
        raise ConfigError(f"unknown config key {name!r}; did you mean {' or '.join(repr(k) for k in near)}?")
    where = f"under {prefix!r}" if prefix else "at the top level"
    raise ConfigError(f"unknown config key {name!r}; valid keys {where}: {', '.join(names)}")


def _assign(hint: Any, current: Any, value: Any, name: str) -> Any:
    """The new value of a slot of type ``hint``: sections merge key by key, lists of sections replace the list."""
    if dataclasses.is_dataclass(hint):
        # An empty YAML section (`method:` with every line commented out) reads as null: keep the current values.
        return _merge(hint, copy.deepcopy(current), {} if value is None else value, name)
    item = _list_item(hint)
    if item is not None and dataclasses.is_dataclass(item):
        if not isinstance(value, list):
            _fail(name, value, f"has type {type(value).__name__}; expected {_type_name(hint)}")
        return [_merge(item, config_to_dict(item()), element, f"{name}.{i}") for i, element in enumerate(value)]
    return value


def _merge(cls: type, base: dict[str, Any], update: Any, prefix: str) -> dict[str, Any]:
    """Merge a mapping from YAML or an override onto ``base`` (the dict form of ``cls``), rejecting unknown keys."""
    if not isinstance(update, dict):
        _fail(prefix or "the config", update, f"has type {type(update).__name__}; expected {_type_name(cls)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in update.items():
        if key not in names:
            _unknown_key(key, cls, prefix)
        base[key] = _assign(hints[key], base[key], value, _dotted(prefix, key))
    return base


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Construct ``cls`` from its complete dict form; the sections' ``__post_init__`` checks every value."""
    kwargs: dict[str, Any] = {}
    for name, hint in _hints(cls).items():
        if name.startswith("_"):
            continue
        value = data[name]
        item = _list_item(hint)
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value)
        elif item is not None and dataclasses.is_dataclass(item):
            built = []
            for index, element in enumerate(value):
                try:
                    built.append(_build(item, element))
                except ConfigError as error:  # name the entry: `reward.lam=...` -> `rewards.1.lam=...`
                    message = str(error)
                    if message.startswith(f"{item._prefix}."):
                        message = f"{name}.{index}." + message[len(item._prefix) + 1 :]
                    raise ConfigError(message) from None
            value = built
        kwargs[name] = value
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.load(file, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{where}: {problem}") from None


def _parse_override(item: str) -> tuple[str, Any, str]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. method.alpha=0.1")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"override {item!r}: cannot parse the value ({problem}); quote it") from None
    return key, value, raw


def _accepts_str(hint: Any) -> bool:
    return hint is str or (_is_union(hint) and str in typing.get_args(hint))


def _apply_override(data: dict[str, Any], key: str, value: Any, raw: str) -> None:
    """Set one dotted key (``method.alpha``, ``rewards.0.name``, ``rewards.1`` appends) in the dict form."""
    parts = key.split(".")
    hint: Any = TrainConfig
    node: Any = data
    prefix = ""
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        name = _dotted(prefix, part)
        if dataclasses.is_dataclass(hint):
            if part not in {f.name for f in dataclasses.fields(hint)}:
                _unknown_key(part, hint, prefix)
            hint, slot = _hints(hint)[part], part
        elif _list_item(hint) is not None:
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(
                    f"override key {name!r}: {part!r} is not an index of {prefix} ({len(node)} entries); "
                    f"use index {len(node)} to append one"
                )
            hint, slot = _list_item(hint), int(part)
            if slot == len(node):  # append: a fresh default entry, then set into it
                node.append(config_to_dict(hint()) if dataclasses.is_dataclass(hint) else None)
        else:
            _fail(prefix, node, f"is a value, not a section; {key!r} is not a config key")
        if last:
            # `output_dir=2024` or `model.path=123`: a string field takes the text as written.
            if _accepts_str(hint) and isinstance(value, bool | int | float):
                value = raw.strip()
            node[slot] = _assign(hint, node[slot], value, name)
            return
        node, prefix = node[slot], name


def load_config(yaml_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Resolve a run config: dataclass defaults, then a YAML file, then ``key=value`` overrides.

    Args:
        yaml_path: A YAML file with any subset of the tree (sections as mappings, ``rewards`` as a list of
            mappings, each merged onto the reward defaults), or None for the defaults.
        overrides: ``key=value`` strings with dotted keys (``method.alpha=0.1``, ``rewards.0.name=pickscore``;
            index ``len(rewards)`` appends a reward). Values are parsed as YAML (``null``, ``true``, ``[a, b]``).

    Returns:
        The validated config.

    Raises:
        ConfigError: Unreadable YAML, an unknown key (with close matches), a wrong type or a bad value.
    """
    data = config_to_dict(TrainConfig())
    if yaml_path is not None:
        loaded = _read_yaml(yaml_path)
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(
                    f"config file {yaml_path}: expected a mapping at the top, got {type(loaded).__name__}"
                )
            data = _merge(TrainConfig, data, loaded, "")
    for item in overrides:
        key, value, raw = _parse_override(item)
        _apply_override(data, key, value, raw)
    return _build(TrainConfig, data)


def save_config(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (``load_config(path, [])`` gives it back); parent folders are created."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        file.write("# Resolved LeapAlign Engine config: defaults <- YAML <- overrides. Reload with --config.\n")
        yaml.safe_dump(config_to_dict(cfg), file, sort_keys=False, allow_unicode=True)


def config_help() -> str:
    """One line per dotted key: type, default and help, for ``--help``."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            hint, name = hints[f.name], _dotted(prefix, f.name)
            item = _list_item(hint)
            if dataclasses.is_dataclass(hint):
                walk(hint, name)
            elif item is not None and dataclasses.is_dataclass(item):
                walk(item, f"{name}.N")
            else:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
                lines.append(f"{name} ({_type_name(hint)}, default {default!r}): {f.metadata.get('help', '')}")

    walk(TrainConfig, "")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON
# --------------------------------------------------------------------------------------------------------------------

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
