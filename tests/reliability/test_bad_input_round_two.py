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

from tests.reliability.test_bad_input import GOOD_DS, good_ds, train_cli


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
    assert code == 2, err[-3:]
    assert err[-1].startswith("error: ") and needle in err[-1] and str(model) in err[-1], err[-1]


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
