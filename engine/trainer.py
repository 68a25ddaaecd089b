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
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from engine import checkpoint as ckpt
from engine.config import TrainConfig, deepspeed_precision, save_config
from engine.data import PromptOrder, run_prompts
from engine.ema import ShardedEMA
from engine.models.kinds import model_kind
from engine.models.partitioned import build_partitioned, fix_mmap_threshold
from engine.objectives import Objective, StepBatch, build_objective
from engine.parallelize import apply_activation_checkpointing, apply_attention_backend, apply_lora
from engine.rewards import REGISTRY, HingeTerm, RewardCriterion, load_reward
from engine.rollout import rollout
from engine.text_phase import encode_prompts, frozen_dtype_on, model_folder

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log_rank0(message: str, *args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(message, *args)


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class StepTimer:
    """Wall-clock phases of a step. On CUDA each mark synchronises (a deliberate host sync, once per phase)."""

    device: torch.device

    def __post_init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync point: phase timing
        now = time.perf_counter()
        self.times[f"time_{phase}"] = self.times.get(f"time_{phase}", 0.0) + now - self._last
        self._last = now


class Trainer:
    """Owns the adapter, the DeepSpeed engine, the objective, EMA, metrics and checkpoints of one run."""

    def __init__(self, cfg: TrainConfig, ds_config: dict):
        self.cfg = copy.deepcopy(cfg)  # defaults resolved below (λ, α) are written into this copy and config.yaml
        cfg = self.cfg
        self.ds_config = ds_config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            # CPU ranks share the cores: more threads than cores makes OpenMP spin and slows tiny ops ~10x.
            # An explicit OMP_NUM_THREADS (e.g. several runs side by side) wins.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            threads = int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1) // local_world
            torch.set_num_threads(max(1, threads))
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
            self.ema = ShardedEMA(self.trainable, cfg.optim.ema_decay, self.rank, self.world_size)
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.noise_generator = torch.Generator().manual_seed(cfg.optim.seed * 7919 + self.rank)
        self._resume()
        self._writer = None

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
        """The VAE (frozen, every rank) and the trainable transformer: partitioned as it is built under ZeRO-3."""
        model_cfg, folder = self.cfg.model, self._model_folder()
        kind = model_kind(model_cfg.kind)
        adapter_cls = kind.adapter
        frozen_dtype = frozen_dtype_on(model_cfg.frozen_dtype, self.device)
        if self.zero_stage == 3:
            # No rank ever holds the whole transformer: zero.Init partitions it as it is built, and each rank
            # reads only its partitions' elements from the checkpoint.
            transformer = build_partitioned(kind.transformer, folder / "transformer", self.ds_config, self.train_dtype)
            self.adapter = adapter_cls.from_pretrained(
                str(folder), device=self.device, dtype=frozen_dtype, parts=("vae", "scheduler"), transformer=transformer
            )
        else:
            # The transformer is loaded in the training precision: DeepSpeed keeps fp32 masters in the optimizer.
            self.adapter = adapter_cls.from_pretrained(
                str(folder), device=self.device, dtype=frozen_dtype, parts=("transformer", "vae", "scheduler")
            )
            transformer = self.adapter.transformer.to(self.train_dtype)
        if kind.negative_prompt:
            self.adapter.cfg_negative_no_grad = model_cfg.cfg_negative_no_grad
        self.adapter.vae_gradient_checkpointing(model_cfg.vae_gradient_checkpointing)

        optim = self.cfg.optim
        if optim.lora_rank > 0:
            apply_lora(transformer, optim.lora_rank, alpha=optim.lora_alpha, targets=optim.lora_targets)
        else:
            transformer.requires_grad_(True)
        if model_cfg.gradient_checkpointing:
            apply_activation_checkpointing(transformer)
        apply_attention_backend(transformer, model_cfg.attention_backend)
        self.transformer = transformer

    def _build_criterion(self) -> None:
        self.cfg.validate_names(set(REGISTRY))
        terms, self.rewards = [], []
        for reward_cfg in self.cfg.rewards:
            reward = load_reward(reward_cfg.name, reward_cfg.path, self.device, torch.float32)
            lam = reward_cfg.lam if reward_cfg.lam is not None else reward.default_lam
            reward_cfg.lam = lam  # the value used, for config.yaml
            terms.append(HingeTerm(reward, lam, reward_cfg.weight))
            self.rewards.append(reward)
        self.criterion = RewardCriterion(terms)

    def _build_objective(self) -> Objective:
        m, steps, seed = self.cfg.method, self.cfg.rollout.num_steps, self.cfg.optim.seed
        if m.objective == "leapalign":
            alpha = m.alpha if m.alpha is not None else self.rewards[0].default_alpha
            m.alpha = alpha  # the value used, for config.yaml
            return build_objective(
                "leapalign",
                steps,
                n_leaps=m.n_leaps,
                alpha=alpha,
                tau=m.tau,
                use_similarity_weight=m.similarity_weight,
                min_level=m.min_level,
                max_level=m.max_level,
                fixed_distance=m.fixed_distance,
                pairs_per_rollout=m.pairs_per_rollout,
                decouple_reward=m.decouple_reward,
                seed=seed,
            )
        options = {
            "full_backprop": {"truncate_steps": m.truncate_steps, "checkpoint_steps": m.checkpoint_steps},
            "refl": {"last_steps": m.refl_last_steps},
            "draft_lv": {"renoise": m.draft_lv_renoise},
            "drtune": {"train_steps": m.drtune_train_steps, "stop_fraction": m.drtune_stop_fraction},
        }[m.objective]
        return build_objective(m.objective, steps, seed=seed, **options)

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
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return
        root = self.out / "checkpoints" if resume == "auto" else Path(resume)
        found = ckpt.latest_complete(root)
        if found is None:
            if resume != "auto":
                raise ValueError(f"checkpoint.resume={resume!r} holds no complete checkpoint; give a step_* folder")
            return
        state = ckpt.load(self, found)
        if self.rank == 0:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        log_rank0("resumed from %s at step %d", found, state["step"])

    # ------------------------------------------------------------------------------------------------ loop

    def train(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            if self.step == 0 and ckpt.start_fresh(self.out):
                log_rank0("%s held a run that stopped before its first checkpoint: its logs and images were discarded",
                          self.out)  # fmt: skip
            save_config(cfg, self.out / "config.yaml")
            (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
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
                    ckpt.save(self)
                if cfg.logging.image_every and self.step % cfg.logging.image_every == 0:
                    self.save_images(f"step_{self.step:06d}")
            ckpt.save(self)
            self.save_images("end")
            if cfg.checkpoint.export:
                ckpt.export(self)
        finally:
            if progress is not None:
                progress.close()
            if self._writer is not None:
                self._writer.close()

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
            ckpt.save(self)
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
        with self._rollout_parameters():
            trajectory = rollout(
                self.adapter,
                cond,
                x1,
                grid,
                guidance_scale=cfg.model.guidance_scale,
                keep=keep,
                dtype=self.rollout_dtype,
                transformer=self.engine.module,
                height=height,
                width=width,
            )
        return cond, trajectory

    @contextlib.contextmanager
    def _rollout_parameters(self):
        """ZeRO-3: gather every parameter once for the whole rollout ("once") or let each call gather ("per_call")."""
        if self.zero_stage == 3 and self.cfg.rollout.gather_params == "once":
            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

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
        # Per-method scalars: the mean over this step's micro-batches, then over ranks in one collective
        # (sync point: logging steps only).
        first = outputs[0].metrics
        keys = [k for k, v in first.items() if isinstance(v, torch.Tensor | float | int)]
        local = [float(loss), float(reward.mean())]
        local += [sum(float(o.metrics[k]) for o in outputs) / len(outputs) for k in keys]
        values = torch.tensor(local, dtype=torch.float64)
        dist.all_reduce(values)
        values /= self.world_size
        metrics = {"step": self.step, "loss": values[0].item(), "reward_mean": values[1].item()}
        metrics.update({k: values[2 + i].item() for i, k in enumerate(keys)})
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
        if self.device.type == "cuda":
            metrics["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        else:
            metrics["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as file:
                file.write(json.dumps(_json_safe(metrics)) + "\n")
            writer = self._tensorboard()
            if writer is not None:
                for key, value in metrics.items():
                    if isinstance(value, int | float) and key != "step":
                        writer.add_scalar(key, value, self.step)
        return metrics

    def _tensorboard(self):
        if self._writer is None and self.cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        return self._writer

    @torch.no_grad()
    def save_images(self, tag: str) -> None:
        """A grid of the fixed evaluation prompts, fixed seeds (every rank runs it: ZeRO-3 needs all ranks)."""
        from engine.images import save_grid

        cfg = self.cfg
        prompts = self.eval_prompts
        height, width = cfg.model.height, cfg.model.width
        steps = cfg.rollout.eval_num_steps or cfg.rollout.num_steps
        weights = cfg.logging.eval_weights
        swap = self.ema.swapped_in() if weights == "ema" and self.ema is not None else contextlib.nullcontext()
        with swap:
            _, trajectory = self._rollout(prompts, list(range(len(prompts))), steps, keep=[steps])
        images = self.adapter.decode(trajectory.latent(steps, self.device, torch.float32), height, width)
        scores = self.criterion(images, prompts)[1]
        if self.rank == 0:  # only rank 0 writes: the judge (host-side segmentation) runs here alone
            judged = _judge(images, self.eval_specs or prompts)
            path = self.out / "images" / f"{tag}.png"
            save_grid(images.float().cpu(), [f"{p} ({s:.3f})" for p, s in zip(prompts, scores.tolist())], path)
            # The numbers behind the grid, so a reloaded export can be checked against what the engine produced.
            record = {
                "prompts": prompts,
                "seeds": list(range(len(prompts))),
                "num_steps": steps,
                "rollout_dtype": cfg.rollout.dtype,
                "weights": weights,
                "reward": scores.tolist(),
                "step": self.step,
            }
            if judged is not None:
                record["judge"] = judged
                summary = ", ".join(f"{k} {v:.2f}" for k, v in judged.items())
                log_rank0("judge (%s, %d held-out prompts): %s", tag, len(prompts), summary)
            (path.with_suffix(".json")).write_text(json.dumps(record, indent=1))


def _judge(images: torch.Tensor, prompts: list) -> dict[str, float] | None:
    """The embedded world's exact judge (GenEval's rules) when every prompt is a world prompt, else None.

    ``prompts``: world ``Prompt``s, or captions looked up by text (a caption that two categories share, such as
    "a red circle" in single_object and colors, is then reported under the first).
    """
    from engine.world.evaluate import judge_report, world_prompt

    specs = [p if not isinstance(p, str) else world_prompt(p) for p in prompts]
    if any(spec is None for spec in specs):
        return None
    return judge_report(images.float().cpu(), specs)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after ``step``: a run killed after its last checkpoint logged steps that will be redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill: everything after it is lost anyway
        if row.get("step", 0) > step:
            break
        kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
