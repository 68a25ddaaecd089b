"""Offline and safe loading: a training step runs with the network blocked; no unsafe loading in library code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Any connection or name lookup that is not loopback raises: a hub call would fail the run.
CHILD = """
import socket, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {launch!r})
LOCAL = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(address, tuple) and host not in LOCAL:
        raise OSError(f"network blocked by the test: connect to {{address}}")
    return real_connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL and host is not None:
        raise OSError(f"network blocked by the test: lookup of {{host}}")
    return real_getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_training_step_runs_with_the_network_blocked(tmp_path):
    """The embedded default from nothing (model built locally), one step, with every outside socket refused."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)  # not relying on the offline flags: the code itself must not reach out
    child = CHILD.format(repo=str(REPO), launch=str(REPO / "launch"))
    args = [
        "--deepspeed",
        str(REPO / "configs" / "zero3.json"),
        f"output_dir={tmp_path / 'run'}",
        "optim.max_steps=1",
        "rollout.num_steps=4",
        "logging.progress=false",
    ]
    result = subprocess.run([sys.executable, "-c", child, *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def library_sources():
    for folder in ("engine", "leap_kernels", "launch"):
        yield from (REPO / folder).rglob("*.py")


def test_no_unsafe_loading_in_library_code():
    for path in library_sources():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\\.load\\(([^)]*)\\)", text):
            assert "weights_only=True" in match.group(1), f"{path}: torch.load without weights_only=True"
        assert not re.search(r"trust_remote_code\\s*=\\s*True", text), f"{path}: trust_remote_code=True"
        assert not re.search(r"hf_hub_download|snapshot_download|urlopen|requests\\.get", text), f"{path}: network"
