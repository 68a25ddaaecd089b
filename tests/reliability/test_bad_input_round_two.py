"""Bad input, round two. Each case exits 2 with one line naming the input, leaving no run folder.

Class 1, the DeepSpeed JSON validated whole, up front, naming the file and the key (before: silent lr 1e-3, raw
tracebacks, late messages naming neither). Class 2, misclassified failures: a corrupt or truncated file in the model
folder is a bad input naming the file, not exit 4 "free space" (before); a missing attention backend is one line,
not a traceback (before), and is found before any work (class 5).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.reliability.test_bad_input import GOOD_DS, good_ds, train_cli

TORCH_LINEAR = torch.nn.functional.linear


def _with(change):
    ds = copy.deepcopy(GOOD_DS)
    change(ds)
    return ds


CASES = {
    "optimizer without params": (lambda ds: ds["optimizer"].pop("params"), "optimizer.params.lr"),
    "optimizer without lr": (lambda ds: ds["optimizer"]["params"].pop("lr"), "optimizer.params.lr"),
    "unknown optimizer": (lambda ds: ds["optimizer"].update(type="AdamWW"), "optimizer.type"),
    "unknown scheduler": (lambda ds: ds.update(scheduler={"type": "Cosine", "params": {}}), "scheduler.type"),
    "lr as a string": (lambda ds: ds["optimizer"]["params"].update(lr="3e-5"), "optimizer.params.lr"),
    "negative lr": (lambda ds: ds["optimizer"]["params"].update(lr=-1e-5), "optimizer.params.lr"),
    "stage as a string": (lambda ds: ds["zero_optimization"].update(stage="3"), "zero_optimization.stage"),
    "bf16 true instead of an object": (lambda ds: ds.update(bf16=True), "bf16"),
    "missing optimizer": (lambda ds: ds.pop("optimizer"), "optimizer"),
    "betas of three": (lambda ds: ds["optimizer"]["params"].update(betas=[0.9, 0.99, 0.999]), "optimizer.params.betas"),
    "micro batch as a string": (lambda ds: ds.update(train_micro_batch_size_per_gpu="2"), "train_micro_batch"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_deepspeed_json_is_one_line_naming_file_and_key(name, tmp_path, capsys):
    change, key = CASES[name]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(_with(change)))
    out = tmp_path / "run"
    code = train_cli.main(["--deepspeed", str(ds), f"output_dir={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: deepspeed config "), err
    assert str(ds) in err[0] and f": {key}" in err[0], err[0]
    assert not out.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


MODEL_CASES = {
    # ZeRO-3 (partitioned reads of the transformer) and ZeRO-2 (diffusers loads it): both name the file.
    "truncated transformer, ZeRO-3": ("transformer", 3, "diffusion_pytorch_model.safetensors"),
    "truncated transformer, ZeRO-2": ("transformer", 2, "transformer"),
    "truncated VAE": ("vae", 3, "vae"),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_corrupt_model_file_is_a_bad_input_naming_it(name, tmp_path, capsys, tiny_flux_dir):
    component, stage, needle = MODEL_CASES[name]
    model = Path(shutil.copytree(tiny_flux_dir, tmp_path / "model"))
    _truncate(next((model / component).glob("*.safetensors")))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(_with(lambda d: d["zero_optimization"].update(stage=stage))))
    out = tmp_path / "run"
    code = train_cli.main(["--deepspeed", str(ds), f"output_dir={out}", f"model.path={model}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err[-3:]  # found in preflight, before any model is built
    assert err[0].startswith("error: ") and needle in err[0] and str(model) in err[0], err[0]
    assert not out.exists()


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _swap_in_wide_t5(model: Path, tmp_path: Path) -> None:
    from engine.models.tiny import WIDE_T5_TRANSFORMER, build_tiny_flux

    other = build_tiny_flux(tmp_path / "other", transformer=WIDE_T5_TRANSFORMER)
    shutil.rmtree(model / "text_encoder_2")
    shutil.copytree(other / "text_encoder_2", model / "text_encoder_2")


CONTENT_CASES = {
    # Class 3: the folder's contents checked against each other before anything heavy loads (before: a size-mismatch
    # traceback from deep inside from_pretrained naming the folder only, or a crash at the first text encoding).
    "config wider than the weights": (
        lambda model, _: _edit_json(model / "text_encoder" / "config.json", intermediate_size=48),
        "text_encoder/config.json and text_encoder/model.safetensors disagree",
    ),
    "config with more blocks than the weights": (
        lambda model, _: _edit_json(model / "transformer" / "config.json", num_layers=2),
        "transformer/diffusion_pytorch_model.safetensors lacks transformer_blocks.1.",
    ),
    "truncated tokenizer JSON": (
        lambda model, _: _truncate(model / "tokenizer_2" / "tokenizer_config.json"),
        "tokenizer_2/tokenizer_config.json is not valid JSON",
    ),
    "T5 from another model": (_swap_in_wide_t5, "transformer/config.json joint_attention_dim=32 does not fit"),
}


@pytest.mark.parametrize("name", list(CONTENT_CASES))
def test_model_folder_contents_disagreeing_are_one_line_before_any_work(name, tmp_path, capsys, tiny_flux_dir):
    change, needle = CONTENT_CASES[name]
    model = Path(shutil.copytree(tiny_flux_dir, tmp_path / "model"))
    change(model, tmp_path)
    capsys.readouterr()  # the builder's progress bars
    out = tmp_path / "run"
    argv = ["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}", f"model.path={model}"]
    _one_line_exit_2(capsys, argv, needle, out)
    assert not out.exists()


@pytest.mark.parametrize("backend", ["xformers", "flash"])
def test_missing_attention_backend_is_one_line_before_any_work(backend, tmp_path, capsys):
    pytest.importorskip("torch")
    import importlib.util

    if (
        importlib.util.find_spec({"xformers": "xformers", "flash": "flash_attn"}[backend])
        and __import__("torch").cuda.is_available()
    ):
        pytest.skip(f"{backend} can run here")
    out = tmp_path / "run"
    code = train_cli.main(
        ["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}", f"model.attention_backend={backend}"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err[-3:]
    assert f"model.attention_backend='{backend}'" in err[0], err[0]
    assert not out.exists()


def _clean_env() -> dict:
    """The environment without the process-group variables an in-process main() left behind (a child would try
    to join that group's port)."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}


def _one_line_exit_2(capsys, argv, needle, out):
    code = train_cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err[-3:]
    assert err[0].startswith("error: ") and needle in err[0], err[0]
    assert not out.exists() or out.is_dir() and not (out / "config.yaml").exists()


SILENT_NONSENSE = {
    # Class 7: each used to be accepted silently.
    "duplicate YAML section": ("yaml", "optim:\n  max_steps: 5\noptim:\n  max_steps: 7\n", "appears twice"),
    "duplicate YAML key": ("yaml", "method:\n  alpha: 0.3\n  alpha: 0.1\n", "appears twice"),
    "zero-width-space prompt": ("prompts", "a red circle\n\u200b\u200b\n", "no visible character"),
    "BOM-and-joiner prompt": ("prompts", "\ufeff\u200d\na blue square\n", "no visible character"),
    "path to a weight-free reward": ("override", "rewards.0.path={existing}", "has no weights"),
    "path to another weight-free reward": ("override", "rewards.1.path={existing}", "has no weights"),
}


@pytest.mark.parametrize("name", list(SILENT_NONSENSE))
def test_silent_nonsense_is_refused(name, tmp_path, capsys):
    kind, content, needle = SILENT_NONSENSE[name]
    out = tmp_path / "run"
    argv = ["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}"]
    if kind == "yaml":
        (tmp_path / "run.yaml").write_text(content)
        argv += ["--config", str(tmp_path / "run.yaml")]
    elif kind == "prompts":
        (tmp_path / "prompts.txt").write_text(content, encoding="utf-8")
        argv += [f"data.prompts={tmp_path / 'prompts.txt'}"]
    else:
        (tmp_path / "weights.pt").write_bytes(b"")  # an existing file: the path check passes, the reward ignores it
        content = content.format(existing=tmp_path / "weights.pt")
        if content.startswith("rewards.0"):
            argv += ["rewards.0.name=tiny_color", content]
        else:  # the weight-free reward second, after one that takes a path
            argv += ["rewards.0.name=world_clip", "rewards.1.name=tiny_color", content]
    _one_line_exit_2(capsys, argv, needle, out)


@pytest.mark.parametrize("foreign", ["notes.txt", "dataset"])
def test_output_dir_holding_someone_elses_files_is_refused(foreign, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / foreign).mkdir() if foreign == "dataset" else (out / foreign).write_text("mine")
    code = train_cli.main(["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and "did not write" in err[-1] and repr(foreign) in err[-1], err[-3:]
    assert sorted(p.name for p in out.iterdir()) == [foreign]  # untouched


def test_lambda_below_every_reward_is_warned_about(tiny_flux_dir, tmp_path):
    import subprocess
    import sys

    from tests.reliability.test_bad_input import REPO

    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed", str(good_ds(tmp_path))]
    cmd += [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_flux_dir}", "rewards.0.name=tiny_color"]
    cmd += ["rewards.0.lam=-100", "optim.max_steps=1", "rollout.num_steps=4", "logging.progress=false"]
    cmd += ["checkpoint.export=false", "logging.tensorboard=false"]
    result = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    warned = [line for line in result.stderr.splitlines() if "no step trains the model" in line]
    assert len(warned) == 1 and "rewards.0.lam=-100" in warned[0], result.stderr[-2000:]


EARLY = {
    # Class 5: found before any model is loaded, naming the key (before: after loading, or a traceback).
    "LoRA target typo": (["optim.lora_rank=4", "optim.lora_targets=[to_qq]"], "optim.lora_targets.0"),
    "LoRA target of another architecture": (["optim.lora_rank=4", "optim.lora_targets=[qkv]"], "optim.lora_targets.0"),
    "DRTune steps past its earliest stop": (
        ["method.objective=drtune", "rollout.num_steps=4", "method.drtune.train_steps=4"],
        "method.drtune.train_steps",
    ),
    "DRTune steps with a long stop window": (
        ["method.objective=drtune", "rollout.num_steps=10", "method.drtune.stop_fraction=0.9"],
        "method.drtune.train_steps",
    ),
    "seed overflowing the noise seeds": (["optim.seed=10000000000"], "optim.seed"),
    "seed near 2**63": ([f"optim.seed={2**62}"], "optim.seed"),
}


@pytest.mark.parametrize("name", list(EARLY))
def test_late_checks_run_early(name, tmp_path, capsys):
    overrides, needle = EARLY[name]
    out = tmp_path / "run"
    _one_line_exit_2(capsys, ["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}", *overrides], needle, out)


def _train(tiny_flux_dir, tmp_path, out, *extra):
    import subprocess
    import sys

    from tests.reliability.test_bad_input import REPO

    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed", str(good_ds(tmp_path))]
    cmd += [f"output_dir={out}", f"model.path={tiny_flux_dir}", "rewards.0.name=tiny_color", "optim.max_steps=1"]
    cmd += ["rollout.num_steps=4", "logging.progress=false", "logging.tensorboard=false", *extra]
    return subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("override", "key"), [("method.objective=draft_lv", "method.objective"), ("optim.lora_rank=4", "optim.lora_rank")]
)
def test_resume_with_incompatible_settings_is_refused_naming_both(override, key, tiny_flux_dir, tmp_path, capsys):
    """Class 4: a checkpoint records what its shards depend on (before: KeyError, state-dict traceback, or on)."""
    out = tmp_path / "run"
    first = _train(tiny_flux_dir, tmp_path, out, "checkpoint.export=false")
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in out.rglob("*"))
    argv = ["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}", f"model.path={tiny_flux_dir}"]
    argv += ["rewards.0.name=tiny_color", "optim.max_steps=2", "rollout.num_steps=4", override]
    code = train_cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err[-3:]
    assert f"{key}=" in err[0] and err[0].count(key) >= 2, err[0]  # both values named
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched


@pytest.mark.parametrize("marker", [True, False], ids=["marked incomplete", "older run without a marker"])
def test_a_folder_left_before_the_first_checkpoint_is_not_appended_to(marker, tiny_flux_dir, tmp_path):
    """Class 6: logs and images of a run that stopped before its first checkpoint are discarded, not appended to
    (before: a rerun appended its metrics after the dead run's rows)."""
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / "images" / "start.png").write_bytes(b"stale")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 123.0}\n')
    if marker:
        (out / "INCOMPLETE").write_text("")
    result = _train(tiny_flux_dir, tmp_path, out, "checkpoint.export=false")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] != 123.0
    assert (out / "images" / "start.png").read_bytes() != b"stale"
    assert not (out / "INCOMPLETE").exists()  # the run's checkpoint made the folder trustworthy
    assert "stopped before its first checkpoint" in result.stderr


def test_cpu_adam_that_cannot_build_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    # Offloaded optimizer states step with DeepSpeedCPUAdam unless torch_adam is true; a machine where its op cannot
    # build used to fail inside deepspeed.initialize, after every model had loaded.
    from deepspeed.ops.op_builder import CPUAdamBuilder

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'cpu_adam'")

    monkeypatch.setattr(CPUAdamBuilder, "load", fail)
    ds = _with(lambda d: d["zero_optimization"].update(offload_optimizer={"device": "cpu"}))
    ds["optimizer"]["params"]["torch_adam"] = False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    out = tmp_path / "run"
    _one_line_exit_2(capsys, ["--deepspeed", str(path), f"output_dir={out}"], "set optimizer.params.torch_adam", out)
