"""The run's config tree: one section per part of the run, each value checked where its section is defined.

The method section (``method: {objective, leapalign: {...}, refl: {...}, ...}``) is assembled from the objectives'
own sections in ``engine.objectives``; everything else is here.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from engine.objectives import MethodConfig
from engine.sections import Section, fail, setting

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LoggingConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainConfig",
]


@dataclass
class ModelConfig(Section):
    """The flow transformer being trained and how it runs."""

    _prefix: ClassVar[str] = "model"

    kind: Literal["flux", "sd3"] = setting("flux", "model family: FLUX (guidance-distilled) or SD3 (true CFG)")
    path: str | None = setting(None, "local diffusers folder; null = the embedded world's pretrained model")
    height: int = setting(32, "image height in pixels; a multiple of 16 (paper: 720)")
    width: int = setting(32, "image width in pixels; a multiple of 16 (paper: 720)")
    guidance_scale: float = setting(3.5, "FLUX: embedded guidance; SD3: classifier-free guidance scale (paper: 3.5)")
    negative_prompt: str = setting("", "negative prompt for true CFG (SD3)")
    cfg_negative_no_grad: bool = setting(True, "run the CFG negative branch without gradient (halves leap memory)")
    attention_backend: Literal["sdpa", "xformers", "flash"] = setting("sdpa", "attention kernel of the transformer")
    gradient_checkpointing: bool = setting(True, "recompute transformer blocks in backward")
    vae_gradient_checkpointing: bool = setting(True, "recompute VAE decoder blocks in the reward backward")
    frozen_dtype: Literal["fp32", "bf16", "fp16"] = setting("bf16", "dtype of the frozen VAE, text encoders, rewards")
    text_encoder_device: str | None = setting(
        None, "device the text encoders run on while prompts are encoded (e.g. cpu); null = the training device"
    )

    def _validate(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                # FLUX packs 2x2 latent patches of an 8x VAE; SD3 patches (2) of an 8x VAE: both need 16 | size.
                nearest = max(16, round(value / 16) * 16)
                fail(self._name(name), value, f"must be a positive multiple of 16; use e.g. {nearest}")
        if self.guidance_scale < 0:
            fail(self._name("guidance_scale"), self.guidance_scale, "must be >= 0 (paper: 3.5)")
        if self.path is not None and not self.path.strip():
            fail(self._name("path"), self.path, "is empty; give a local diffusers folder or null for the tiny model")


@dataclass
class RewardConfig(Section):
    """One reward model; the training loss is the weighted sum of the rewards' hinge losses."""

    _prefix: ClassVar[str] = "reward"

    name: str = setting("world_clip", "registered reward name (e.g. hpsv21, pickscore, hpsv3)")
    path: str | None = setting(None, "local checkpoint of the reward model; null = the reward's default location")
    lam: float | None = setting(None, "hinge threshold λ in max(0, λ − r); null = the reward's paper default")
    weight: float = setting(1.0, "weight of this reward's loss in the combination")

    def _validate(self) -> None:
        if not self.name.strip():
            fail(self._name("name"), self.name, "is empty; name a registered reward")
        if self.weight <= 0:
            fail(self._name("weight"), self.weight, "must be > 0; drop the reward instead of weighting it 0")
        if self.path is not None and not self.path.strip():
            fail(self._name("path"), self.path, "is empty; give a local checkpoint or null")


@dataclass
class RolloutConfig(Section):
    """The no-grad sampling run that every objective starts from."""

    _prefix: ClassVar[str] = "rollout"

    num_steps: int = setting(25, "Euler sampling steps of the training rollout (paper: 25)")
    dtype: Literal["bf16", "fp32"] = setting("bf16", "compute dtype of the rollout")
    cache: Literal["anchors", "all"] = setting("anchors", "latents kept on CPU: the drawn anchors only, or every step")
    gather_params: Literal["once", "per_call"] = setting(
        "once", "ZeRO-3: gather the parameters once per rollout (fast) or per transformer call (less memory)"
    )
    eval_num_steps: int | None = setting(None, "sampling steps for evaluation images; null = num_steps (paper: 50)")

    def _validate(self) -> None:
        self._positive("num_steps", "eval_num_steps")


@dataclass
class DataConfig(Section):
    """Prompt sources."""

    _prefix: ClassVar[str] = "data"

    prompts: str | None = setting(
        None, "training prompts, a text file with one prompt a line; null = the world's fine-tuning prompts"
    )
    eval_prompts: str | None = setting(None, "evaluation prompts, same format; null = the world's held-out prompts")
    eval_per_category: int = setting(
        50, "with eval_prompts null: the world's held-out prompts judged per GenEval category at start and end (×6)"
    )
    shuffle: bool = setting(True, "shuffle the training prompts each epoch")
    embedding_cache: str | None = setting(
        None, "folder of the prompt-embedding store (reused across runs); null = <output_dir>/embeddings"
    )

    def _validate(self) -> None:
        for name in ("prompts", "eval_prompts"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                fail(self._name(name), value, "is empty; give a text file or null for the embedded list")
        self._positive("eval_per_category")


@dataclass
class OptimConfig(Section):
    """What is trained and for how long; the optimizer, LR and batch live in the DeepSpeed JSON."""

    _prefix: ClassVar[str] = "optim"

    max_steps: int = setting(40, "optimizer steps (paper: 300)")
    lora_rank: int = setting(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float | None = setting(None, "LoRA scale numerator; null = lora_rank (scale 1)")
    lora_targets: list[str] = setting(["to_q", "to_k", "to_v", "to_out.0"], "module-name suffixes that get LoRA")
    ema_decay: float | None = setting(0.995, "EMA decay of the trained weights in (0, 1); null = no EMA (paper: 0.995)")
    ema_warmup: bool = setting(False, "ramp the EMA decay as min(ema_decay, (1+n)/(10+n)) at update n (Flow-GRPO)")
    max_consecutive_bad_steps: int = setting(5, "stop after this many consecutive non-finite loss/grad steps")
    seed: int = setting(0, "base seed: noise per rank, anchor draws shared by every rank")

    def _validate(self) -> None:
        self._positive("max_steps", "max_consecutive_bad_steps")
        self._positive("lora_rank", "seed", minimum=0)
        if self.lora_alpha is not None:
            if self.lora_alpha <= 0:
                fail(self._name("lora_alpha"), self.lora_alpha, "must be > 0 or null")
            if self.lora_rank == 0:
                fail(self._name("lora_alpha"), self.lora_alpha, "needs optim.lora_rank > 0; set lora_alpha: null")
        if self.lora_rank > 0 and not self.lora_targets:
            fail(self._name("lora_targets"), self.lora_targets, "is empty; name the modules that get LoRA")
        for index, target in enumerate(self.lora_targets):
            if not target.strip():
                fail(self._name(f"lora_targets.{index}"), target, "is empty; give a module-name suffix")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            fail(self._name("ema_decay"), self.ema_decay, "must lie in (0, 1), or be null for no EMA (paper: 0.995)")


@dataclass
class CheckpointConfig(Section):
    """Saving and resuming."""

    _prefix: ClassVar[str] = "checkpoint"

    every: int = setting(0, "save every this many steps; 0 = only at the end")
    keep_last: int = setting(2, "training checkpoints kept on disk")
    resume: str = setting("auto", "'auto' (latest in output_dir if any), 'never', or a checkpoint path")
    export: bool = setting(True, "write the trained (EMA) transformer as a diffusers folder at the end")

    def _validate(self) -> None:
        self._positive("every", minimum=0)
        self._positive("keep_last")
        if not self.resume.strip():
            fail(self._name("resume"), self.resume, "is empty; use 'auto', 'never' or a checkpoint path")


@dataclass
class LoggingConfig(Section):
    """Metrics and images."""

    _prefix: ClassVar[str] = "logging"

    log_every: int = setting(1, "log metrics every this many steps (the only host syncs of the loop)")
    image_every: int = setting(0, "log evaluation images every this many steps; 0 = at the start and end only")
    tensorboard: bool = setting(True, "write TensorBoard events under output_dir")
    progress: bool = setting(True, "show a progress bar on rank 0")
    eval_weights: Literal["trained", "ema"] = setting(
        "trained", "weights the evaluation grids sample: the trained ones, or their EMA (the paper evaluates the EMA)"
    )

    def _validate(self) -> None:
        self._positive("log_every")
        self._positive("image_every", minimum=0)


@dataclass
class TrainConfig(Section):
    """The whole run."""

    output_dir: str = setting("runs/default", "run folder: resolved config, logs, checkpoints, images, export")
    collective_timeout_s: int = setting(
        600, "seconds a collective may wait before the run stops (a dead or hung rank ends every rank)"
    )
    model: ModelConfig = setting(ModelConfig, "the transformer being trained")
    rewards: list[RewardConfig] = field(
        default_factory=lambda: [RewardConfig()], metadata={"help": "reward models, combined by weight"}
    )
    method: MethodConfig = setting(MethodConfig, "training objective")
    rollout: RolloutConfig = setting(RolloutConfig, "no-grad sampling")
    data: DataConfig = setting(DataConfig, "prompts")
    optim: OptimConfig = setting(OptimConfig, "training length, LoRA, EMA")
    checkpoint: CheckpointConfig = setting(CheckpointConfig, "saving and resuming")
    logging: LoggingConfig = setting(LoggingConfig, "metrics and images")

    def _validate(self) -> None:
        self._positive("collective_timeout_s")
        if not self.output_dir.strip():
            fail("output_dir", self.output_dir, "is empty; name the run folder")
        if not self.rewards:
            fail("rewards", self.rewards, "is empty; give at least one reward, e.g. rewards: [{name: hpsv21}]")
        seen: dict[str, int] = {}
        for index, reward in enumerate(self.rewards):
            if reward.name in seen:
                fail(
                    f"rewards.{index}.name",
                    reward.name,
                    f"repeats rewards.{seen[reward.name]}; merge them into one entry with a larger weight",
                )
            seen[reward.name] = index
        if self.logging.eval_weights == "ema" and self.optim.ema_decay is None:
            fix = "needs an EMA; set optim.ema_decay (paper: 0.995) or eval_weights: trained"
            fail("logging.eval_weights", "ema", fix)
        # The chosen objective's settings against the rollout grid (the other objectives' sections are unused).
        self.method.selected().check_grid(self.rollout.num_steps)

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
                fail(
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
                fail(name, path, "does not exist; give a local path (nothing is downloaded)")
            if is_dir and not os.path.isdir(path):
                fail(name, path, "is not a folder; give a local diffusers folder")
