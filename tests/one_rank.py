"""Run a function in a child process that holds a one-rank gloo process group, and return what it returns.

For tests of code that needs ``torch.distributed`` (checkpoints, ``zero.Init``) without giving the test process a
process group that would outlive the test. ``target(*args)`` must be a module-level function (spawn pickles it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket


def _child(target, args, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        queue.put(target(*args))
    finally:
        dist.destroy_process_group()


def run_in_one_rank(target, *args, timeout: float = 120):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(target, args, port, queue))
    process.start()
    try:
        result = queue.get(timeout=timeout)
    finally:
        process.join(timeout=60)
    assert process.exitcode == 0, f"the one-rank child exited with {process.exitcode}"
    return result
