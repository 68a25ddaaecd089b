"""``launch/evaluate.py``: the stand-alone evaluator on the embedded world, end to end, and its agreement with the
trainer's own evaluation of the same weights (the end grid of a run vs the run's export, same prompts, seeds, steps
and precision)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch.evaluate import main
from tests.distributed.test_zero3_two_ranks import run

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_evaluate_the_world_end_to_end(tmp_path):
    out = tmp_path / "eval"
    assert main(["--per-category", "2", "--steps", "4", "--out", str(out)]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert len(record["prompts"]) == len(record["reward"]) == len(record["correct"]) == 12
    assert set(record["judge"]) == {"overall", "single_object", "two_object", "counting", "colors", "position",
                                    "color_attr"}  # fmt: skip
    assert set(record["reward_per_category"]) == set(record["judge"]) - {"overall"}
    assert (record["num_steps"], record["rollout_dtype"], record["seeds"][:3]) == (4, "bf16", [0, 1, 2])
    assert len(list((out / "images").glob("*.png"))) == 12 and (out / "grid.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--transformer", "/nonexistent/transformer"], "--transformer /nonexistent/transformer does not exist"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["--reward", "hps"], "--reward hps: unknown; choose one of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "eval"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not out.exists()


def test_training_time_and_stand_alone_evaluation_agree(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["optim.max_steps=1", "rollout.num_steps=4", "logging.progress=false", "logging.tensorboard=false",
                 f"output_dir={run_dir}", "data.eval_per_category=8"]  # fmt: skip
    run([sys.executable, "launch/train.py", "--deepspeed", str(REPO / "configs" / "zero3.json"), *overrides])
    trained = json.loads((run_dir / "images" / "end.json").read_text())
    out = tmp_path / "eval"
    # The trainer's evaluation: the world's held-out split, 8 per category, seeds 0.., bf16 rollout, the trained
    # (bf16, ZeRO-3) weights; here the same prompts and settings on the exported weights.
    argv = ["--transformer", str(run_dir / "export" / "transformer"), "--per-category", "8", "--steps", "4"]
    assert main([*argv, "--precision", "bf16", "--out", str(out)]) == 0
    alone = json.loads((out / "evaluation.json").read_text())
    assert alone["prompts"] == trained["prompts"] and alone["seeds"] == trained["seeds"]
    assert alone["weights_dtype"] == "bfloat16"
    differences = [abs(a - b) for a, b in zip(alone["reward"], trained["reward"], strict=True)]
    assert max(differences) < 1e-3, max(differences)
    assert alone["judge"] == trained["judge"]


def test_a_lora_export_evaluates_as_the_trainer_evaluated_it(tmp_path):
    """``--lora export/lora``: the adapters load (from safetensors, offline) and score what the trainer's end grid
    scored. The LoRA run's lr is high enough that one step moves the images: the base model does not agree."""
    run_dir = tmp_path / "run"
    config = json.loads((REPO / "configs" / "zero3.json").read_text())
    config["optimizer"]["params"]["lr"] = 3e-2
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config))
    overrides = ["optim.max_steps=1", "optim.lora_rank=4", "rollout.num_steps=4", "logging.progress=false",
                 "logging.tensorboard=false", f"output_dir={run_dir}", "data.eval_per_category=8"]  # fmt: skip
    run([sys.executable, "launch/train.py", "--deepspeed", str(ds), *overrides])
    trained = json.loads((run_dir / "images" / "end.json").read_text())
    found = {}
    # The run held its frozen base weights in bf16 (model.frozen_dtype) and trained bf16 adapters: so does this.
    for name, extra in (("lora", ["--lora", str(run_dir / "export" / "lora")]), ("base", [])):
        argv = [*extra, "--per-category", "8", "--steps", "4", "--precision", "bf16", "--weights-dtype", "bf16"]
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
        found[name] = json.loads((tmp_path / name / "evaluation.json").read_text())["reward"]
    lora = max(abs(a - b) for a, b in zip(found["lora"], trained["reward"], strict=True))
    base = max(abs(a - b) for a, b in zip(found["base"], trained["reward"], strict=True))
    assert lora < 1e-3 < base, (lora, base)


def test_a_lora_folder_without_weights_is_one_line(tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    assert main(["--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --lora {tmp_path / 'lora'} holds no LoRA weights") and "\n" not in err
