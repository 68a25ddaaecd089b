"""The per-GPU memory planner: every phase of a run and every component in it, before anything is launched.

A run goes through six phases, in this order on every rank; what stays on the GPU between them is *resident*:

====================  ===============================================================================================
phase                 on the GPU besides the resident parts
====================  ===============================================================================================
text encoding         the text encoders (T5-XXL ≈ 9.5 GB in bf16) unless ``model.text_encoder_device: cpu``; the
                      transformer does not exist yet (engine/trainer.py builds the rewards, then encodes, then builds
                      the transformer), so this phase holds the rewards and the encoders only
load                  ZeRO-3: one sub-module whole while ``zero.Init`` partitions it; ZeRO-0/2: nothing more
rollout               ZeRO-3: the gathered copy (the whole bf16 transformer with ``gather_params: once``, one block
                      and its prefetch with ``per_call``); no graph
reward                the decoupled reward gradient: the VAE decoder's graph and each reward model's graph
leap/gradient         the leap passes' activations, the checkpoint recompute, the ZeRO-3 block gathers (and, for the
                      coupled objectives, the reward graph at the same time)
optimizer step        nothing beyond the resident states (offload: the states live in host memory)
====================  ===============================================================================================

Resident on every rank: the transformer's parameters (1/world under ZeRO-3), its gradients and optimizer states
(1/world under ZeRO-2/3; on the host with optimizer offload; the adapters only with LoRA), the frozen VAE and every
configured reward model (``model.frozen_dtype``). Parameter counts are exact, from the released architectures built
on the meta device (:data:`REWARD_ARCHS`, :data:`TEXT_ENCODERS`); activation constants come from
``engine/calibration.json`` (the transformer's and VAE's from ``benchmarks/memory_vs_depth.py``, the rewards' from
``benchmarks/reward_memory.py``), each fitted on tiny models of the real architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from engine.memory.activations import Calibration, activation_bytes, gradient_passes, load_calibration
from engine.memory.archs import REWARD_ARCHS, TEXT_ENCODERS, counted, reward_graph_bytes
from engine.models.specs import MODELS, ModelSpec, parameter_counts

GiB = 1024**3


@dataclass
class PlanInput:
    """One training set-up to budget. See ``launch/plan.py --help`` for the meaning of each field."""

    model: str = "flux-dev"
    world_size: int = 8
    gpu_memory_gib: float = 80.0
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only: each rank's bf16 partition in host memory, fetched per sub-module
    lora_rank: int = 0
    height: int = 720
    width: int = 720
    batch_size: int = 1
    objective: str = "leapalign"
    n_leaps: int = 2
    num_steps: int = 25
    checkpointing: bool = True
    gather: str = "once"  # "once" | "per_call"
    rewards: tuple[str, ...] = ()
    text_encoders_on_gpu: bool = True
    element_bytes: int = 2  # bf16 weights and activations
    frozen_bytes: int = 2  # model.frozen_dtype of the VAE, text encoders and rewards
    reserve_gib: float = 1.5  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation
    spec: ModelSpec | None = None  # the architecture read from a model folder; None = MODELS[model]

    def __post_init__(self):
        if self.spec is None and self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is unknown; choose one of {sorted(MODELS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.gather not in ("once", "per_call"):
            raise ValueError(f"gather={self.gather!r} must be 'once' or 'per_call'")
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs ZeRO stage 3 (zero_optimization.offload_param)")
        self.rewards = tuple(self.rewards)
        for name in self.rewards:
            if name not in REWARD_ARCHS:
                raise ValueError(f"reward {name!r} has no planner architecture; choose from {sorted(REWARD_ARCHS)}")

    @property
    def architecture(self) -> ModelSpec:
        return self.spec if self.spec is not None else MODELS[self.model]


PHASES = ("text encoding", "load", "rollout", "reward", "leap/gradient", "optimizer step")


@dataclass
class MemoryPlan:
    """Per-GPU bytes: ``resident`` (held through every phase) and each phase's own ``phases[name]``."""

    inputs: PlanInput
    resident: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    host_bytes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # knob changes that make a plan that does not fit fit
    fixed: PlanInput | None = None  # the inputs with those changes made

    def phase_total(self, phase: str) -> int:
        resident = self.resident if phase != "text encoding" else self._text_resident()
        return sum(resident.values()) + sum(self.phases[phase].values())

    def _text_resident(self) -> dict[str, int]:
        # The transformer, its states and the VAE come after the text phase; only the rewards precede it.
        return {k: v for k, v in self.resident.items() if k.startswith("reward ") or k == "workspace reserve"}

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def breakdown(self) -> dict[str, int]:
        """The peak phase's components (resident ones included), largest first."""
        phase = self.peak_phase
        resident = self.resident if phase != "text encoding" else self._text_resident()
        parts = {**resident, **self.phases[phase]}
        return dict(sorted(parts.items(), key=lambda item: -item[1]))

    @property
    def dominant(self) -> str:
        return next(iter(self.breakdown))

    @property
    def total(self) -> int:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.total <= self.inputs.gpu_memory_gib * GiB

    def format(self) -> str:
        i = self.inputs
        lines = [
            f"{i.architecture.name}: {i.height}x{i.width}, batch {i.batch_size}, {i.objective}"
            + (f" ({i.n_leaps} leaps)" if i.objective == "leapalign" else "")
            + f", T={i.num_steps}, ZeRO-{i.zero_stage} × {i.world_size} GPUs"
            + (", optimizer offload" if i.offload_optimizer else "")
            + (", parameter offload" if i.offload_param else "")
            + (f", LoRA r={i.lora_rank}" if i.lora_rank else ", full fine-tuning")
            + f", checkpointing {'on' if i.checkpointing else 'off'}, rollout gather={i.gather}"
            + f", rewards: {', '.join(i.rewards) or 'none'}",
            f"{'resident (every phase)':<40}{'GiB':>9}",
        ]
        lines += [f"  {name:<38}{value / GiB:>9.2f}" for name, value in self.resident.items()]
        lines.append(f"{'phase':<40}{'GiB':>9}   (resident + the phase's own)")
        for phase in self.phases:
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{phase:<40}{self.phase_total(phase) / GiB:>9.2f}{mark}")
            lines += [f"  + {name:<36}{value / GiB:>9.2f}" for name, value in self.phases[phase].items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"peak: {self.peak_phase}, {self.total / GiB:.2f} GiB per GPU, dominated by {self.dominant} "
            f"({self.breakdown[self.dominant] / GiB:.2f} GiB); {verdict} in {i.gpu_memory_gib:g} GiB "
            f"({self.total / (i.gpu_memory_gib * GiB):.0%})"
        )
        for name, value in self.host_bytes.items():
            lines.append(f"host memory per GPU: {name} {value / GiB:.2f} GiB")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.fixes:
            lines.append("to fit: " + "; ".join(self.fixes))
        elif not self.fits:
            lines.append("to fit: no single knob the planner knows fits this set-up; add GPUs or memory")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        inputs = asdict(self.inputs)
        inputs["spec"] = self.inputs.architecture.name
        return {
            "inputs": inputs,
            "resident": self.resident,
            "phases": {p: {"total": self.phase_total(p), **parts} for p, parts in self.phases.items()},
            "peak_phase": self.peak_phase,
            "dominant": self.dominant,
            "breakdown": self.breakdown,
            "total": self.total,
            "fits": self.fits,
            "host": self.host_bytes,
            "fixes": self.fixes,
        }


def plan_memory(inputs: PlanInput, calibration: Calibration | None = None, *, suggest: bool = True) -> MemoryPlan:
    """Predicts per-GPU memory of every phase of one training step (see the module docstring).

    Bytes per trainable parameter: bf16 weight (2), fp32 gradient (4; DeepSpeed accumulates in fp32), AdamW fp32
    master + two moments (12). ZeRO-2 shards gradients and optimizer states, ZeRO-3 also the weights; offload moves
    the states and their fp32 gradients to the host. With ``suggest`` a plan that does not fit lists the knob
    changes that would fit it (tried cumulatively: per-call gathering, optimizer offload, LoRA, batch 1, 512²).
    """
    cal = calibration or load_calibration()
    i = inputs
    spec = i.architecture
    counts = parameter_counts(spec, i.lora_rank)
    world, e = i.world_size, i.element_bytes
    base = counts["transformer"]
    trainable = counts["lora"] if i.lora_rank else base
    plan = MemoryPlan(inputs=i)
    r = plan.resident

    weights = (base + counts["lora"]) * e
    r["transformer parameters (bf16)"] = weights // world if i.zero_stage == 3 else weights
    if i.offload_param:
        plan.host_bytes["offloaded bf16 parameter partition"] = r.pop("transformer parameters (bf16)")
    grads, optimizer = trainable * 4, trainable * 12
    if i.zero_stage >= 2:
        grads //= world
    if i.zero_stage >= 1:
        optimizer //= world
    if i.offload_optimizer:
        plan.host_bytes["offloaded optimizer states + fp32 gradients"] = optimizer + grads
        r["gradients (bf16 reduce buckets)"] = trainable * e // (world if i.zero_stage >= 2 else 1)
    else:
        r["gradients (fp32)"] = grads
        r["optimizer states (fp32)"] = optimizer
    r["frozen VAE"] = counts["vae"] * i.frozen_bytes
    for name in i.rewards:
        r[f"reward {name} weights"] = counted(REWARD_ARCHS[name].count) * i.frozen_bytes
    r["workspace reserve"] = int(i.reserve_gib * GiB)

    # Text encoding: before the transformer exists (only the rewards are resident then).
    real = spec.name in ("flux-dev", "sd35-medium")  # other specs (tiny, a folder's) bring their own small encoders
    encoders = sum(counted(count) for _, count in TEXT_ENCODERS[spec.family]) if real else 0
    text = plan.phases.setdefault("text encoding", {})
    if i.text_encoders_on_gpu:
        text["text encoders"] = encoders * i.frozen_bytes
    else:
        text["text encoders"] = 0
        plan.host_bytes["text encoders (text phase only)"] = encoders * i.frozen_bytes
    load = plan.phases.setdefault("load", {})
    load["one sub-module whole (zero.Init)" if i.zero_stage == 3 else "nothing beyond resident"] = (
        counts["largest_block"] * e if i.zero_stage == 3 else 0
    )
    rollout = plan.phases.setdefault("rollout", {})
    if i.zero_stage == 3 and i.gather == "once":
        rollout["gathered transformer copy"] = weights - r.get("transformer parameters (bf16)", 0)
    elif i.zero_stage == 3:
        rollout["gathered block + prefetch"] = 2 * counts["largest_block"] * e
        plan.notes.append("gather=per_call: each velocity call re-gathers every block (slower rollout)")
    acts = activation_bytes(
        spec, i.objective, n_leaps=i.n_leaps, num_steps=i.num_steps, height=i.height, width=i.width,
        batch_size=i.batch_size, checkpointing=i.checkpointing, element_bytes=e, calibration=cal,
    )  # fmt: skip
    rollout["one no-grad velocity call"] = acts["recompute"] or acts["transformer_graph"] // max(1, i.n_leaps)

    reward_graph = {
        f"reward {name} graph": reward_graph_bytes(REWARD_ARCHS[name], cal, e, i.batch_size) for name in i.rewards
    }
    _, together = gradient_passes(i.objective, i.n_leaps, i.num_steps)
    reward = plan.phases.setdefault("reward", {})
    gradient = plan.phases.setdefault("leap/gradient", {})
    gradient["leap-pass activations"] = acts["transformer"]
    if acts["recompute"]:
        gradient["checkpoint recompute (transient)"] = acts["recompute"]
    if i.zero_stage == 3:
        gradient["ZeRO-3 block gathers"] = 2 * counts["largest_block"] * e
    if together:  # coupled objectives keep the reward graph alive while the transformer graph is built
        gradient["VAE decoder graph"] = acts["reward"]
        gradient.update(reward_graph)
        reward["(with the gradient passes)"] = 0
    else:
        reward["VAE decoder graph"] = acts["reward"]
        reward.update(reward_graph)
        plan.notes.append("reward gradient decoupled: reward graph and leap graph are never alive together")
    plan.phases.setdefault("optimizer step", {})["nothing beyond resident"] = 0
    plan.phases = {phase: plan.phases[phase] for phase in PHASES}
    plan.notes.append(f"trainable parameters: {trainable / 1e9:.3f} B of {base / 1e9:.3f} B")
    if suggest and not plan.fits:
        plan.fixes, plan.fixed = _fixes(i, cal)
    return plan


def _fixes(inputs: PlanInput, cal: Calibration) -> tuple[list[str], PlanInput | None]:
    """One knob change that fits (the first, in order of cost), else the first cumulative sequence that does; [] when
    none does. Each as the config key to set."""
    knobs = [
        (inputs.zero_stage == 3 and inputs.gather == "once", "rollout.gather_params: per_call",
         dict(gather="per_call")),
        (inputs.text_encoders_on_gpu, "model.text_encoder_device: cpu", dict(text_encoders_on_gpu=False)),
        (inputs.zero_stage == 3 and not inputs.offload_param,
         'zero_optimization.offload_param + offload_optimizer: {"device": "cpu"} (configs/zero3_offload_param.json)',
         dict(offload_param=True, offload_optimizer=True)),
        (not inputs.offload_optimizer and inputs.zero_stage >= 1,
         'zero_optimization.offload_optimizer: {"device": "cpu"} (configs/zero3_offload.json)',
         dict(offload_optimizer=True)),
        (inputs.lora_rank == 0, "optim.lora_rank: 16", dict(lora_rank=16)),
        (inputs.batch_size > 1, "train_micro_batch_size_per_gpu: 1", dict(batch_size=1)),
        (max(inputs.height, inputs.width) > 512, "model.height/width: 512", dict(height=512, width=512)),
    ]  # fmt: skip
    usable = [(text, change) for ok, text, change in knobs if ok]
    for text, change in usable:  # one knob alone, in order of cost to the user
        if plan_memory(replace(inputs, **change), cal, suggest=False).fits:
            return [text], replace(inputs, **change)
    applied: list[tuple[str, dict]] = []
    for knob in usable:
        applied.append(knob)
        if _fits_with(inputs, applied, cal):
            break
    else:
        return [], None
    for knob in list(applied):  # drop the knobs the others make unnecessary
        rest = [k for k in applied if k is not knob]
        if _fits_with(inputs, rest, cal):
            applied = rest
    return [text for text, _ in applied], _with(inputs, applied)


def _with(inputs: PlanInput, knobs: list[tuple[str, dict]]) -> PlanInput:
    for _, change in knobs:
        inputs = replace(inputs, **change)
    return inputs


def _fits_with(inputs: PlanInput, knobs: list[tuple[str, dict]], cal: Calibration) -> bool:
    return plan_memory(_with(inputs, knobs), cal, suggest=False).fits
