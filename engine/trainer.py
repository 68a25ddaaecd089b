"""The DeepSpeed trainer: train → train_step → forward_backward.

One step, as data flows (see ``../shared/ARCHITECTURE.md``): prompts of this rank's micro-batch → cached
embeddings → no-grad rollout (bf16, parameters gathered once or per call) into a CPU trajectory cache → the
objective's gradient passes through the DeepSpeed engine (``engine.backward``) → non-finite guard → ``engine.step``
→ EMA shard update → metrics, images, checkpoints.

Only the trainable transformer goes through ``deepspeed.initialize``; VAE, text encoders and rewards are plain
frozen modules outside ``zero.Init``. Every rank makes the same sequence of transformer calls: the objective's
draws come from a generator seeded identically everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from engine import checkpoint as ckpt
from engine.components import build_criterion, build_model, rank_device
from engine.config import TrainConfig, deepspeed_precision, save_config
from engine.data import PromptOrder, run_prompts
from engine.ema import ShardedEMA
from engine.evaluation import write_evaluation
from engine.host import fix_mmap_threshold, keep_heap_warm
from engine.metrics import MetricsLog, StepTimer, mean_over_ranks, peak_memory
from engine.models.kinds import model_kind
from engine.objectives import Objective, StepBatch, build_objective
from engine.parallelize import hook_free_twin
from engine.rewards import REGISTRY
from engine.rollout import rollout
from engine.text_phase import encode_prompts, model_folder

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log_rank0(message: str, *args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(message, *args)


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    """Owns the adapter, the DeepSpeed engine, the objective, EMA, metrics and checkpoints of one run."""

    def __init__(self, cfg: TrainConfig, ds_config: dict):
        self.cfg = copy.deepcopy(cfg)  # defaults resolved below (λ, α) are written into this copy and config.yaml
        cfg = self.cfg
        self.ds_config = ds_config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = rank_device(self.world_size)
        self.out = Path(cfg.output_dir)
        self.train_dtype = deepspeed_precision(ds_config)
        self.rollout_dtype = DTYPES[cfg.rollout.dtype]
        self.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        self.accumulation = ds_config["gradient_accumulation_steps"]
        self.global_batch = ds_config["train_batch_size"]
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

        fix_mmap_threshold()  # host memory freed during start-up goes back to the system (see its docstring)
        self._load_prompts()
        self._build_criterion()  # first: a bad reward checkpoint stops the run before anything is written
        self._encode_prompts()
        self._build_model()
        self.objective: Objective = self._build_objective()
        self._build_engine()
        self.ema = None
        if cfg.optim.ema_decay is not None:
            # After deepspeed.initialize: the EMA averages the optimizer's fp32 masters, kept where they live.
            self.ema = ShardedEMA(
                self.trainable, cfg.optim.ema_decay, self.rank, self.world_size, warmup=cfg.optim.ema_warmup
            )
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.noise_generator = torch.Generator().manual_seed(cfg.optim.seed * 7919 + self.rank)
        states = {"trainer": self, "objective": self.objective, "order": self.order}
        if self.ema is not None:
            states["ema"] = self.ema
        self.checkpoints = ckpt.CheckpointManager(
            self.out,
            self.engine,
            states,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=cfg.checkpoint.keep_last,
            depends=ckpt.depends(cfg, ds_config),
        )
        self.metrics_log = MetricsLog(self.out, self.rank, tensorboard=cfg.logging.tensorboard)
        self._resume()

    # ------------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The loop's own state (this rank's): step, skip counters, noise stream and global RNG."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "noise_generator": self.noise_generator.get_state(),
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.bad_in_a_row = state["bad_in_a_row"]
        self.noise_generator.set_state(state["noise_generator"])
        ckpt.set_rng_state(state["rng"])

    # ------------------------------------------------------------------------------------------------ set-up

    def _load_prompts(self) -> None:
        self.prompts, self.eval_prompts, self.eval_specs = run_prompts(self.cfg.data)
        self.order = PromptOrder(self.prompts, self.global_batch, self.cfg.optim.seed, self.cfg.data.shuffle)

    def _model_folder(self) -> Path:
        return model_folder(self.cfg.model)

    def _encode_prompts(self) -> None:
        """The text phase, before the transformer exists (``engine.text_phase.encode_prompts``)."""
        for folder in {self.out, Path(self.cfg.data.embedding_cache or self.out)}:
            ckpt.check_shared_folder(folder, self.rank, self.world_size)  # several nodes: one filesystem
        every = sorted(set(self.prompts) | set(self.eval_prompts))
        self.store = encode_prompts(
            self.cfg, self._model_folder(), every, self.out, device=self.device, rank=self.rank, world=self.world_size
        )

    def _build_model(self) -> None:
        self.adapter, self.transformer = build_model(
            self.cfg.model, self.cfg.optim, self._model_folder(), self.ds_config, self.train_dtype, self.device
        )

    def _build_criterion(self) -> None:
        self.cfg.validate_names(set(REGISTRY))
        self.criterion, self.rewards = build_criterion(self.cfg.rewards, self.device)  # fills each reward's λ used

    def _build_objective(self) -> Objective:
        # Settings left null take the first reward's defaults (LeapAlign's α); the values used go to config.yaml.
        self.cfg.method.selected().resolve({"alpha": self.rewards[0].default_alpha})
        return build_objective(self.cfg.method, self.cfg.rollout.num_steps, seed=self.cfg.optim.seed)

    def _build_engine(self) -> None:
        named = [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]
        self.trainable_names = [n for n, _ in named]
        self.trainable = [p for _, p in named]
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.transformer, model_parameters=self.trainable, config=self.ds_config
        )
        n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.trainable)
        n_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.transformer.parameters())
        zero = self.ds_config.get("zero_optimization", {})
        offloaded = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
                     if (zero.get(k) or {}).get("device", "none") != "none"]  # fmt: skip
        log_rank0(
            "transformer: %.2fM parameters, %.2fM trainable (%s), ZeRO stage %d on %d rank(s), %s, optimizer %s%s",
            n_total / 1e6,
            n_trainable / 1e6,
            "LoRA" if self.cfg.optim.lora_rank else "full",
            self.zero_stage,
            self.world_size,
            self.train_dtype,
            type(getattr(self.engine, "basic_optimizer", None) or self.engine.optimizer).__name__,
            f", offloaded: {' and '.join(offloaded)}" if offloaded else "",
        )
        if self.zero_stage == 3 and self.cfg.rollout.gather_params == "once":
            full_bytes = n_total * torch.finfo(self.train_dtype).bits // 8
            log_rank0("rollout gathers all parameters once per rollout: +%.1f MB per rank", full_bytes / 2**20)

    def _resume(self) -> None:
        found = ckpt.resolve_resume(self.cfg)
        if found is None:
            return
        self.checkpoints.load(found)
        if self.rank == 0:
            self.metrics_log.truncate(self.step)
        log_rank0("resumed from %s at step %d", found, self.step)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step)

    def export(self) -> Path:
        """The trained (and EMA) transformer as diffusers weights under ``<output_dir>/export``."""
        lora_pipeline = model_kind(self.cfg.model.kind).pipeline if self.cfg.optim.lora_rank > 0 else None
        return ckpt.export(
            self.out / "export",
            self.engine,
            zero_stage=self.zero_stage,
            rank=self.rank,
            trainable_names=self.trainable_names,
            ema=self.ema,
            lora_pipeline=lora_pipeline,
        )

    # ------------------------------------------------------------------------------------------------ loop

    def train(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            if self.step == 0 and ckpt.start_fresh(self.out):
                log_rank0("%s held a run that stopped before its first checkpoint: its logs and images were discarded",
                          self.out)  # fmt: skip
            save_config(cfg, self.out / "config.yaml")
            (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
        keep_heap_warm(self.device)  # CPU ranks, from the first step on, not at start-up (engine/host.py)
        progress = None
        if self.rank == 0 and cfg.logging.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.optim.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            if self.step == 0:
                self.save_images("start")
            while self.step < cfg.optim.max_steps:
                metrics = self.train_step()
                if progress is not None:
                    progress.update(1)
                    if metrics is not None:
                        progress.set_postfix(reward=f"{metrics['reward_mean']:.4f}", loss=f"{metrics['loss']:.4f}")
                every = cfg.checkpoint.every
                if every and self.step % every == 0 and self.step < cfg.optim.max_steps:
                    self.save_checkpoint()
                if cfg.logging.image_every and self.step % cfg.logging.image_every == 0:
                    self.save_images(f"step_{self.step:06d}")
            self.save_checkpoint()
            self.save_images("end")
            if cfg.checkpoint.export:
                self.export()
        finally:
            if progress is not None:
                progress.close()
            self.metrics_log.close()

    def _micro_batch(self, micro: int) -> list[tuple[int, str]]:
        window = self.order.window(self.step)
        start = (micro * self.world_size + self.rank) * self.micro_batch
        return window[start : start + self.micro_batch]

    def train_step(self) -> dict | None:
        """One optimizer step: ``accumulation`` micro-batches on every rank, then the guarded DeepSpeed step."""
        timer = StepTimer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        outputs = []
        for micro in range(self.accumulation):
            outputs.append(self.forward_backward(self._micro_batch(micro), timer))
        loss = torch.stack([o.loss.float() for o in outputs]).mean()
        reward = torch.cat([o.reward.float() for o in outputs])
        # One all-reduce decides for every rank whether the step is applied (sync point: once per step).
        finite = torch.isfinite(loss) & torch.isfinite(reward).all()
        finite = self._all_ranks(finite) & self._grads_finite()
        if bool(finite):
            self.engine.step()
            if self.ema is not None:
                self.ema.update()
            self.bad_in_a_row = 0
        else:
            self._skip_step()
        timer.mark("optimizer")
        self.step += 1
        metrics = None
        if self.step % self.cfg.logging.log_every == 0 or self.step == self.cfg.optim.max_steps:
            metrics = self._log(loss, reward, outputs, timer, applied=bool(finite))
        if self.bad_in_a_row >= self.cfg.optim.max_consecutive_bad_steps:
            self.save_checkpoint()
            raise NonFiniteStop(
                f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                "a final checkpoint was written; lower the learning rate or check the reward"
            )
        return metrics

    def forward_backward(self, samples: list[tuple[int, str]], timer: StepTimer):
        """Rollout, then the objective's gradient passes, for this rank's micro-batch."""
        cfg = self.cfg
        prompts = [p for _, p in samples]
        seeds = [cfg.optim.seed * 1_000_000_007 + position for position, _ in samples]
        plan = self.objective.plan()
        height, width = cfg.model.height, cfg.model.width
        keep = "all" if cfg.rollout.cache == "all" else plan.positions
        cond, trajectory = self._rollout(prompts, seeds, cfg.rollout.num_steps, keep)
        timer.mark("rollout")
        batch = StepBatch(
            adapter=self.adapter,
            cond=cond,
            prompts=prompts,
            trajectory=trajectory,
            criterion=self.criterion,
            height=height,
            width=width,
            guidance_scale=cfg.model.guidance_scale,
            transformer=self.engine,  # gradient passes go through engine.forward (ZeRO-3 accumulation bookkeeping)
            backward=self.engine.backward,
            generator=self.noise_generator,
        )
        output = self.objective.forward_backward(batch, plan)
        timer.mark("gradient")
        output.metrics.update(plan_positions=len(plan.positions), cache_bytes=trajectory.nbytes)
        return output

    def _rollout(self, prompts: list[str], seeds: list[int], num_steps: int, keep):
        """No-grad rollout of ``prompts`` from per-sample ``seeds``; returns the conditioning and the trajectory."""
        cfg = self.cfg
        height, width = cfg.model.height, cfg.model.width
        cond = self.store.get(prompts).to(self.device)  # this micro-batch's rows, read from the store
        x1 = self.adapter.prepare_noise(len(prompts), height, width, seeds).to(self.device)
        grid = self.adapter.time_grid(num_steps, height, width)
        with self._rollout_parameters() as transformer:
            trajectory = rollout(
                self.adapter,
                cond,
                x1,
                grid,
                guidance_scale=cfg.model.guidance_scale,
                keep=keep,
                dtype=self.rollout_dtype,
                transformer=transformer,
                height=height,
                width=width,
            )
        return cond, trajectory

    @contextlib.contextmanager
    def _rollout_parameters(self):
        """The module the rollout calls. ZeRO-3: gather every parameter once for the whole rollout ("once", then a
        hook-free twin of the module computes from the gathered tensors) or let each call gather ("per_call")."""
        module = self.engine.module
        if self.zero_stage == 3 and self.cfg.rollout.gather_params == "once":
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield hook_free_twin(module)
        else:
            yield module

    def _all_ranks(self, flag: torch.Tensor) -> torch.Tensor:
        flag = flag.to(torch.int32).reshape(1).to(self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag[0].cpu().bool()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _grads_finite(self) -> torch.Tensor:
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "has_overflow"):  # ZeRO 1-3: checks the partitioned gradients, all-reduced inside
            return torch.tensor(not optimizer.has_overflow(partition_gradients=self.zero_stage >= 2))
        local = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.trainable)
        return self._all_ranks(torch.tensor(local))

    def _skip_step(self) -> None:
        """Drop this step's gradients; weights, optimizer state and EMA stay exactly as they were."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        self.engine.zero_grad()
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        log_rank0("step %d: non-finite loss or gradient, step skipped (%d so far)", self.step + 1, self.skipped_steps)

    # ------------------------------------------------------------------------------------------------ outputs

    def _log(self, loss, reward, outputs, timer: StepTimer, applied: bool) -> dict:
        metrics = {"step": self.step, **mean_over_ranks(loss, reward, outputs, self.world_size)}
        grad_norm = self.engine.get_global_grad_norm() if applied else float("nan")
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["applied"] = applied
        metrics["skipped_steps"] = self.skipped_steps
        if self.step == 1 and metrics["loss"] == 0.0 and self.rank == 0:
            lams = ", ".join(f"rewards.{i}.lam={r.lam}" for i, r in enumerate(self.cfg.rewards))
            logger.warning(
                "step 1: every sample's reward is above its threshold (%s): the hinge max(0, λ − r) is 0 and no "
                "step trains the model; raise λ (the rewards' defaults: engine/rewards, README)",
                lams,
            )
        metrics.update(timer.times)
        metrics.update(peak_memory(self.device))
        self.metrics_log.write(metrics)
        return metrics

    @torch.no_grad()
    def save_images(self, tag: str) -> None:
        """A grid of the fixed evaluation prompts, fixed seeds (every rank runs it: ZeRO-3 needs all ranks)."""
        cfg = self.cfg
        prompts = self.eval_prompts
        seeds = list(range(len(prompts)))
        steps = cfg.rollout.eval_num_steps or cfg.rollout.num_steps
        weights = cfg.logging.eval_weights
        swap = self.ema.swapped_in() if weights == "ema" and self.ema is not None else contextlib.nullcontext()
        with swap:
            _, trajectory = self._rollout(prompts, seeds, steps, keep=[steps])
        x0 = trajectory.latent(steps, self.device, torch.float32)
        images = self.adapter.decode(x0, cfg.model.height, cfg.model.width)
        rewards = self.criterion(images, prompts)[1]
        if self.rank == 0:  # only rank 0 writes: the judge (host-side segmentation) runs here alone
            record = {"seeds": seeds, "num_steps": steps, "rollout_dtype": cfg.rollout.dtype, "weights": weights,
                      "step": self.step}  # fmt: skip
            write_evaluation(self.out / "images" / f"{tag}.png", images, prompts, rewards, specs=self.eval_specs,
                             record=record)  # fmt: skip
