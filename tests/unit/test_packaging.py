"""Packaging and provenance: what the engine reads ships with it, no machine paths in committed files, and the
dependency floors in setup.py are the ones the README says were tested (and that this environment satisfies)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def setup_floors() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = next(k.value for k in call.keywords if k.arg == "install_requires")
    floors = {}
    for item in ast.literal_eval(requires):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", item)
        if match:
            floors[match[1]] = match[2]
    return floors


def readme_floors() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Dependency floors, as tested", 1)[1]
    return {m[1]: m[2] for m in re.finditer(r"^\| ([A-Za-z0-9_.-]+) \| ([0-9.]+) \|", section, re.MULTILINE)}


def test_setup_floors_are_the_tested_ones_and_hold_here():
    floors = setup_floors()
    assert floors == readme_floors(), "setup.py floors and the README's tested-floor table disagree"
    for package, floor in floors.items():
        installed = Version(version(package))
        assert installed >= Version(floor), f"{package} {installed} is below its floor {floor}"


@pytest.mark.slow
def test_wheel_ships_what_the_engine_reads(tmp_path):
    """A non-editable install must carry the planner's calibration and the embedded world's assets."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "engine/calibration.json" in names
    assets = [p.relative_to(REPO).as_posix() for p in (REPO / "engine/world/assets").rglob("*") if p.is_file()]
    assert assets and not [a for a in assets if a not in names]


def test_planner_refuses_a_missing_calibration(tmp_path):
    from engine.memory import CALIBRATION_FILE, load_calibration

    assert CALIBRATION_FILE.parent == REPO / "engine" and CALIBRATION_FILE.is_file()
    assert load_calibration().source != ""
    with pytest.raises(FileNotFoundError, match="calibration"):
        load_calibration(tmp_path / "missing.json")


def _values(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _values(value)
    elif isinstance(node, list):
        for value in node:
            yield from _values(value)
    else:
        yield node


def test_no_committed_config_names_a_machine_path():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    configs = [REPO / f for f in tracked.split() if f.endswith(".json") and not f.endswith(("tokenizer.json",))]
    assert configs
    offending = []
    for path in configs:
        if path.suffix != ".json" or path.stat().st_size > 5_000_000:
            continue
        for value in _values(json.loads(path.read_text())):
            if isinstance(value, str) and len(value) > 1 and Path(value).is_absolute():
                offending.append(f"{path.relative_to(REPO)}: {value}")
    assert not offending, offending


def test_strip_machine_paths(tmp_path):
    from engine.models.loading import strip_machine_paths

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path), "a": 1}))
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "org/model", "a": 2}))
    strip_machine_paths(tmp_path)
    assert json.loads((tmp_path / "sub" / "config.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "config.json").read_text())["_name_or_path"] == "org/model"  # a hub id is kept


def test_no_top_level_package_of_ours_shadows_an_installed_distribution():
    """Our import names are ours alone: transformers ≥ 5.25 depends on Hugging Face's ``kernels`` package, and a
    top-level ``kernels`` of ours shadowed it (transformers failed to import from the repo root) or was shadowed by
    it (the engine failed to import anywhere else)."""
    from importlib.metadata import packages_distributions

    from setuptools import find_packages

    ours = {name for name in find_packages(str(REPO), include=["*"]) if "." not in name and name != "tests"}
    # `python launch/x.py` and `python benchmarks/x.py` put that folder first on sys.path: its modules shadow too
    # (benchmarks/kernels.py did: transformers imported it as Hugging Face's `kernels`).
    ours |= {path.stem for folder in ("launch", "benchmarks") for path in (REPO / folder).glob("*.py")}
    installed = packages_distributions()
    clashes = {name: installed[name] for name in ours if set(installed.get(name, [])) - {"leapalign-engine"}}
    assert not clashes, f"names of ours that installed distributions also provide: {clashes}"


def test_transformers_and_the_kernels_import_side_by_side_from_the_repo_root():
    code = (
        "import leap_kernels, engine.leap, transformers.integrations.hub_kernels, diffusers\n"
        "from diffusers import AutoencoderKL\n"
        f"assert leap_kernels.__file__.startswith({str(REPO)!r}), leap_kernels.__file__\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
