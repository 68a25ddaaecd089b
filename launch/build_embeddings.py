"""Build the prompt-embedding store ahead of training, on a machine of your choice (a CPU box, one GPU, N ranks).

    python launch/build_embeddings.py --config configs/flux_hpsv21.yaml data.prompts=/data/hpdv2.txt \\
        data.embedding_cache=/shared/embeddings model.text_encoder_device=cuda:0
    deepspeed --num_gpus 8 launch/build_embeddings.py --config ...     # 8 ranks encode disjoint shares

The store is keyed by the text encoders' files, the tokenizer settings and the encoder dtype and device type, so
a training run with the same settings (and the same ``data.embedding_cache``) reuses every row and never loads its
text encoders. Run it with the training run's ``model.text_encoder_device`` device type: CPU and GPU encoders give
slightly different vectors, so they are stored apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="the training run's config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    try:
        cfg = load_config(args.config, args.overrides)
        from engine.data import run_prompts
        from engine.text_phase import encode_prompts, model_folder

        prompts, eval_prompts, _ = run_prompts(cfg.data)
        folder = model_folder(cfg.model)
        if not folder.is_dir():
            raise ValueError(f"model.path={str(folder)!r} is not a folder; give the local diffusers model folder")
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch
    import torch.distributed as dist

    from launch.train import init_distributed, shut_down

    init_distributed(cfg.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        from engine.checkpoint import check_shared_folder

        cache = Path(cfg.data.embedding_cache or Path(cfg.output_dir) / "embeddings")
        check_shared_folder(cache, rank, world)
        every = sorted(set(prompts) | set(eval_prompts))
        store = encode_prompts(cfg, folder, every, Path(cfg.output_dir), device=device, rank=rank, world=world)
        if rank == 0:
            print(f"{len(every)} prompts stored in {store.folder} ({store.bytes_on_disk / 1e9:.2f} GB)")
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shut_down(finished=False)  # no barrier: a rank that failed may have left its peer alone
    return 0


if __name__ == "__main__":
    sys.exit(main())
