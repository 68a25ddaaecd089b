"""Sample and score a model: a local diffusers folder, optionally with an exported transformer (or its EMA) or LoRA,
on a prompt file or a split of the embedded world, scored by every reward given and, for world prompts, the judge.

    python launch/evaluate.py --out runs/eval/base                   # the world's base model, 300 held-out images
    python launch/evaluate.py --transformer runs/default/export/transformer_ema --out runs/eval/ema
    python launch/evaluate.py --model /models/FLUX.1-dev --prompts prompts.txt --reward hpsv21=/ckpt/HPS_v2.1.pt \\
        --height 720 --width 720 --precision bf16 --out runs/eval/flux

Writes ``<out>/images/NNNN.png`` (one per prompt), ``<out>/grid.png`` (every caption whole, each world image marked
with the judge's verdict beside its reward) and ``<out>/evaluation.json``: per image (prompt, seed, every reward,
the verdict and its reason), per category (judge accuracy, mean reward), each reward's agreement with the judge
(``reward_vs_judge``: AUC, mean reward of accepted and rejected images) and the settings (precision, batch, steps,
seeds, weights).
With the same prompts, seeds, steps, precision and weights, it scores exactly what the trainer's grids score.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import ConfigError  # noqa: E402
from engine.world.scenes import SPLITS  # noqa: E402

DTYPES = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local diffusers folder (default: the embedded world's pretrained model)")
    parser.add_argument("--kind", choices=("flux", "sd3"), default="flux", help="model family (default flux)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--transformer", help="an exported transformer folder (export/transformer[_ema])")
    weights.add_argument("--lora", help="an exported LoRA folder (export/lora[_ema])")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", help="a text file, one prompt a line")
    prompts.add_argument("--split", choices=SPLITS, help="a world split (default: heldout)")
    parser.add_argument("--per-category", type=int, default=50, help="world prompts per category (default 50: 300)")
    parser.add_argument("--reward", action="append", metavar="NAME[=PATH]", help="a reward (repeatable; default "
                        "world_clip for the world, none otherwise)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="image i uses noise seed SEED + i (the trainer's: 0)")
    parser.add_argument("--steps", type=int, default=25, help="Euler sampling steps (default 25)")
    parser.add_argument("--precision", choices=DTYPES, default="bf16", help="rollout dtype (default bf16, as training)")
    parser.add_argument("--weights-dtype", choices=(*DTYPES, "auto"), default="auto",
                        help="transformer dtype; auto = as its checkpoint is saved (default)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=64, help="prompts per rollout (default 64)")
    parser.add_argument("--height", type=int, default=32, help="image height in pixels (default 32, the world's)")
    parser.add_argument("--width", type=int, default=32, help="image width in pixels (default 32)")
    parser.add_argument("--guidance-scale", type=float, default=3.5, help="FLUX guidance / SD3 CFG (default 3.5)")
    parser.add_argument("--negative-prompt", default=None, help="SD3: the negative prompt of true CFG")
    parser.add_argument("--out", required=True, help="output folder (created; an existing evaluation is replaced)")
    return parser.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    """Every input, before anything loads: one line naming the bad one and the fix."""
    for flag in ("model", "transformer", "lora", "prompts"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"--{flag} {path} does not exist; give a local path (nothing is downloaded)")
    for flag in ("per_category", "steps", "batch", "height", "width"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.lora is not None and not _lora_files(Path(args.lora)):
        raise ConfigError(f"--lora {args.lora} holds no LoRA weights (*.safetensors); give an export/lora[_ema] folder")
    if args.height % 16 or args.width % 16:
        raise ConfigError(f"--height/--width {args.height}x{args.width} must be multiples of 16")


def _lora_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _transformer_dtype(folder: Path, choice: str):
    import torch

    from engine.models.loading import weight_headers

    if choice != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]
    headers = weight_headers(folder) or {}
    saved = {info.dtype for _, info in headers.values()}
    return torch.bfloat16 if saved == {torch.bfloat16} else torch.float32


def load_adapter(args: argparse.Namespace, device):
    """The adapter with the requested weights: the folder's transformer, an exported one, or the folder's plus LoRA."""
    import torch

    from engine.models.kinds import model_kind
    from engine.world.paths import MODEL_DIR

    kind = model_kind(args.kind)
    folder = Path(args.model) if args.model else MODEL_DIR
    source = Path(args.transformer) if args.transformer else folder / "transformer"
    dtype = _transformer_dtype(source, args.weights_dtype)
    transformer = None
    if args.transformer:
        transformer = kind.transformer.from_pretrained(str(source), torch_dtype=dtype, local_files_only=True)
    adapter = kind.adapter.from_pretrained(str(folder), device=device, dtype=torch.float32, transformer=transformer)
    adapter.transformer = adapter.transformer.to(device=device, dtype=dtype).eval()
    if args.lora:
        lora = Path(args.lora)
        files = _lora_files(lora)
        # The file named, and nothing looked up online: diffusers' guess otherwise falls back to a .bin name.
        adapter.transformer.load_lora_adapter(str(lora), prefix="transformer", adapter_name="evaluated",
                                              weight_name=files[0].name, local_files_only=True)  # fmt: skip
    adapter.transformer.requires_grad_(False)
    return adapter, folder, dtype


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    try:
        _check(args)
        from engine.data import read_prompts
        from engine.rewards import REGISTRY

        world = args.prompts is None
        if world:
            from engine.world.evaluate import prompt_set

            specs = prompt_set(args.split or "heldout", args.per_category, cycle=True)
            prompts = [p.text for p in specs]
        else:
            specs, prompts = None, read_prompts(args.prompts, "--prompts")
        rewards = [item.partition("=")[::2] for item in (args.reward or (["world_clip"] if world else []))]
        for name, _ in rewards:
            if name not in REGISTRY:
                raise ConfigError(f"--reward {name}: unknown; choose one of {', '.join(sorted(REGISTRY))}")
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch

    from engine.evaluation import write_evaluation
    from engine.host import keep_heap_warm
    from engine.images import save_images
    from engine.rewards import load_reward
    from engine.rollout import sample

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    keep_heap_warm(device)
    start = time.perf_counter()
    adapter, folder, weights_dtype = load_adapter(args, device)
    seeds = [args.seed + i for i in range(len(prompts))]
    rollout_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    images = sample(adapter, prompts, seeds, num_steps=args.steps, height=args.height, width=args.width,
                    guidance_scale=args.guidance_scale, dtype=rollout_dtype, batch_size=args.batch,
                    negative_prompt=args.negative_prompt, progress=True)  # fmt: skip
    scores = {}
    for name, path in rewards:
        reward = load_reward(name, path or None, device, torch.float32)
        with torch.no_grad():
            scores[name] = torch.cat([reward(images[i : i + args.batch].to(device), prompts[i : i + args.batch]).cpu()
                                      for i in range(0, len(prompts), args.batch)])  # fmt: skip
    out = Path(args.out)
    save_images(images, out / "images")
    record = {
        "model": str(folder),
        "transformer": args.transformer,
        "lora": args.lora,
        "prompts_from": args.prompts or f"world {args.split or 'heldout'} split, {args.per_category} per category",
        "seeds": seeds,
        "num_steps": args.steps,
        "rollout_dtype": args.precision,
        "weights_dtype": str(weights_dtype).removeprefix("torch."),
        "guidance_scale": args.guidance_scale,
        "batch": args.batch,
        "size": [args.height, args.width],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if not scores:
        scores = {"none": torch.full((len(prompts),), float("nan"))}
    result = write_evaluation(out / "grid.png", images, prompts, scores, specs=specs, record=record,
                              json_path=out / "evaluation.json")  # fmt: skip
    summary = {k: result[k] for k in ("judge", "reward_per_category") if k in result}
    summary["reward_mean"] = {name: round(float(v.mean()), 4) for name, v in scores.items()}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
