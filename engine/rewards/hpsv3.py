"""``hpsv3``: Human Preference Score v3 (Ma et al. 2025, MizzenAI/HPSv3), a Qwen2-VL-7B-Instruct reward model.

Model (the reference ``Qwen2VLRewardModelBT``): the full Qwen2-VL (vision tower + LM, fine-tuned) with a reward
head ``rm_head`` applied, in float32, to the LM's last hidden state at the added special token ``<|Reward|>``; the
head outputs (μ, log σ) and μ is the score (the reference inferencer: ``rewards[i][0]``). Head layouts read from
the checkpoint: ``rm_head.weight`` (``rm_head_type="default"``: Linear(hidden, 2, bias=False)) or
``rm_head.{0,3,5}`` (``"ranknet"`` without kwargs: Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16), ReLU,
Linear(16, 2)) — the released HPSv3 config uses ranknet.

Input, as the reference ``HPSv3RewardInferencer.prepare_batch`` builds it: one user turn of Qwen2-VL's chat template
(default system prompt, ``add_generation_prompt=True``) with the image, then ``INSTRUCTION.format(text_prompt=...)``
+ ``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``; right padding. Positions: the
reference's forward calls the LM with ``position_ids=None``, which in transformers 4.45 (its pin) are sequential
``0..L-1`` on all three M-RoPE axes — not the 3-D image positions of ``get_rope_index`` — so we pass those.

Image: ``min_pixels = max_pixels = 256·28·28`` → ``smart_resize`` (multiples of 28; 1024² → 448²), resized with
PIL's bicubic (qwen_vl_utils ``fetch_image``), rescale, OpenAI CLIP mean/std, then the Qwen2-VL processor's
patchify (the frame repeated over ``temporal_patch_size``; 2×2 merge order) to ``pixel_values [N, 3·2·14·14]`` and
``image_grid_thw`` — all on tensors, so the gradient reaches the pixels.

Files (one folder): ``HPSv3.safetensors`` (the reference's full state dict; both transformers-4.45 keys
``model.*``/``visual.*`` and ≥ 4.52 keys ``model.language_model.*``/``model.visual.*`` are accepted) and the
Qwen2-VL-7B-Instruct folder WITHOUT its weights (config.json, tokenizer files, preprocessor_config.json) in
``qwen2vl/`` or beside it. The vocabulary is the tokenizer's plus ``<|Reward|>`` (the checkpoint's embedding rows).
Loaded offline (``local_files_only``), remote code never trusted.

Defaults: λ = 13.5, α = 0.1 (LeapAlign paper).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from engine.rewards import preprocess
from engine.rewards.base import RewardSpec, register

CHECKPOINT = "HPSv3.safetensors"
BASE_DIR = "qwen2vl"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # the reference's min_pixels = max_pixels
FILES = (
    f"a folder with {CHECKPOINT} (the MizzenAI/HPSv3 state dict) and the Qwen2-VL-7B-Instruct config, tokenizer and "
    f"preprocessor_config.json (no weights needed) in {BASE_DIR}/ or beside it"
)
# Verbatim from the reference (MizzenAI/HPSv3 hpsv3/dataset/data_collator_qwen.py), trailing spaces included; the
# HPSv3++ fork dropped its Text Alignment part, the released HPSv3 was trained with it.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n"  # noqa: E501
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n"  # noqa: E501
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n"  # noqa: E501
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n"  # noqa: E501
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n"  # noqa: E501
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n"  # noqa: E501
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n"  # noqa: E501
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n"  # noqa: E501
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n"  # noqa: E501
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n"  # noqa: E501
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n"  # noqa: E501
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
PROMPT_WITH_SPECIAL_TOKEN = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def _fail(path, why: str) -> ValueError:
    why = " ".join(str(why).split())[:300]
    return ValueError(
        f"reward 'hpsv3': cannot load {path!s} ({why}); expected {FILES}; fix: set rewards.N.path to that folder"
    )


def chat_text(prompt: str, image_tokens: int) -> str:
    """Qwen2-VL-Instruct's chat template for one user turn [image, text] + the generation prompt, with the image
    placeholder expanded to ``image_tokens`` pads (what ``Qwen2VLProcessor`` does)."""
    text = INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{IMAGE_PAD * image_tokens}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's image processor layout for normalised ``[B, C, H, W]`` → ``pixel_values [B·gh·gw, C·T·p·p]`` and
    ``image_grid_thw [B, 3]`` (one frame repeated ``temporal`` times; patches in 2×2-merge order)."""
    batch, channels, height, width = pixels.shape
    gh, gw = height // patch, width // patch
    x = pixels[:, None].expand(batch, temporal, channels, height, width)
    x = x.reshape(batch, temporal, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # B, gh/m, gw/m, m, m, C, T, p, p
    grid = torch.tensor([[1, gh, gw]] * batch, dtype=torch.long, device=pixels.device)
    return x.reshape(batch * gh * gw, channels * temporal * patch * patch), grid


def ranknet_head(hidden: int, out: int = 2) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, out)
    )


class HPSv3Reward:
    """μ of HPSv3's reward head at ``<|Reward|>``."""

    name = "hpsv3"
    default_lam = 13.5
    default_alpha = 0.1

    def __init__(self, model, rm_head: nn.Module, tokenizer, image_cfg: dict, reward_token_id: int):
        self.model = model
        self.rm_head = rm_head
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.reward_token_id = reward_token_id

    def pixel_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        cfg = self.image_cfg
        factor = cfg["patch_size"] * cfg["merge_size"]
        height, width = smart_resize(images.shape[-2], images.shape[-1], factor, PIXELS, PIXELS)  # fetch_image
        # The processor's own smart_resize then (identity for Qwen2-VL-7B-Instruct's 3136..12845056 pixels).
        height, width = smart_resize(height, width, factor, cfg["min_pixels"], cfg["max_pixels"])
        pixels = preprocess.resize_bicubic(images.float(), (height, width))
        pixels = preprocess.normalize(pixels, cfg["image_mean"], cfg["image_std"])
        return patchify(pixels, cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"])

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images [B,3,H,W]`` in [0, 1], one prompt each → ``[B]`` float32, differentiable w.r.t. ``images``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        parameter = next(self.model.parameters())
        pixel_values, grid = self.pixel_inputs(images)
        image_tokens = int(grid[0].prod()) // self.image_cfg["merge_size"] ** 2
        tokens = self.tokenizer(
            [chat_text(p, image_tokens) for p in prompts], padding=True, padding_side="right", return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(parameter.device)
        attention_mask = tokens["attention_mask"].to(parameter.device)
        is_reward = input_ids == self.reward_token_id
        if not (is_reward.sum(dim=1) == 1).all():
            raise ValueError(f"each prompt must hold {REWARD_TOKEN} exactly once after tokenisation")
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            pixel_values=pixel_values.to(parameter.device, parameter.dtype),
            image_grid_thw=grid.to(parameter.device),
            use_cache=False,
        ).last_hidden_state
        return self.rm_head(hidden[is_reward].float())[:, 0]


def _convert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-4.45 Qwen2-VL keys (``model.layers``, ``visual.``) → ≥ 4.52 (``model.language_model``)."""
    out = {}
    for key, value in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            key = "model.language_model." + key.removeprefix("model.")
        out[key] = value
    return out


def load_hpsv3(path: str | os.PathLike | None, device: torch.device, dtype: torch.dtype) -> HPSv3Reward:
    import json

    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    from engine.models.loading import parameters_on_meta
    from engine.models.safetensors_io import SafetensorsError, iter_tensors, read_header

    folder = Path(path)
    if not folder.is_dir():
        raise _fail(path, "not a folder")
    base = folder / BASE_DIR if (folder / BASE_DIR / "config.json").is_file() else folder
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (base / name).is_file()]
    missing += [] if (folder / CHECKPOINT).is_file() else [CHECKPOINT]
    if missing:
        raise _fail(path, f"missing {', '.join(missing)}")
    try:
        processor_cfg = json.loads((base / "preprocessor_config.json").read_text(encoding="utf-8"))
        size = processor_cfg.get("size") or {}
        image_cfg = {
            "patch_size": int(processor_cfg.get("patch_size", 14)),
            "merge_size": int(processor_cfg.get("merge_size", 2)),
            "temporal_patch_size": int(processor_cfg.get("temporal_patch_size", 2)),
            "image_mean": tuple(processor_cfg.get("image_mean", preprocess.CLIP_MEAN)),
            "image_std": tuple(processor_cfg.get("image_std", preprocess.CLIP_STD)),
            "min_pixels": int(processor_cfg.get("min_pixels", size.get("shortest_edge", 56 * 56))),
            "max_pixels": int(processor_cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
        }
        config = AutoConfig.from_pretrained(base, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    except Exception as err:
        raise _fail(base, f"{type(err).__name__}: {err}") from err
    if config.model_type != "qwen2_vl":
        raise _fail(base / "config.json", f"model_type {config.model_type!r} is not 'qwen2_vl'")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as the reference does
    reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    # Host memory: the header first (names, shapes), the model on the meta device, then one tensor at a time into
    # memory the model keeps (assign=True): one copy of the weights, never the file's dict plus the model's.
    try:
        header = read_header(folder / CHECKPOINT)
    except SafetensorsError as err:
        raise _fail(folder / CHECKPOINT, f"unreadable safetensors: {err}") from err
    shapes = _convert_keys({name: info.shape for name, info in header.items()})
    renamed = dict(zip(header, shapes))  # file name -> model name
    embed = shapes.get("model.language_model.embed_tokens.weight")
    if embed is None:
        raise _fail(folder / CHECKPOINT, "no embed_tokens weight: not a Qwen2-VL reward model state dict")
    if embed[0] != len(tokenizer):
        raise _fail(folder / CHECKPOINT, f"{embed[0]} embedding rows, tokenizer+{REWARD_TOKEN} has {len(tokenizer)}")
    config.text_config.vocab_size = embed[0]  # the reference resize_token_embeddings(len(tokenizer))
    if "rm_head.weight" in shapes:
        rm_head = nn.Linear(embed[1], shapes["rm_head.weight"][0], bias=False)
    elif "rm_head.0.weight" in shapes and "rm_head.5.weight" in shapes:
        rm_head = ranknet_head(embed[1], shapes["rm_head.5.weight"][0])
    else:
        raise _fail(folder / CHECKPOINT, "no rm_head.weight or rm_head.{0,3,5}.weight (HPSv3 reward head)")
    try:
        with no_init_weights(), parameters_on_meta():  # every weight comes from the checkpoint
            model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        body = {k: v for k, v in shapes.items() if not k.startswith("rm_head.")}
        missing_keys, unexpected = sorted(set(expected) - set(body)), sorted(set(body) - set(expected))
        if missing_keys or unexpected:
            raise RuntimeError(
                f"{len(missing_keys)} missing keys {missing_keys[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )
        wrong = [k for k in sorted(body) if tuple(body[k]) != expected[k]]
        if wrong:
            raise RuntimeError(f"size mismatch for {wrong[0]}: {tuple(body[wrong[0]])} vs {expected[wrong[0]]}")
        state, head_state = {}, {}
        for name, tensor in iter_tensors(folder / CHECKPOINT):
            key = renamed[name]
            if key.startswith("rm_head."):
                head_state[key.removeprefix("rm_head.")] = tensor
            else:
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        rm_head.load_state_dict(head_state, strict=True)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    except (RuntimeError, SafetensorsError) as err:
        why = str(err).strip().splitlines()
        raise _fail(
            folder / CHECKPOINT, f"does not match Qwen2-VL from config.json: {why[-1] if why else err}"
        ) from err
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    rm_head = rm_head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return HPSv3Reward(model, rm_head, tokenizer, image_cfg, reward_token_id)


register(RewardSpec("hpsv3", load_hpsv3, needs_path=True, files=FILES))
