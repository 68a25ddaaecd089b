"""The checkpoint module works on any named states and a DeepSpeed-like engine: it knows nothing of the Trainer
(torchtitan's CheckpointManager shape). Run in a one-rank gloo group in a child process, so this test process never
holds a process group."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.one_rank import run_in_one_rank


class Counter:
    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "tensor": torch.full((3,), float(self.value))}

    def load_state_dict(self, state: dict) -> None:
        assert torch.equal(state["tensor"], torch.full((3,), float(state["value"])))
        self.value = state["value"]


class FakeEngine:
    """What CheckpointManager asks of a DeepSpeed engine: its own shards saved and loaded under a tag."""

    def __init__(self):
        self.weights = 1.0

    def save_checkpoint(self, root, tag, save_latest):
        Path(root, tag).mkdir(parents=True, exist_ok=True)
        Path(root, tag, "engine.json").write_text(json.dumps({"weights": self.weights}))

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        self.weights = json.loads(Path(root, tag, "engine.json").read_text())["weights"]
        return str(Path(root, tag)), {}


def _run(run_dir: str):
    from engine import checkpoint as ckpt

    run = Path(run_dir)
    engine, a, b = FakeEngine(), Counter(3), Counter(7)
    manager = ckpt.CheckpointManager(run, engine, {"a": a, "b": b}, rank=0, world_size=1, keep_last=2,
                                     depends={"x": 1})  # fmt: skip
    manager.save(5)
    manager.save(9)
    manager.save(12)
    engine.weights, a.value, b.value = 0.0, 0, 0
    cfg = SimpleNamespace(output_dir=run_dir, checkpoint=SimpleNamespace(resume="auto"))
    found = ckpt.resolve_resume(cfg)
    manager.load(found)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    meta = json.loads((found / "COMPLETE").read_text())
    errors = []
    other = ckpt.CheckpointManager(run, engine, {"a": a, "c": Counter()}, rank=0, world_size=1, keep_last=2,
                                   depends={})  # fmt: skip
    for attempt in (lambda: other.load(found),
                    lambda: ckpt.CheckpointManager(run, engine, {}, rank=0, world_size=2, keep_last=1,
                                                   depends={}).load(found),
                    lambda: ckpt.resolve_resume(SimpleNamespace(output_dir=run_dir, checkpoint=SimpleNamespace(
                        resume=str(run / "nothing-here"))))):  # fmt: skip
        try:
            attempt()
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    return found.name, kept, meta, engine.weights, a.value, b.value, errors


def test_checkpoint_manager_saves_and_restores_named_states(tmp_path):
    found, kept, meta, weights, a, b, errors = run_in_one_rank(_run, str(tmp_path / "run"))
    assert found == "step_000012" and kept == ["step_000009", "step_000012"]  # keep_last
    assert meta == {"step": 12, "world_size": 1, "depends": {"x": 1}}
    assert (weights, a, b) == (1.0, 3, 7)  # the engine's shards and every state restored
    assert "holds no state for c" in errors[0]
    assert "written by 1 rank(s) but this run has 2" in errors[1]
    assert errors[2].startswith("checkpoint.resume=") and "holds no complete checkpoint" in errors[2]
    assert not (tmp_path / "run" / "INCOMPLETE").exists()


@pytest.mark.parametrize("module", ["engine/checkpoint.py"])
def test_checkpoint_module_never_mentions_the_trainer_class(module):
    text = (Path(__file__).resolve().parents[2] / module).read_text(encoding="utf-8")
    assert "engine.trainer" not in text and "Trainer" not in text.replace("Trainer.", "")
