"""Several nodes: output_dir and the embedding store must be one folder that every rank sees (two gloo ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _rank(rank: int, port: int, folders: list[str], results) -> None:
    import torch.distributed as dist

    from engine.checkpoint import check_shared_folder

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        check_shared_folder(folders[rank], rank, 2)
        results[rank] = "ok"
    except ValueError as error:
        results[rank] = str(error)
    finally:
        dist.destroy_process_group()


def _run(folders: list[str]) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, folders, results), nprocs=2, join=True)
    return [results[0], results[1]]


def test_one_folder_passes_and_leaves_nothing(tmp_path):
    assert _run([str(tmp_path / "run"), str(tmp_path / "run")]) == ["ok", "ok"]
    assert list((tmp_path / "run").iterdir()) == []


def test_node_local_folders_are_refused_in_one_line_on_every_rank(tmp_path):
    # Two "nodes": each rank's path is a different local folder, as node-local disks would be.
    results = _run([str(tmp_path / "node0"), str(tmp_path / "node1")])
    for message in results:
        assert "ranks [1] cannot see" in message and "filesystem every node mounts" in message
        assert "\n" not in message
