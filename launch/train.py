"""Train a flow-matching text-to-image model on differentiable rewards with LeapAlign (or a baseline).

    deepspeed launch/train.py --deepspeed configs/zero3.json [--config configs/flux_hpsv21.yaml] [key=value ...]
    python launch/train.py --deepspeed configs/zero3.json            # one process, no launcher

``--deepspeed`` names the DeepSpeed JSON (ZeRO stage, precision, optimizer, batch): the only source of those
settings. ``--config`` and ``key=value`` overrides (``method.leapalign.alpha=0.1``, ``model.path=/models/FLUX.1-dev``)
set the rest. Each objective owns its settings, nested under ``method.<objective>`` (``method.objective=refl
method.refl.last_steps=11``). Bad input stops the run before any work with one line naming the input and the fix.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import ConfigError, config_help, load_config, resolve_deepspeed_config  # noqa: E402

logger = logging.getLogger("leapalign")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_help()
    )
    parser.add_argument("--deepspeed", required=True, metavar="PATH", help="DeepSpeed JSON (configs/zero3.json)")
    parser.add_argument("--config", metavar="YAML", help="run config; defaults = the embedded tiny model")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> None:
    """Join the launcher's process group, or make a one-process group when run with plain ``python``.

    Every collective waits at most ``timeout_s``: a rank that died or hangs makes the others fail, not wait forever.
    """
    from datetime import timedelta

    import deepspeed
    import torch

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def _is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return dist.is_initialized() and any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = load_config(args.config, args.overrides)
        ds_config = resolve_deepspeed_config(args.deepspeed, world_size)
        from engine.preflight import preflight

        preflight(cfg, world_size, ds_config)
    except (ConfigError, ValueError) as error:  # ModelFolderError and prompt-file errors are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2

    from engine.trainer import NonFiniteStop, Trainer

    init_distributed(cfg.collective_timeout_s)
    started = False  # OSErrors before training are unreadable inputs (exit 2), after it failed saves (exit 4)
    finished = False
    try:
        trainer = Trainer(cfg, ds_config)
        started = True
        trainer.train()
        finished = True
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteStop as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except RuntimeError as error:  # a collective failed: another rank died, or hung past collective_timeout_s
        if not _is_collective_failure(error):
            raise
        detail = str(error).strip().splitlines()[0][:200]
        print(
            f"error: rank {os.environ.get('RANK', '0')}: a collective failed — another rank died or stopped "
            f"responding (collective_timeout_s={cfg.collective_timeout_s}); check that rank's log, then rerun: "
            f"the run resumes from its last complete checkpoint ({detail})",
            file=sys.stderr,
        )
        return 5
    except OSError as error:  # e.g. the disk filled up while saving: the previous complete checkpoint is intact
        if not started and error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            print(
                f"error: cannot read {error.filename or 'an input'} ({error.strerror or error}); fix or replace "
                "that file and rerun",
                file=sys.stderr,
            )
            return 2
        print(
            f"error: {error.strerror or error} ({error.filename or 'while writing'}); free space or fix "
            "permissions, then rerun: the run resumes from its last complete checkpoint",
            file=sys.stderr,
        )
        return 4
    finally:
        trainer = None  # the DeepSpeed engine and its pending collective handles go before the group (see below)
        shut_down(finished)
    return 0


def shut_down(finished: bool) -> None:
    """Leave the process group so that no collective thread outlives the interpreter.

    After a finished run every rank waits at a barrier first: a rank that destroyed its group while another still
    exported could leave a gloo worker thread to be torn down at exit, which aborts the process ("terminate called
    without an active exception", exit 250) after the run had succeeded. A failed run skips the barrier: its peer
    may be dead.
    """
    import gc

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    gc.collect()  # free the engine's work objects (tensors holding Python references) while the interpreter lives
    if finished:
        dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    _remove_shared_memory_buffer(rank)


def _remove_shared_memory_buffer(rank: int) -> None:
    """Unlink the shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` and never removes (69 MB a rank,
    per run; its ``shm_initialize`` names it from the user id, ``MASTER_ADDR`` and ``MASTER_PORT``). Peers that mapped
    it keep their mapping (only the name goes), so this is safe whatever state they are in."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def run_then_shut_down(entry, argv: list[str]) -> None:
    """``entry(argv)``, then ``shut_down``: for other entry points that start their own process group (tests'
    reference runs), so that they leave it as this one does."""
    finished = False
    try:
        entry(argv)
        finished = True
    finally:
        shut_down(finished)


if __name__ == "__main__":
    sys.exit(main())
