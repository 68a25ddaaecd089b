"""The bad-input matrix: each case exits non-zero with one line naming the input and the fix, before any work,
leaving no run folder behind."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))

import train as train_cli  # noqa: E402

GOOD_DS = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 1e-4, "torch_adam": True}},
    "zero_optimization": {"stage": 3},
}


def good_ds(tmp_path: Path) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(GOOD_DS))
    return path


def case_args(name: str, tmp_path: Path, flux_dir: Path, sd3_dir: Path) -> tuple[list[str], str]:
    """(extra arguments, text the error line must contain) for each bad input."""
    ds = good_ds(tmp_path)
    if name == "missing model folder":
        return ["--deepspeed", str(ds), f"model.path={tmp_path / 'nope'}"], "model.path"
    if name == "partial model folder":
        partial = Path(shutil.copytree(flux_dir, tmp_path / "partial"))
        for weights in (partial / "transformer").glob("*.safetensors"):
            weights.unlink()
        return ["--deepspeed", str(ds), f"model.path={partial}"], "transformer"
    if name == "wrong model type":
        return ["--deepspeed", str(ds), f"model.path={sd3_dir}"], "StableDiffusion3Pipeline"
    if name == "invalid deepspeed json":
        bad = tmp_path / "bad.json"
        bad.write_text('{"train_micro_batch_size_per_gpu": 2,,}')
        return ["--deepspeed", str(bad)], "invalid JSON at line 1"
    if name == "missing deepspeed json":
        return ["--deepspeed", str(tmp_path / "none.json")], "cannot read it"
    if name == "batch arithmetic":
        bad = tmp_path / "batch.json"
        bad.write_text(
            json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1})
        )
        return ["--deepspeed", str(bad)], "train_batch_size"
    if name == "alpha outside [0, 1]":
        return ["--deepspeed", str(ds), "method.leapalign.alpha=-0.1"], "method.leapalign.alpha"
    if name == "tau <= 0":
        return ["--deepspeed", str(ds), "method.leapalign.tau=0"], "method.leapalign.tau"
    if name == "empty anchor range":
        return [
            "--deepspeed",
            str(ds),
            "method.leapalign.min_level=9",
            "method.leapalign.max_level=4",
        ], "method.leapalign.min_level"
    if name == "fewer grid steps than leaps":
        return ["--deepspeed", str(ds), "rollout.num_steps=2", "method.leapalign.n_leaps=3"], "method.leapalign.n_leaps"
    if name == "unknown objective":
        return ["--deepspeed", str(ds), "method.objective=dpo"], "method.objective"
    if name == "unknown reward":
        return ["--deepspeed", str(ds), "rewards.0.name=hpsv9"], "rewards.0.name"
    if name == "empty prompt file":
        empty = tmp_path / "prompts.txt"
        empty.write_text("\n  \n")
        return ["--deepspeed", str(ds), f"data.prompts={empty}"], "holds no prompts"
    if name == "unreadable prompt file":
        binary = tmp_path / "prompts.bin"
        binary.write_bytes(b"\xff\xfe\xfa\x00\x81")
        return ["--deepspeed", str(ds), f"data.prompts={binary}"], "cannot be read"
    if name == "output dir not writable":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        return ["--deepspeed", str(ds), f"output_dir={blocker / 'run'}"], "output_dir"
    raise AssertionError(name)


CASES = [
    "missing model folder",
    "partial model folder",
    "wrong model type",
    "invalid deepspeed json",
    "missing deepspeed json",
    "batch arithmetic",
    "alpha outside [0, 1]",
    "tau <= 0",
    "empty anchor range",
    "fewer grid steps than leaps",
    "unknown objective",
    "unknown reward",
    "empty prompt file",
    "unreadable prompt file",
    "output dir not writable",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_one_line_nonzero_nothing_written(name, tmp_path, capsys, tiny_flux_dir, tiny_sd3_dir):
    args, expected = case_args(name, tmp_path, Path(tiny_flux_dir), Path(tiny_sd3_dir))
    out = tmp_path / "run"
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={out}")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)
    code = train_cli.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    assert not out.exists()


def test_resume_from_a_different_world_size_is_refused(tmp_path, capsys, tiny_flux_dir):
    out = tmp_path / "run"
    step = out / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 2}))
    code = train_cli.main(["--deepspeed", str(good_ds(tmp_path)), f"output_dir={out}", f"model.path={tiny_flux_dir}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1
    assert "written by 2 rank(s) but this run has 1" in err[0] and "ds_to_universal" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing added


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_missing_or_corrupt_reward_checkpoint(problem, tmp_path, capsys, tiny_flux_dir):
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    if problem == "corrupt":
        checkpoint.write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    out = tmp_path / "run"
    code = train_cli.main(
        [
            "--deepspeed",
            str(good_ds(tmp_path)),
            f"output_dir={out}",
            f"model.path={tiny_flux_dir}",
            "rewards.0.name=hpsv21",
            f"rewards.0.path={checkpoint}",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err[-1].startswith("error: ") and ("rewards.0.path" in err[-1] or "HPS_v2.1_compressed.pt" in err[-1])
    assert not out.exists()
