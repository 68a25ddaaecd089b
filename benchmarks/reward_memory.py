"""Reward-graph memory: the planner's reward constants, measured on narrow rewards of each real architecture.

For each reward family the planner knows (``engine/memory/plan.py``: open_clip ViT for HPSv2/2.1, transformers CLIP ViT
for PickScore/CLIPScore/aesthetic, Qwen2-VL for HPSv3) a narrow random model (real head widths, MLP ratios, tokens)
saved in the real checkpoint format is
loaded through ``load_reward`` and called on images that require a gradient, as the reward phase does; the bytes
autograd saves (parameters excluded, ``SavedTensorCounter``) are divided by the family's
``Σ layers × tokens × width × element bytes``. The constant is fitted on batch 1 and checked on batch 2 (held out);
both rows and the relative error are written to ``benchmarks/results/reward_memory_<device>.{jsonl,md}``, and the
constants into ``engine/calibration.json`` (``reward``), which ``launch/plan.py`` reads.

    python benchmarks/reward_memory.py            # CPU, fp32, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import RESULTS, stamp, write_jsonl  # noqa: E402
from engine.memory import CALIBRATION_FILE, Calibration, RewardArch, SavedTensorCounter, Tower, reward_graph_bytes  # noqa: E402  # noqa: E402

# Narrow versions of the real architectures with their real head widths, MLP ratios and token counts: per unit of
# layers·tokens·width the linear parts then save what the real ones do, and so does attention (heads·tokens² per
# unit = tokens / head width). ViT-H-14: head width 80, MLP 4×, 257 tokens at 224² / 14 px patches. Qwen2-VL-7B:
# LM head width 128, MLP 18944/3584 ≈ 5.3×; vision head width 80, MLP 4×, 1024 patches at 448².
INPUT_PX = {"open_clip_vit": 224, "hf_clip_vit": 224, "qwen2_vl": 448}  # what each family resizes to


def variants(folder: Path, scale: int) -> dict[str, tuple[str, str, tuple[Tower, ...]]]:
    """family → (reward name, local path, towers on the gradient path) of the narrow model ``scale`` × as wide (the
    head width kept: ``scale`` × the heads). Scale 1 fits the constants, scale 2 checks them."""
    from tests.unit.reward_fixtures import TINY_OPEN_CLIP_CFG, build_tiny_hf_clip, build_tiny_hps
    from tests.unit.test_rewards_vlm import build_tiny_hpsv3

    vit_width, lm_width = 160 * scale, 256 * scale
    vit_h = {"image_size": 224, "layers": 1, "width": vit_width, "head_width": 80, "patch_size": 14}
    hf_vit_h = dict(
        hidden_size=vit_width, intermediate_size=4 * vit_width, num_attention_heads=2 * scale, patch_size=14
    )
    qwen_lm = dict(width=lm_width, layers=1, heads=2 * scale, intermediate=round(lm_width * 18944 / 3584))
    qwen_vision = dict(depth=1, embed_dim=vit_width, num_heads=2 * scale)
    vit = (Tower(1, 257, vit_width),)
    root = folder / f"x{scale}"
    return {
        "open_clip_vit": (
            "hpsv21",
            str(build_tiny_hps(root / "hps", cfg=dict(TINY_OPEN_CLIP_CFG, vision_cfg=vit_h))),
            vit,
        ),
        "hf_clip_vit": ("pickscore", str(build_tiny_hf_clip(root / "pick", vision=hf_vit_h)), vit),
        "qwen2_vl": (
            "hpsv3",
            str(build_tiny_hpsv3(root / "hpsv3", **qwen_lm, vision=qwen_vision)),
            (Tower(1, 1024, vit_width), Tower(1, 0, lm_width)),  # the LM's sequence length is measured
        ),
    }


def _modules(reward) -> list[nn.Module]:
    """The reward's models: its nn.Module attributes, one level deep (PickScore keeps its CLIPModel in a holder)."""
    found = []
    for value in vars(reward).values():
        if isinstance(value, nn.Module):
            found.append(value)
        elif hasattr(value, "__dict__"):
            found += [v for v in vars(value).values() if isinstance(v, nn.Module)]
    return found


def _layer_stacks(modules: list[nn.Module]) -> dict[str, list[nn.Module]]:
    """Layers of each stack, by tower: ``tower0`` the image side (``visual``/``vision_model``), ``tower1`` the rest
    (Qwen2-VL's language model; CLIP's text tower, which runs without a gradient and saves nothing)."""
    stacks: dict[str, list[nn.Module]] = {"tower0": [], "tower1": []}
    for module in modules:
        for name, child in module.named_modules():
            if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("resblocks", "layers", "blocks"):
                image_side = "visual" in name or "vision" in name
                stacks["tower0" if image_side else "tower1"] += list(child)
    return stacks


def measure(name: str, path: str, batch: int, size: int) -> tuple[int, list[int], int | None]:
    """(peak saved bytes of the reward forward + backward to the images, the part saved inside each tower, the
    sequence length the second tower saw)."""
    from engine.rewards import load_reward

    reward = load_reward(name, path, "cpu", torch.float32)
    modules = _modules(reward)
    images = torch.rand(batch, 3, size, size, requires_grad=True)
    prompts = ["a red circle above a blue square"] * batch
    stacks, seen = _layer_stacks(modules), {}
    if stacks["tower1"]:
        stacks["tower1"][0].register_forward_pre_hook(
            lambda _, args, kwargs: seen.update(t=_length(args, kwargs)), with_kwargs=True
        )
    with SavedTensorCounter(exclude=modules) as counter:
        handles = [
            handle
            for tower, layers in stacks.items()
            for layer in layers
            for handle in counter.attribute_module(layer, tower)
        ]
        score = reward(images, prompts)
        for handle in handles:
            handle.remove()
        towers = [counter.region_peak_bytes.get(f"tower{i}", 0) for i in range(2)]
        score.sum().backward()
    return counter.peak_bytes, towers, seen.get("t")


def _length(args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return int(hidden.shape[-2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="generated image size fed to the rewards (pixels)")
    parser.add_argument("--no-write-calibration", action="store_true", help="leave engine/calibration.json alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    meta = stamp(torch.device("cpu"))
    rows, constants, inputs = [], {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for scale, batch in ((1, 1), (1, 2), (2, 1)):
            for family, (name, path, towers) in variants(Path(scratch), scale).items():
                saved, per_tower, length = measure(name, path, batch, args.size)
                if length is not None and len(towers) > 1:  # the LM's sequence: image tokens + the chat template
                    towers = (towers[0], Tower(towers[1].layers, length, towers[1].width))
                arch = RewardArch(name, family, lambda: 0, towers, INPUT_PX[family], "narrow")
                layers = sum(per_tower[: len(towers)])
                if (scale, batch) == (1, 1):  # per tower: bytes saved inside its layers / its units (fp32)
                    constants[family] = [per_tower[i] / (tower.units * 4) for i, tower in enumerate(towers)]
                    inputs[family] = (saved - layers) / (3 * INPUT_PX[family] ** 2 * 4)
                predicted = reward_graph_bytes(arch, Calibration(reward=constants, reward_input=inputs), 4, batch)
                rows.append(
                    {
                        "family": family, "reward": name, "width_scale": scale, "batch": batch, "image": args.size,
                        "units": [t.units for t in towers], "saved_bytes": saved, "tower_bytes": per_tower,
                        "layer_bytes": layers, "predicted_bytes": predicted,
                        "role": "fit" if (scale, batch) == (1, 1) else "held out",
                        "relative_error": round(predicted / saved - 1, 4), **meta,
                    }
                )  # fmt: skip
    out = RESULTS / "reward_memory_cpu.jsonl"
    write_jsonl(out, rows)
    lines = [
        "# Reward-graph memory on tiny rewards (CPU, fp32), the planner's reward constants",
        "",
        f"Commit {meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}, torch {meta['torch']}, {meta['date']}. "
        "Constant = bytes saved inside the layer stacks / (Σ layers·tokens·width × 4), fitted on the narrow model at "
        "batch 1; batch 2 and the model twice as wide (same head width) are held out."
        " The rest (preprocessing, patch embedding, pooling, heads) is fitted per input pixel (3·px²·4 bytes).",
        "",
        "| family | reward | width | batch | role | saved (KiB) | of which in layers (KiB) | predicted (KiB) | error "
        "| constants per tower, per input pixel |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['reward']} | {row['width_scale']}× | {row['batch']} | {row['role']} | "
            f"{row['saved_bytes'] / 1024:.0f} | "
            f"{row['layer_bytes'] / 1024:.0f} | {row['predicted_bytes'] / 1024:.0f} | "
            f"{row['relative_error']:+.1%} | {', '.join(f'{c:.2f}' for c in constants[row['family']])}; "
            f"{inputs[row['family']]:.2f} |"
        )
    (RESULTS / "reward_memory_cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not args.no_write_calibration:
        calibration = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
        calibration["reward"] = {family: [round(c, 4) for c in cs] for family, cs in constants.items()}
        calibration["reward_input"] = {family: round(c, 4) for family, c in inputs.items()}
        calibration["reward_source"] = (
            f"benchmarks/reward_memory.py, narrow rewards (real head widths) fed {args.size}px images, cpu fp32"
        )
        CALIBRATION_FILE.write_text(json.dumps(calibration, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
