"""``imagereward``: ImageReward (Xu et al. 2023, THUDM/ImageReward), a BLIP ViT-L/16 + cross-attention BERT scored by
an MLP, trained on human text-to-image preference rankings. Re-implemented here without the ``ImageReward`` package.

Model (the reference ``ImageReward.ImageReward``; key names as in its state dict):

- ``blip.visual_encoder``: BLIP's ViT (``create_vit('large', 224)``): ``patch_embed.proj`` Conv 16×16, ``cls_token``,
  ``pos_embed`` [1, 197, 1024], ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` (24 blocks,
  16 heads, GELU, LayerNorm eps 1e-6), final ``norm``. All tokens (after ``norm``) are the image embeddings.
- ``blip.text_encoder``: BLIP's ``med.py`` ``BertModel(add_pooling_layer=False)`` from ``med_config.json`` with
  ``encoder_width`` set to the ViT width (1024): ``embeddings.{word_embeddings, position_embeddings, LayerNorm}``
  (no token-type embeddings), ``encoder.layer.N.{attention, crossattention}.{self.query|key|value, output.dense,
  output.LayerNorm}``, ``intermediate.dense``, ``output.{dense, LayerNorm}``. Every layer: bidirectional
  self-attention over the prompt (padding masked), cross-attention to all image tokens, FFN (post-LN).
- ``mlp.layers``: Linear 768→1024, Dropout, Linear 1024→128, Dropout, Linear 128→64, Dropout, Linear 64→16,
  Linear 16→1 (no activations: the reference has its ReLUs commented out) — the aesthetic predictor's layout.

Score = ``(mlp(text_output[:, 0]) − 0.16717362830052426) / 1.0333394966054072``, as ``ImageReward.score`` computes
it. The text goes in as BLIP's tokenizer gives it (``[CLS] prompt [SEP]``, padded to ``max_length=35``, truncated):
the reference ``score``/``inference_rank`` and its training code do NOT swap the first token for ``[ENC]`` (BLIP's
ITM head does; ImageReward does not), so neither do we.

Preprocessing: the reference ``_transform(224)``: ``Resize(224, BICUBIC)`` (shortest side), ``CenterCrop(224)``
(torchvision rounds the offset), ``ToTensor``, OpenAI CLIP mean/std — on tensors, differentiable. The input size is
read from the checkpoint's ``pos_embed`` (197 tokens → 224 px with 16 px patches); the reference builds the ViT
for 224 px (``BLIP_Pretrain(image_size=224, vit='large')``), not BLIP's usual 384.

Files (one folder): ``ImageReward.pt`` (the state dict, ``torch.load(weights_only=True)``), ``med_config.json``
(BLIP's BERT config; vocab_size 30524) and the ``bert-base-uncased`` ``vocab.txt`` in ``tokenizer/`` or beside them.
The tokenizer is ``BertTokenizer(vocab_file)`` plus BLIP's ``[DEC]`` bos and ``[ENC]`` special tokens (ids 30522/3).

Loading is strict: every parameter of the modules above must be in the file with its shape. Ignored if present:
``blip.vision_proj.*`` / ``blip.text_proj.*`` (BLIP_Pretrain's contrastive projections, unused by the score) and
``blip.text_encoder.embeddings.position_ids`` (a buffer ``arange(512)``); the reference loads with strict=False,
so these may or may not be in the released file.

Defaults (our choice; the LeapAlign paper does not train on ImageReward): λ = 1.5 (scores of good SD-class images
are ~0–1, strong ones ~1.5–2; the hinge stays active), α = 0.3 (the HPS value).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.rewards import preprocess
from engine.rewards.aesthetic import aesthetic_mlp
from engine.rewards.base import RewardSpec, register

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
VOCAB = "vocab.txt"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35  # the reference tokenizes with padding="max_length", truncation=True, max_length=35
MLP_WIDTHS = (1024, 128, 64, 16, 1)
VIT_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
# Keys the reference may carry that the score never reads (it loads with strict=False).
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)
FILES = (
    f"a folder with {CHECKPOINT} (the THUDM ImageReward state dict: blip.visual_encoder.*, blip.text_encoder.*, "
    f"mlp.layers.*), {MED_CONFIG} (BLIP's BERT config) and the bert-base-uncased {VOCAB} in tokenizer/ or beside them"
)


def _fail(path, why: str) -> ValueError:
    why = " ".join(str(why).split())[:300]
    return ValueError(
        f"reward 'imagereward': cannot load {path!s} ({why}); expected {FILES}; "
        f"fix: download them once and set rewards.N.path to that folder"
    )


# --------------------------------------------------------------------------------------------------- vision (BLIP ViT)
@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_width: int


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on ``[B, L, D]`` projections (softmax(q·kᵀ/√d + mask)·v)."""
    batch, length, width = q.shape
    split = lambda x: x.view(batch, x.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, width)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attention(q, k, v, self.heads))


class _ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = _ViTAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = _ViTMlp(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ``models/vit.py`` VisionTransformer (no head): ``[B, 3, S, S]`` → all tokens ``[B, 1 + N, width]``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
        self.blocks = nn.ModuleList(_ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def vision_config_from_state(state: dict[str, torch.Tensor]) -> VisionConfig:
    """The ViT's shape, read from the checkpoint (heads = width / 64, as in BLIP's base 768/12 and large 1024/16)."""
    proj = state[VIT_PREFIX + "patch_embed.proj.weight"]
    tokens = state[VIT_PREFIX + "pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} patch tokens, not a square grid")
    width, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(k[len(VIT_PREFIX) :].split(".")[1]) for k in state if k.startswith(VIT_PREFIX + "blocks."))
    mlp_width = state[VIT_PREFIX + "blocks.0.mlp.fc1.weight"].shape[0]
    return VisionConfig(grid * patch, patch, width, depth, max(width // 64, 1), mlp_width)


# ----------------------------------------------------------------------------------------- text (BLIP med.py BERT)
@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str
    encoder_width: int

    @classmethod
    def from_med_config(cls, config: dict, encoder_width: int) -> TextConfig:
        if not config.get("add_cross_attention", False):
            raise ValueError("med_config.json must set add_cross_attention: true")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only position_embedding_type 'absolute' is supported")
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            max_positions=int(config.get("max_position_embeddings", 512)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(config.get("pad_token_id", 0)),
            hidden_act=str(config.get("hidden_act", "gelu")),
            encoder_width=encoder_width,  # BLIP_Pretrain overwrites med_config's value with the ViT width
        )


class _SelfAttention(nn.Module):  # med.py BertSelfAttention: query/key/value
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)


class _SelfOutput(nn.Module):  # med.py BertSelfOutput / BertOutput: dense, residual, LayerNorm
    def __init__(self, fan_in: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(fan_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.self = _SelfAttention(cfg, kv_width)
        self.output = _SelfOutput(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        s = self.self
        return self.output(_attention(s.query(x), s.key(context), s.value(context), self.heads, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, cfg.encoder_width)
        self.intermediate = _Intermediate(cfg)
        self.output = _SelfOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)  # bidirectional, padding masked
        x = self.crossattention(x, image_embeds, None)  # every image token (the reference's image_atts are all 1)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):  # med.py BertEmbeddings: no token-type embeddings
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class _Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.layers))


class TextEncoder(nn.Module):
    """BLIP's ``med.py`` ``BertModel(add_pooling_layer=False)`` in ``mode='multimodal'``: last hidden states."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, input_ids, attention_mask, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # med.py's extended mask: (1 − mask) · −10000 added to the self-attention scores.
        mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0).to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class ImageRewardModel(nn.Module):
    """``blip.visual_encoder`` + ``blip.text_encoder`` + ``mlp``: the reference's parameters, same key names."""

    def __init__(self, vision: VisionConfig, text: TextConfig):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(vision)
        self.blip.text_encoder = TextEncoder(text)
        self.mlp = aesthetic_mlp([text.hidden_size, *MLP_WIDTHS])

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, S, S]`` + tokens → the standardised score ``[B]`` (model dtype)."""
        image_embeds = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        features = text[:, 0].to(self.mlp.layers[0].weight.dtype)  # the reference: .float() (the head is fp32)
        return (self.mlp.layers(features).squeeze(-1) - SCORE_MEAN) / SCORE_STD


# ---------------------------------------------------------------------------------------------------------- reward
def torchvision_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop``: offsets ``int(round((side − size) / 2))`` (preprocess.center_crop floors)."""
    height, width = images.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def imagereward_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The reference ``_transform(size)`` on ``[B, 3, H, W]`` in [0, 1], differentiable."""
    pixels = torchvision_center_crop(preprocess.resize_shortest_side(images, size), size)
    return preprocess.normalize(pixels, preprocess.CLIP_MEAN, preprocess.CLIP_STD)


class ImageRewardReward:
    """ImageReward's standardised score of (image, prompt); ~N(0, 1) over its training generations."""

    name = "imagereward"
    default_lam = 1.5
    default_alpha = 0.3

    def __init__(self, model: ImageRewardModel, tokenizer, max_length: int = MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = model.blip.visual_encoder.cfg.image_size

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``images [B,3,H,W]`` in [0, 1], one prompt each → ``[B]`` float32, differentiable w.r.t. ``images``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        parameter = next(self.model.parameters())
        pixels = imagereward_preprocess(images.float(), self.image_size).to(parameter.device, parameter.dtype)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].to(parameter.device)
        attention_mask = tokens["attention_mask"].to(parameter.device)
        return self.model(pixels, input_ids, attention_mask).float()


def blip_tokenizer(vocab_file: str | os.PathLike):
    """BLIP's ``init_tokenizer``: bert-base-uncased + ``[DEC]`` as bos + ``[ENC]``; ``enc_token_id`` is set."""
    import inspect

    from transformers import BertTokenizer

    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers ≥ 5: a {token: id} dict
        lines = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        lines = lines[:-1] if lines and lines[-1] == "" else lines  # as BERT's load_vocab: one token a line
        tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(lines)})
    else:  # transformers 4: the path
        tokenizer = BertTokenizer(vocab_file=str(vocab_file))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def load_imagereward(path: str | os.PathLike | None, device: torch.device, dtype: torch.dtype) -> ImageRewardReward:
    folder = Path(path)
    if not folder.is_dir():
        raise _fail(path, "not a folder")
    vocab = next((f for f in (folder / "tokenizer" / VOCAB, folder / VOCAB) if f.is_file()), None)
    missing = [name for name in (CHECKPOINT, MED_CONFIG) if not (folder / name).is_file()]
    missing += [] if vocab else [f"tokenizer/{VOCAB}"]
    if missing:
        raise _fail(path, f"missing {', '.join(missing)}")
    try:
        med_config = json.loads((folder / MED_CONFIG).read_text(encoding="utf-8"))
    except ValueError as err:
        raise _fail(folder / MED_CONFIG, f"unreadable: {err}") from err
    try:
        state = _torch_load(folder / CHECKPOINT)
    except Exception as err:  # corrupt zip, pickle with non-tensor objects, truncated file, ...
        raise _fail(folder / CHECKPOINT, f"torch.load(weights_only=True) failed: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _fail(folder / CHECKPOINT, "the file holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        vision = vision_config_from_state(state)
        text = TextConfig.from_med_config(med_config, encoder_width=vision.width)
        model = ImageRewardModel(vision, text)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise _fail(folder / CHECKPOINT, f"not an ImageReward checkpoint with {MED_CONFIG}: {err!r}") from err
    expected = set(model.state_dict())
    ignored = {k for k in state if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES)}
    missing_keys = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - ignored)
    if missing_keys or unexpected:
        raise _fail(
            folder / CHECKPOINT,
            f"does not match the ImageReward model: {len(missing_keys)} missing keys {missing_keys[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}",
        )
    try:
        model.load_state_dict({k: v for k, v in state.items() if k not in ignored}, strict=True)
    except RuntimeError as err:  # same keys, wrong shapes
        raise _fail(folder / CHECKPOINT, f"does not match the ImageReward model: {str(err).splitlines()[-1]}") from err
    try:
        tokenizer = blip_tokenizer(vocab)
    except Exception as err:
        raise _fail(vocab, f"BertTokenizer failed: {type(err).__name__}: {err}") from err
    if len(tokenizer) > text.vocab_size:
        raise _fail(vocab, f"{len(tokenizer)} tokens with [DEC]/[ENC] > vocab_size {text.vocab_size} in {MED_CONFIG}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.mlp.float()  # as the reference scores txt_features.float()
    return ImageRewardReward(model, tokenizer, max_length=min(MAX_LENGTH, text.max_positions))


register(RewardSpec("imagereward", load_imagereward, needs_path=True, files=FILES))
