"""The typed config tree, its loader and the DeepSpeed JSON resolver (fast: no model, no process group)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import (
    ConfigError,
    MethodConfig,
    ModelConfig,
    RewardConfig,
    TrainConfig,
    config_help,
    config_to_dict,
    deepspeed_precision,
    load_config,
    resolve_deepspeed_config,
    save_config,
)
from engine.objectives import LeapAlignConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
JSON_FILES = sorted(CONFIGS.glob("*.json"))
YAML_FILES = sorted(CONFIGS.glob("*.yaml"))


def _raises(fn, *args, **kwargs) -> str:
    """Call ``fn`` expecting a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"multi-line message: {message!r}"
    return message


def _write_json(tmp_path: Path, ds: dict | str, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(ds if isinstance(ds, str) else json.dumps(ds))
    return str(path)


BASE_DS = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "train_batch_size": "auto",
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 1e-4, "torch_adam": True}},
    "zero_optimization": {"stage": 3},
}


# ---------------------------------------------------------------------------------------------------------------------
# Defaults, YAML, overrides
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_are_valid_and_match_the_brief():
    cfg = TrainConfig()
    assert cfg == load_config(None, [])
    assert (cfg.model.kind, cfg.model.path, cfg.model.height, cfg.model.width) == ("flux", None, 32, 32)
    assert [r.name for r in cfg.rewards] == ["world_clip"]
    assert (
        cfg.method.objective,
        cfg.method.leapalign.n_leaps,
        cfg.method.leapalign.alpha,
        cfg.method.leapalign.tau,
    ) == ("leapalign", 2, None, 0.1)
    assert cfg.rollout.num_steps == 25 and cfg.optim.max_steps == 40 and cfg.optim.ema_decay == 0.995
    assert cfg.optim.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    # Mutable defaults are per instance.
    other = TrainConfig()
    other.optim.lora_targets.append("proj")
    other.rewards.append(RewardConfig(name="x"))
    assert TrainConfig().optim.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"] and len(TrainConfig().rewards) == 1


def test_every_field_has_one_line_help():
    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{cls.__name__}.{f.name} needs a one-line help"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(TrainConfig)
    walk(RewardConfig)
    text = config_help()
    assert "method.leapalign.alpha (float or null, default None):" in text and "rewards.N.lam" in text


def test_default_yaml_is_the_dataclass_defaults():
    assert load_config(str(CONFIGS / "default.yaml"), []) == TrainConfig()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_shipped_yaml_loads(path):
    cfg = load_config(str(path), [])
    assert isinstance(cfg, TrainConfig)


def test_paper_yaml_values():
    flux = load_config(str(CONFIGS / "flux_hpsv21.yaml"), [])
    assert (flux.model.kind, flux.model.height, flux.model.width, flux.model.guidance_scale) == ("flux", 720, 720, 3.5)
    assert (flux.method.leapalign.alpha, flux.method.leapalign.tau, flux.rewards[0].name, flux.rewards[0].lam) == (
        0.3,
        0.1,
        "hpsv21",
        0.55,
    )
    assert (flux.rollout.num_steps, flux.rollout.eval_num_steps, flux.optim.max_steps) == (25, 50, 300)
    assert flux.optim.ema_decay == 0.995
    sd3 = load_config(str(CONFIGS / "sd35m_pickscore.yaml"), [])
    assert (sd3.model.kind, sd3.method.leapalign.alpha, sd3.rewards[0].name, sd3.rewards[0].lam) == (
        "sd3",
        0.1,
        "pickscore",
        0.4,
    )


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "output_dir: runs/a\nmethod: {leapalign: {alpha: 0.3, n_leaps: 3}}\nrewards:\n  - {name: hpsv21, lam: 0.55}\n"
        "optim: {lora_rank: 8}\n"
    )
    cfg = load_config(
        str(path),
        [
            "method.leapalign.alpha=0.1",  # override beats YAML
            "output_dir=runs/x",
            "rewards.0.name=pickscore",  # list index
            "rewards.1.name=hpsv3",  # index len(list) appends a default entry
            "rewards.1.weight=2",  # int widened to float
            "method.leapalign.tau=1e-3",  # YAML 1.1 reads this as a string; float fields accept it
            "optim.lora_targets=[to_q, to_v]",  # YAML flow list
            "optim.lora_alpha=16",
            "rollout.eval_num_steps=null",
            "model.negative_prompt=blurry, low quality",
            "data.prompts=2024",  # a string field keeps the text as written
        ],
    )
    assert cfg.output_dir == "runs/x"
    assert (cfg.method.leapalign.alpha, cfg.method.leapalign.n_leaps, cfg.method.leapalign.tau) == (0.1, 3, 0.001)
    assert [(r.name, r.lam, r.weight) for r in cfg.rewards] == [("pickscore", 0.55, 1.0), ("hpsv3", None, 2.0)]
    assert isinstance(cfg.rewards[1].weight, float)
    assert cfg.optim.lora_targets == ["to_q", "to_v"] and cfg.optim.lora_alpha == 16.0
    assert cfg.rollout.eval_num_steps is None
    assert cfg.model.negative_prompt == "blurry, low quality"
    assert cfg.data.prompts == "2024"


def test_whole_section_and_list_overrides():
    cfg = load_config(
        None, ["method={objective: refl, refl: {last_steps: 5}}", "rewards=[{name: a}, {name: b, lam: 1}]"]
    )
    assert cfg.method.objective == "refl" and cfg.method.refl.last_steps == 5 and cfg.method.leapalign.n_leaps == 2
    assert [(r.name, r.lam) for r in cfg.rewards] == [("a", None), ("b", 1.0)]


def test_save_config_round_trips(tmp_path):
    cfg = load_config(
        str(CONFIGS / "flux_hpsv21.yaml"),
        ["rewards.1.name=pickscore", "rewards.1.weight=0.5", "method.leapalign.fixed_distance=3", "optim.lora_rank=4"],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(str(path), []) == cfg
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)
    assert config_to_dict(cfg)["rewards"][1] == {"name": "pickscore", "path": None, "lam": None, "weight": 0.5}


def test_validate_names():
    load_config(None, ["rewards.1.name=pickscore"]).validate_names({"world_clip", "pickscore", "hpsv21"})
    cfg = load_config(None, ["rewards.1.name=pickscor"])
    message = _raises(cfg.validate_names, {"world_clip", "hpsv21"})
    assert message == "rewards.1.name='pickscor' is unknown; choose one of hpsv21, world_clip"
    message = _raises(cfg.validate_names, {"world_clip", "pickscore"})
    assert "is unknown (did you mean 'pickscore'?)" in message


def test_check_paths(tmp_path):
    TrainConfig().check_paths()  # the embedded default reads no path
    message = _raises(load_config(str(CONFIGS / "flux_hpsv21.yaml"), []).check_paths)
    assert message.startswith("model.path='/path/to/FLUX.1-dev' does not exist")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    load_config(None, [f"model.path={tmp_path}", f"data.prompts={prompts}"]).check_paths()
    message = _raises(load_config(None, [f"model.path={prompts}"]).check_paths)
    assert "is not a folder" in message


# ---------------------------------------------------------------------------------------------------------------------
# Bad values: one-line errors that name the field
# ---------------------------------------------------------------------------------------------------------------------

BAD_OVERRIDES = [
    (
        ["method.leapalign.alpha=1.5"],
        "method.leapalign.alpha=1.5 must lie in [0, 1] (paper: 0.3 HPSv2.1, 0.1 PickScore/HPSv3)",
    ),
    (["method.leapalign.tau=0"], "method.leapalign.tau=0.0 must be > 0"),
    (
        ["method.leapalign.min_level=10", "method.leapalign.max_level=5"],
        "method.leapalign.min_level=10 leaves the anchor range [10, 5] empty",
    ),
    (["method.leapalign.min_level=26"], "method.leapalign.min_level=26 leaves the anchor range [26, 25] empty"),
    (
        ["rollout.num_steps=2", "method.leapalign.n_leaps=3"],
        "method.leapalign.n_leaps=3: 3 leaps need 3 grid levels but [1, 2] has 2",
    ),
    (["method.leapalign.n_leaps=4"], "method.leapalign.n_leaps=4 must be 1, 2 or 3"),
    (["method.leapalign.max_level=30"], "method.leapalign.max_level=30 exceeds rollout.num_steps=25"),
    (
        ["method.leapalign.fixed_distance=25"],
        "method.leapalign.fixed_distance=25 does not fit 2 anchors in [1, 25]; use 1 <= fixed_distance <= 24",
    ),
    (
        ["method.leapalign.n_leaps=1", "method.leapalign.fixed_distance=2"],
        "method.leapalign.fixed_distance=2 spaces consecutive anchors; it needs",
    ),
    (["method.objective=grpo"], "method.objective='grpo' is not a valid choice; choose one of 'leapalign'"),
    (["method.alpah=0.1"], "unknown config key 'method.alpah'; did you mean 'method.leapalign.alpha'?"),
    (["method.n_leaps=3"], "config key 'method.n_leaps' moved to 'method.leapalign.n_leaps'"),
    (["method.refl_last_steps=3"], "config key 'method.refl_last_steps' moved to 'method.refl.last_steps'"),
    (
        ["method.drtune_stop_fraction=0.5"],
        "config key 'method.drtune_stop_fraction' moved to 'method.drtune.stop_fraction'",
    ),
    (["alpha=0.1"], "unknown config key 'alpha'; did you mean 'method.leapalign.alpha'?"),
    (["modle.kind=sd3"], "unknown config key 'modle'; did you mean 'model'?"),
    (["method.leapalign.n_leaps=two"], "method.leapalign.n_leaps='two' has type str; expected int"),
    (["method.leapalign.similarity_weight=1"], "method.leapalign.similarity_weight=1 has type int; expected bool"),
    (["optim.seed=1.5"], "optim.seed=1.5 has type float; expected int"),
    (["method=3"], "method=3 has type int; expected a mapping of MethodConfig fields"),
    (["rewards.0.lam=.nan"], "rewards.0.lam=nan must be a finite number"),
    (["rewards.0.weight=0"], "rewards.0.weight=0.0 must be > 0"),
    (["rewards.2.name=x"], "override key 'rewards.2': '2' is not an index of rewards"),
    (["rewards=[]"], "rewards=[] is empty"),
    (["rewards.1.name=world_clip"], "rewards.1.name='world_clip' repeats rewards.0"),
    (["model.height=30"], "model.height=30 must be a positive multiple of 16; use e.g. 32"),
    (["model.kind=sdxl"], "model.kind='sdxl' is not a valid choice"),
    (["optim.ema_decay=1.0"], "optim.ema_decay=1.0 must lie in (0, 1)"),
    (["optim.lora_alpha=16"], "optim.lora_alpha=16.0 needs optim.lora_rank > 0"),
    (
        ["method.leapalign.pairs_per_rollout=2", "method.leapalign.decouple_reward=false"],
        "method.leapalign.pairs_per_rollout=2 > 1 reuses",
    ),
    (["method.drtune.stop_fraction=0"], "method.drtune.stop_fraction=0.0 must lie in (0, 1]"),
    (["method.objective=refl", "method.refl.last_steps=30"], "method.refl.last_steps=30 exceeds rollout.num_steps=25"),
    (
        ["method.objective=full_backprop", "method.full_backprop.truncate_steps=26"],
        "method.full_backprop.truncate_steps=26 exceeds rollout",
    ),
    (["method.objective=drtune", "rollout.num_steps=1"], "method.drtune.train_steps=2 exceeds rollout.num_steps=1"),
    (["rollout.num_steps=0"], "rollout.num_steps=0 must be >= 1"),
    (["checkpoint.resume="], "checkpoint.resume=None has type NoneType; expected str"),
    (["method.leapalign.alpha.x=1"], "method.leapalign.alpha=None is a value, not a section"),
    (["noequals"], "override 'noequals' is not key=value"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_OVERRIDES, ids=lambda v: v[0] if isinstance(v, list) else "")
def test_bad_value_gives_one_line_error(overrides, expected):
    message = _raises(load_config, None, overrides)
    assert message.startswith(expected), message


def test_other_objectives_ignore_leap_range():
    # LeapAlign's anchor checks apply only when LeapAlign is the objective.
    cfg = load_config(None, ["method.objective=refl", "rollout.num_steps=1", "method.refl.last_steps=1"])
    assert cfg.method.leapalign.n_leaps == 2


def test_direct_construction_is_checked():
    assert _raises(LeapAlignConfig, alpha=2.0).startswith("method.leapalign.alpha=2.0 must lie in [0, 1]")
    assert _raises(ModelConfig, width=0).startswith("model.width=0 must be a positive multiple of 16")
    assert _raises(RewardConfig, lam="high").startswith("reward.lam='high' has type str")
    assert _raises(TrainConfig, rewards=[]).startswith("rewards=[] is empty")
    method = MethodConfig(leapalign=LeapAlignConfig(max_level=40))
    assert _raises(TrainConfig, method=method).startswith("method.leapalign.max_level=40 exceeds rollout.num_steps=25")


BAD_YAML = [
    ("method:\n  alhpa: 0.3\n", "unknown config key 'method.alhpa'; did you mean 'method.leapalign.alpha'?"),
    ("method:\n  alpha: 0.3\n", "config key 'method.alpha' moved to 'method.leapalign.alpha'"),
    ("rewards:\n  - {name: a, lamda: 0.3}\n", "unknown config key 'rewards.0.lamda'; did you mean 'rewards.0.lam'?"),
    ("rewards:\n  - {name: a, lam: -.inf}\n", "rewards.0.lam=-inf must be a finite number"),
    ("rewards: {name: a}\n", "rewards={'name': 'a'} has type dict; expected a list of"),
    ("model:\n  height: big\n", "model.height='big' has type str; expected int"),
    ("- a\n- b\n", "config file {path}: expected a mapping at the top, got list"),
    ("model: [1\n", "config file {path}: invalid YAML at line 2 column 1"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_YAML)
def test_bad_yaml_gives_one_line_error(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    message = _raises(load_config, str(path), [])
    assert message.startswith(expected.replace("{path}", str(path))), message


def test_missing_yaml(tmp_path):
    message = _raises(load_config, str(tmp_path / "nope.yaml"), [])
    assert message.startswith(f"config file {tmp_path / 'nope.yaml'}: cannot read it")


def test_empty_yaml_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(str(path), []) == TrainConfig()
    path.write_text("method:\n  # alpha: 0.3\n")  # an empty section keeps its defaults
    assert load_config(str(path), []) == TrainConfig()


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.name)
def test_shipped_json_resolves_and_deepspeed_accepts_it(path, world_size, monkeypatch):
    import deepspeed.runtime.config as ds_config

    before = path.read_text()
    ds = resolve_deepspeed_config(str(path), world_size)
    assert path.read_text() == before  # the file is never rewritten
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    assert micro * accum * world_size == ds["train_batch_size"]
    assert deepspeed_precision(ds) == torch.bfloat16
    assert ds["zero_optimization"]["memory_efficient_linear"] is False

    # DeepSpeed's own parser and sanity checks (batch arithmetic, precision, ZeRO schema) for `world_size` ranks,
    # without a process group: it asks `dist.get_rank()` and the mpu for the data-parallel size.
    class DataParallel:
        def get_data_parallel_world_size(self):
            return world_size

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *args, **kwargs: 0)
    parsed = ds_config.DeepSpeedConfig(copy.deepcopy(ds), mpu=DataParallel())
    assert parsed.world_size == world_size
    assert parsed.train_batch_size == ds["train_batch_size"]
    assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]


def test_paper_batch_in_offload_json():
    # Global batch 64 (the paper's), accumulation derived from the world size.
    assert resolve_deepspeed_config(str(CONFIGS / "zero3_offload.json"), 16)["gradient_accumulation_steps"] == 1
    assert resolve_deepspeed_config(str(CONFIGS / "zero3_offload.json"), 8)["gradient_accumulation_steps"] == 2
    assert resolve_deepspeed_config(str(CONFIGS / "zero3_offload.json"), 8)["train_batch_size"] == 64


@pytest.mark.parametrize(
    ("batch", "world_size", "expected"),
    [
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": "auto"}, 2, 12),
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto", "train_batch_size": 16}, 2, 16),
        ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, "train_batch_size": 16}, 2, 16),
        (
            {"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"},
            4,
            8,
        ),
        ({"train_micro_batch_size_per_gpu": 3}, 2, 6),
    ],
)
def test_batch_auto_is_filled(tmp_path, batch, world_size, expected):
    ds = {k: v for k, v in BASE_DS.items() if k not in batch and not k.startswith("train") and "accumulation" not in k}
    ds.update(batch)
    resolved = resolve_deepspeed_config(_write_json(tmp_path, ds), world_size)
    micro, accum = resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"]
    assert resolved["train_batch_size"] == expected == micro * accum * world_size
    assert all(isinstance(resolved[k], int) for k in ("train_batch_size", "train_micro_batch_size_per_gpu"))


def test_gradient_clipping_auto(tmp_path):
    ds = dict(BASE_DS, gradient_clipping="auto")
    assert resolve_deepspeed_config(_write_json(tmp_path, ds), 1)["gradient_clipping"] == 1.0


BAD_JSON = [
    (
        dict(BASE_DS, train_batch_size=10),
        2,
        "train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size = 2 × 1 × 2 = 4 != "
        'train_batch_size=10; set train_batch_size to 4 or "auto"',
    ),
    (dict(BASE_DS, train_batch_size=10, gradient_accumulation_steps="auto"), 4, "train_batch_size=10 is not divisible"),
    (dict(BASE_DS, train_micro_batch_size_per_gpu=0), 1, "train_micro_batch_size_per_gpu=0 must be a positive"),
    (dict(BASE_DS, train_micro_batch_size_per_gpu="auto"), 1, "give train_micro_batch_size_per_gpu or train_batch"),
    (dict(BASE_DS, fp16={"enabled": True}), 1, "bf16 and fp16 are both enabled; enable at most one"),
    (dict(BASE_DS, bf16={"enabled": "auto"}), 1, 'bf16.enabled is "auto"; set it to true or false'),
    (
        dict(BASE_DS, optimizer={"type": "AdamW", "params": {"lr": "auto"}}),
        1,
        'optimizer.params.lr is "auto" but it is a training hyper-parameter; set it',
    ),
    (dict(BASE_DS, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}), 1, "scheduler.params"),
    (dict(BASE_DS, steps_per_print="auto"), 1, 'steps_per_print is "auto", which nothing resolves'),
    (dict(BASE_DS, zero_optimization={"stage": 3, "stage3_bogus": 1}), 1, "zero_optimization.stage3_bogus: Extra"),
    ('{\n  "train_batch_size": 2,\n  "bf16": {enabled: true}\n}', 1, "invalid JSON at line 3 column 12"),
    ("[1, 2]", 1, "expected a JSON object at the top, got list"),
]


@pytest.mark.parametrize(("ds", "world_size", "expected"), BAD_JSON)
def test_bad_json_gives_one_line_error(tmp_path, ds, world_size, expected):
    path = _write_json(tmp_path, ds)
    message = _raises(resolve_deepspeed_config, path, world_size)
    assert message.startswith(f"deepspeed config {path}: "), message
    assert expected in message, message


@pytest.mark.parametrize("zero", [None, {"stage": 3}, {"stage": 2}, {"stage": 3, "memory_efficient_linear": False}])
def test_memory_efficient_linear_is_off_when_not_given(tmp_path, zero):
    # DeepSpeed's default (true) makes zero.Init replace torch.nn.functional.linear for the whole process, the
    # frozen reward models and the VAE included, and never put it back.
    ds = {k: v for k, v in BASE_DS.items() if k != "zero_optimization"}
    if zero is not None:
        ds["zero_optimization"] = zero
    resolved = resolve_deepspeed_config(_write_json(tmp_path, ds), 1)
    assert resolved["zero_optimization"]["memory_efficient_linear"] is False


ZERO_INIT_PROBE = """
import os, sys, torch, deepspeed
from engine.config import resolve_deepspeed_config
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
deepspeed.init_distributed("gloo")
linear = torch.nn.functional.linear
with deepspeed.zero.Init(config_dict_or_path=resolve_deepspeed_config(sys.argv[1], 1)):
    torch.nn.Linear(4, 4)
print(torch.nn.functional.linear is linear)
"""


def test_zero_init_with_a_resolved_config_keeps_torch_linear(tmp_path):
    # A user JSON without the key (DeepSpeed's default would replace torch's linear for the rest of the process).
    import subprocess
    import sys

    from tests.distributed.test_zero3_two_ranks import free_port

    ds = {k: v for k, v in BASE_DS.items() if k != "zero_optimization"} | {"zero_optimization": {"stage": 3}}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-c", ZERO_INIT_PROBE, _write_json(tmp_path, ds), str(free_port())],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True", done.stdout


def test_memory_efficient_linear_true_is_refused(tmp_path):
    path = _write_json(tmp_path, dict(BASE_DS, zero_optimization={"stage": 3, "memory_efficient_linear": True}))
    message = _raises(resolve_deepspeed_config, path, 1)
    assert message.startswith(f"deepspeed config {path}: zero_optimization.memory_efficient_linear"), message
    assert "set it to false" in message, message


def test_missing_json(tmp_path):
    message = _raises(resolve_deepspeed_config, str(tmp_path / "nope.json"), 1)
    assert message.startswith(f"deepspeed config {tmp_path / 'nope.json'}: cannot read it")


def test_bad_world_size():
    assert _raises(resolve_deepspeed_config, str(JSON_FILES[0]), 0).startswith("world_size=0 must be")


@pytest.mark.parametrize(
    ("ds", "dtype"),
    [
        ({"bf16": {"enabled": True}}, torch.bfloat16),
        ({"bfloat16": {"enabled": True}}, torch.bfloat16),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": False}}, torch.float16),
        ({}, torch.float32),
        ({"fp16": {"enabled": False}}, torch.float32),
    ],
)
def test_deepspeed_precision(ds, dtype):
    assert deepspeed_precision(ds) == dtype


def test_deepspeed_precision_rejects_two():
    message = _raises(deepspeed_precision, {"bf16": {"enabled": True}, "fp16": {"enabled": True}})
    assert "bf16 and fp16 are both enabled" in message
