"""The trainer end to end on the tiny FLUX model: one process through main(), resume, LoRA/full export, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.prompts import SMALL_PROMPTS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))

import train as train_cli  # noqa: E402  (launch/train.py)

pytestmark = pytest.mark.integration

TIMING_KEYS = ("time_", "peak_")


def write_ds_config(
    path: Path, *, micro_batch: int = 2, stage: int = 3, precision: str = "fp32", lr: float = 1e-3, accumulation=1
):
    config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 1e-4, "torch_adam": True}},
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "stage3_param_persistence_threshold": 0,  # tiny model: partition every parameter, really shard
            "memory_efficient_linear": False,
        },
        "steps_per_print": 1000000,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    path.write_text(json.dumps(config))
    return path


def base_overrides(model_dir, out, steps=3, world_prompts=False, **extra):
    """A short tiny-model run; on eight world captions unless ``world_prompts`` (the world's default splits)."""
    overrides = {
        "model.path": str(model_dir),
        "output_dir": str(out),
        "optim.max_steps": steps,
        **({} if world_prompts else {"data.prompts": str(SMALL_PROMPTS)}),
        "rollout.num_steps": 6,
        "rollout.dtype": "fp32",
        "logging.progress": "false",
        "logging.tensorboard": "false",
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def strip_timing(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


def run_main(ds_json, overrides) -> int:
    """``main([...])`` in this process: for runs that stop before DeepSpeed sets up its global process groups."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)
    return train_cli.main(["--deepspeed", str(ds_json), *overrides])


def run_cli(ds_json, overrides) -> int:
    """``python launch/train.py`` in a fresh process: DeepSpeed's process-group state is global, one run a process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed", str(ds_json), *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-6000:])
    return result.returncode


def engine_outputs_reproduced(model_dir, out: Path, transformer) -> None:
    """Rerun the trainer's end-of-run evaluation grid with ``transformer``: the rewards must match images/end.json."""
    from engine.models import FluxAdapter
    from engine.rewards import RewardCriterion, load_reward
    from engine.rollout import rollout

    record = json.loads((out / "images" / "end.json").read_text())
    adapter = FluxAdapter.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    adapter.transformer = transformer.to(torch.float32)
    prompts = record["prompts"]
    cond = adapter.encode_prompts(prompts)
    x1 = adapter.prepare_noise(len(prompts), 32, 32, record["seeds"])
    grid = adapter.time_grid(record["num_steps"], 32, 32)
    with torch.no_grad():
        x0 = rollout(adapter, cond, x1, grid, guidance_scale=3.5, keep=[], dtype=torch.float32).x0
        _, reward = RewardCriterion.single(load_reward("world_clip", None), 0.9)(adapter.decode(x0, 32, 32), prompts)
    torch.testing.assert_close(reward, torch.tensor(record["reward"]), rtol=1e-4, atol=1e-5)


def test_main_trains_writes_metrics_images_checkpoint_and_export(tiny_flux_dir, tmp_path):
    ds_json = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "run"
    overrides = base_overrides(tiny_flux_dir, out, steps=3, world_prompts=True, **{"checkpoint.every": 2})
    assert run_main(ds_json, overrides) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "loss", "d_j", "d_0", "w", "grad_norm", "k", "j", "time_rollout", "time_gradient"):
        assert all(key in r for r in rows), key
    assert all(r["applied"] for r in rows) and rows[-1]["skipped_steps"] == 0
    assert (out / "images" / "start.png").exists() and (out / "images" / "end.png").exists()
    # The default evaluation prompts are the world's held-out ones: the exact judge scores them at start and end.
    judged = json.loads((out / "images" / "end.json").read_text())["judge"]
    assert set(judged) == {"overall", "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert 0 <= judged["overall"] <= 1
    assert (out / "config.yaml").exists()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000002", "step_000003"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000003"

    from diffusers import FluxTransformer2DModel

    exported = FluxTransformer2DModel.from_pretrained(out / "export" / "transformer")
    original = FluxTransformer2DModel.from_pretrained(Path(tiny_flux_dir) / "transformer")
    changed = [
        name for name, p in exported.named_parameters() if not torch.equal(p, dict(original.named_parameters())[name])
    ]
    assert changed, "training must change the exported weights"
    engine_outputs_reproduced(tiny_flux_dir, out, exported)
    ema = load_file(out / "export" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    trained = load_file(out / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(Path(tiny_flux_dir) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == trained.keys() == base.keys()

    def distance(a, b):
        return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt().item()

    # The EMA (decay 0.995, 3 steps) lies between the base and the trained weights: it moved, but less.
    assert 0 < distance(ema, base) < distance(trained, base), (distance(ema, base), distance(trained, base))
    # config.yaml records the values used, not the nulls that asked for the reward's defaults.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["method"]["leapalign"]["alpha"] == 0.3 and resolved["rewards"][0]["lam"] == 0.9, resolved


def test_per_method_metrics_are_averaged_over_micro_batches(tiny_flux_dir, tmp_path):
    from engine.objectives import build_objective

    ds_json = write_ds_config(tmp_path / "ds.json", micro_batch=1, accumulation=2)
    out = tmp_path / "run"
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, out, steps=4)) == 0
    rows = read_metrics(out)
    # The same shared draws the trainer made: one plan per micro-batch, two micro-batches per step.
    objective = build_objective("leapalign", 6, n_leaps=2, alpha=0.3, seed=0)
    for row in rows:
        levels = [objective.plan().draws["levels"][0] for _ in range(2)]
        assert row["k"] == pytest.approx(sum(lv[0] for lv in levels) / 2)
        assert row["j"] == pytest.approx(sum(lv[1] for lv in levels) / 2)
    assert any(row["k"] != int(row["k"]) for row in rows) or len({r["k"] for r in rows}) > 1


def test_resume_equals_uninterrupted_run(tiny_flux_dir, tmp_path):
    ds_json = write_ds_config(tmp_path / "ds.json")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, straight, steps=4)) == 0
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, resumed, steps=2, **{"checkpoint.export": "false"})) == 0
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, resumed, steps=4)) == 0
    a = load_file(straight / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # CPU, deterministic: bit for bit
    assert strip_timing(read_metrics(straight)) == strip_timing(read_metrics(resumed))


def test_lora_trains_and_exports_weights_the_pipeline_loads(tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline

    ds_json = write_ds_config(tmp_path / "ds.json", lr=1e-2)
    out = tmp_path / "lora"
    overrides = base_overrides(tiny_flux_dir, out, steps=2, **{"optim.lora_rank": 4, "optim.ema_decay": "null"})
    assert run_cli(ds_json, overrides) == 0
    lora_dir = out / "export" / "lora"
    state = load_file(next(lora_dir.glob("*.safetensors")))
    assert state and all("lora" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at zero: it trained

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    base_out = pipe.transformer.transformer_blocks[0].attn.to_q.weight.clone()
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    assert not torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.weight, base_out)
    engine_outputs_reproduced(tiny_flux_dir, out, pipe.transformer)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["method.leapalign.alpha=1.5"], "method.leapalign.alpha"),
        (["method.leapalign.tau=0"], "method.leapalign.tau"),
        (["method.objective=grpo"], "method.objective"),
        (["rewards.0.name=nope"], "rewards.0.name"),
        (["model.path=/nonexistent/flux"], "model.path"),
        (["method.leapalign.min_level=20", "method.leapalign.max_level=10"], "method.leapalign.min_level"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, overrides, match):
    ds_json = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "run"
    code = run_main(ds_json, [f"output_dir={out}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err
    assert not out.exists()  # nothing half-written


def test_rollout_gather_once_equals_per_call(tiny_flux_dir, tmp_path):
    """ZeRO-3 rollout parameters gathered once per rollout or by each call: the same training run."""
    ds_json = write_ds_config(tmp_path / "ds.json")
    runs = {}
    for mode in ("once", "per_call"):
        out = tmp_path / mode
        extra = {"rollout.gather_params": mode, "checkpoint.export": "false"}
        assert run_cli(ds_json, base_overrides(tiny_flux_dir, out, steps=2, **extra)) == 0
        runs[mode] = strip_timing(read_metrics(out))
    assert runs["once"] == runs["per_call"]


def test_sd3_trains_with_true_cfg_and_exports(tiny_sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    ds_json = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "sd3"
    overrides = base_overrides(tiny_sd3_dir, out, steps=2, **{"model.kind": "sd3", "model.guidance_scale": 4.0})
    assert run_cli(ds_json, overrides) == 0
    rows = read_metrics(out)
    assert all(r["applied"] and r["grad_norm"] > 0 for r in rows)
    exported = SD3Transformer2DModel.from_pretrained(out / "export" / "transformer")
    assert sum(p.numel() for p in exported.parameters()) > 0


def test_eval_grid_can_sample_the_ema_weights(tiny_flux_dir, tmp_path):
    """logging.eval_weights=ema: the end grid is the EMA model's (reproduced from the EMA export), and the trained
    weights are untouched by the swap (the trained export still reproduces a trained-weights grid elsewhere)."""
    from diffusers import FluxTransformer2DModel

    ds_json = write_ds_config(tmp_path / "ds.json")
    out = tmp_path / "run"
    extra = {"optim.ema_decay": 0.5, "logging.eval_weights": "ema", "rewards.0.name": "world_clip"}
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, out, steps=2, **extra)) == 0
    record = json.loads((out / "images" / "end.json").read_text())
    assert record["weights"] == "ema"
    engine_outputs_reproduced(
        tiny_flux_dir, out, FluxTransformer2DModel.from_pretrained(out / "export" / "transformer_ema")
    )
    with pytest.raises(AssertionError):  # the trained weights give another grid
        engine_outputs_reproduced(
            tiny_flux_dir, out, FluxTransformer2DModel.from_pretrained(out / "export" / "transformer")
        )


def test_store_built_ahead_is_reused_by_training(tiny_flux_dir, tmp_path):
    """launch/build_embeddings.py fills the store; a run with the same settings encodes nothing and trains the same
    as a run that encodes on its own."""
    sys.path.insert(0, str(REPO / "launch"))
    import build_embeddings

    cache = tmp_path / "cache"
    common = [
        f"model.path={tiny_flux_dir}", f"data.embedding_cache={cache}", f"data.prompts={SMALL_PROMPTS}",
        "logging.progress=false",
    ]  # fmt: skip
    assert build_embeddings.main([*common, f"output_dir={tmp_path / 'unused'}"]) == 0
    (store,) = cache.iterdir()
    shards = sorted(p.name for p in store.iterdir())
    ds_json = write_ds_config(tmp_path / "ds.json")
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, reused, steps=2, **{"data.embedding_cache": cache})) == 0
    assert sorted(p.name for p in store.iterdir()) == shards  # nothing re-encoded, nothing added
    assert run_cli(ds_json, base_overrides(tiny_flux_dir, fresh, steps=2)) == 0
    assert (fresh / "embeddings").is_dir()
    assert strip_timing(read_metrics(reused)) == strip_timing(read_metrics(fresh))
