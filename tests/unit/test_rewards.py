"""Learned rewards: tiny random models in their real checkpoint formats, loaded through ``load_reward``.

Preprocessing parity (tensor path vs the models' own PIL pipelines on uint8 images), measured on this machine
(torch 2.14, Pillow, transformers 5.23, open_clip 3.3), after normalisation (1 grey level ≈ 0.015):
max |Δ| ≤ 0.0161, mean |Δ| ≤ 0.0046 — PIL rounds to uint8 after each resampling pass, torch keeps floats.
The asserted tolerances below (0.02 / 0.006) leave a little headroom over that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reward_fixtures import build_tiny_aesthetic, build_tiny_hf_clip, build_tiny_hps

from engine.rewards import HingeTerm, RewardCriterion, load_reward
from engine.rewards.clipscore import cosine
from engine.rewards.preprocess import clip_longest_pad, clip_shortest_crop, resize_bicubic

MAX_TOL, MEAN_TOL = 0.02, 0.006
SIZES = [(512, 512), (300, 517), (97, 150), (640, 480), (64, 64), (224, 224)]  # down, non-square, up, identity
PROMPTS = ["a red cat", "the dog on a mat"]


def _uint8_images(seed: int = 0):
    rng = np.random.default_rng(seed)
    for height, width in SIZES:
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        yield array, torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    diff = (got - ref).abs()
    assert diff.max() <= MAX_TOL and diff.mean() <= MEAN_TOL, (
        f"{what}: max {diff.max():.4f} (tol {MAX_TOL}), mean {diff.mean():.5f} (tol {MEAN_TOL}), "
        f"first worst index {np.unravel_index(int(diff.argmax()), diff.shape)}"
    )


# --------------------------------------------------------------------------------------------- preprocessing parity
def test_resize_matches_pil_within_one_grey_level():
    for array, images in _uint8_images():
        height, width = array.shape[:2]
        target = (height * 224 // max(height, width), width * 224 // max(height, width))
        ref = np.asarray(Image.fromarray(array).resize(target[::-1], Image.BICUBIC)).astype(np.float32)
        got = (resize_bicubic(images, target)[0].permute(1, 2, 0) * 255.0).numpy()
        assert np.abs(got - ref).max() <= 1.2, f"{array.shape[:2]}→{target}: max {np.abs(got - ref).max():.2f}"


def test_hps_preprocess_matches_open_clip_validation_transform():
    import open_clip

    # HPSv2's transform: image_transform(224, is_train=False, resize_longest_max=True) → longest side + zero pad.
    transform = open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=0)
    for array, images in _uint8_images():
        _assert_close(clip_longest_pad(images), transform(Image.fromarray(array))[None], f"HPS {array.shape[:2]}")


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_clip_preprocess_matches_clip_image_processor(backend):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil() if backend == "pil" else CLIPImageProcessor()
    for array, images in _uint8_images():
        ref = torch.as_tensor(np.asarray(processor(Image.fromarray(array), return_tensors="np")["pixel_values"]))
        _assert_close(clip_shortest_crop(images), ref, f"CLIP/{backend} {array.shape[:2]}")


# ------------------------------------------------------------------------------------------------- tiny checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {
        "hps_file": build_tiny_hps(root / "hps"),
        "clip": build_tiny_hf_clip(root / "clip"),
        "aesthetic": build_tiny_aesthetic(root / "aesthetic"),
    }


@pytest.fixture(scope="module")
def rewards(checkpoints):
    return {
        "hpsv21": load_reward("hpsv21", str(checkpoints["hps_file"].parent)),  # the folder holding the .pt
        "hpsv2_file": load_reward("hpsv2", str(checkpoints["hps_file"])),  # a file path is taken as named
        "pickscore": load_reward("pickscore", str(checkpoints["clip"])),
        "clipscore": load_reward("clipscore", str(checkpoints["clip"])),
        "aesthetic": load_reward("aesthetic", str(checkpoints["aesthetic"])),
    }


def _modules(reward):
    return (
        [reward.model]
        if hasattr(reward, "model")
        else [reward.clip.model] + ([reward.mlp] if hasattr(reward, "mlp") else [])
    )


@pytest.mark.parametrize("key", ["hpsv21", "hpsv2_file", "pickscore", "clipscore", "aesthetic"])
def test_reward_scores_and_gradient_reaches_pixels(rewards, key):
    reward = rewards[key]
    torch.manual_seed(0)
    images = torch.rand(2, 3, 96, 80, requires_grad=True)  # non-square, smaller than 224: upsampling + pad/crop
    # clipscore = 100·max(cos, 0): the random tiny CLIP gives cos < 0 for every pair, where the clamp rightly has no
    # gradient, so the cosine underneath is checked here and the positive branch in test_clipscore_is_100_times_...
    reward = (lambda x, p: cosine(rewards[key].clip, x, p)) if key == "clipscore" else reward
    prompts = PROMPTS
    scores = reward(images, prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0, f"{key}: no gradient to the pixels"
    for module in _modules(rewards[key]):
        assert not module.training, f"{key}: reward model left in train mode"
        assert not any(p.requires_grad for p in module.parameters()), f"{key}: reward parameters are trainable"


def test_reward_defaults_and_names(rewards):
    assert (rewards["hpsv21"].name, rewards["hpsv21"].default_lam, rewards["hpsv21"].default_alpha) == (
        "hpsv21",
        0.55,
        0.3,
    )
    pick = rewards["pickscore"]
    assert pick.default_alpha == 0.1
    assert pick.default_lam == pytest.approx(0.4 * pick.scale)  # the paper's cosine-scale λ on PickScore's scale
    assert rewards["hpsv2_file"].name == "hpsv2"
    assert {rewards[k].name for k in ("clipscore", "aesthetic")} == {"clipscore", "aesthetic"}


def test_hps_score_matches_open_clip_reference(rewards):
    """Our tensor path vs HPSv2's own: PIL transform, encode, normalise, diagonal of img @ txt.T."""
    import open_clip

    reward = rewards["hpsv21"]
    transform = open_clip.image_transform(224, is_train=False, resize_mode="longest")
    arrays, tensors = zip(*[next(_uint8_images(seed)) for seed in (1, 2)])
    with torch.no_grad():
        image_features = reward.model.encode_image(torch.stack([transform(Image.fromarray(a)) for a in arrays]))
        text_features = reward.model.encode_text(reward.tokenizer(PROMPTS))
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        expected = torch.diagonal(image_features @ text_features.T)
        got = reward(torch.cat(tensors), PROMPTS)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


def test_pickscore_matches_transformers_reference(rewards, checkpoints):
    """PickScore's reference: CLIPProcessor on PIL images, logit_scale.exp() · cos."""
    from transformers import CLIPProcessor

    reward = rewards["pickscore"]
    processor = CLIPProcessor.from_pretrained(checkpoints["clip"], local_files_only=True)
    arrays, tensors = zip(*[next(_uint8_images(seed)) for seed in (1, 2)])
    model = reward.clip.model
    with torch.no_grad():
        inputs = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
        text = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_embeds = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * torch.diagonal(image_embeds @ text_embeds.T)
        got = reward(torch.cat(tensors), PROMPTS)
        clip_score = rewards["clipscore"](torch.cat(tensors), PROMPTS)
    torch.testing.assert_close(got, expected, atol=0.2, rtol=0)  # logit scale ≈ 14.3 here: 0.2 ≈ 0.014 in cos
    torch.testing.assert_close(
        clip_score, 100 * torch.clamp(expected / model.logit_scale.exp(), min=0), atol=1.5, rtol=0
    )


def test_clipscore_is_100_times_clamped_cosine_with_gradient_where_positive(rewards):
    """The tiny CLIP's cosines are all negative (score 0, no gradient); negating its text projection flips their
    sign, which exercises the positive branch: score = −100 · cos_original, with a gradient to the pixels."""
    import copy
    import dataclasses

    from engine.rewards.clipscore import CLIPScoreReward

    clip = rewards["clipscore"].clip
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    with torch.no_grad():
        cos = cosine(clip, images, PROMPTS)
    torch.testing.assert_close(rewards["clipscore"](images, PROMPTS), 100 * torch.clamp(cos, min=0))
    flipped = copy.deepcopy(clip.model)
    flipped.text_projection.weight.neg_()
    scores = CLIPScoreReward(dataclasses.replace(clip, model=flipped))(images, PROMPTS)
    torch.testing.assert_close(scores, 100 * torch.clamp(-cos, min=0))
    assert (scores > 0).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_aesthetic_is_prompt_independent(rewards):
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(rewards["aesthetic"](images, PROMPTS), rewards["aesthetic"](images, ["x", "y"]))


def test_hps_in_bfloat16_returns_float32_with_gradient(checkpoints):
    reward = load_reward("hpsv21", str(checkpoints["hps_file"]), dtype=torch.bfloat16)
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = reward(images, PROMPTS)
    scores.sum().backward()
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_prompt_count_must_match(rewards):
    with pytest.raises(ValueError, match="one prompt per image"):
        rewards["hpsv21"](torch.rand(2, 3, 32, 32), ["only one"])


def test_criterion_combines_two_rewards_with_their_own_lambda(rewards):
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    hps, pick = rewards["hpsv21"], rewards["pickscore"]
    lam_hps, lam_pick, w_hps, w_pick = 0.9, 50.0, 1.0, 0.5  # both above the tiny models' scores: both hinges active
    criterion = RewardCriterion([HingeTerm(hps, lam_hps, w_hps), HingeTerm(pick, lam_pick, w_pick)])
    raw, reward_sum = criterion(images, PROMPTS)
    r_hps, r_pick = hps(images, PROMPTS), pick(images, PROMPTS)
    expected = w_hps * torch.clamp(lam_hps - r_hps, min=0) + w_pick * torch.clamp(lam_pick - r_pick, min=0)
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(reward_sum, w_hps * r_hps + w_pick * r_pick)
    assert (raw > 0).all()
    raw.sum().backward()
    assert images.grad.abs().sum() > 0
    # A λ below the score switches that term off.
    low = RewardCriterion([HingeTerm(hps, -2.0, w_hps), HingeTerm(pick, lam_pick, w_pick)])(images, PROMPTS)[0]
    torch.testing.assert_close(low, w_pick * torch.clamp(lam_pick - r_pick, min=0))


# ------------------------------------------------------------------------------------------------------------ errors
def _one_line_error(name: str, path, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        load_reward(name, str(path))
    message = str(info.value)
    assert "\n" not in message, f"multi-line error: {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.mark.parametrize("name", ["hpsv21", "hpsv2", "pickscore", "clipscore", "aesthetic"])
def test_missing_path_is_one_line_error(tmp_path, name):
    _one_line_error(name, tmp_path / "nowhere", "expected", "fix:")
    with pytest.raises(ValueError, match="needs a local path"):
        load_reward(name, None)


def test_hps_bad_files(tmp_path, checkpoints):
    _one_line_error("hpsv21", tmp_path, "HPS_v2.1_compressed.pt")  # empty folder
    _one_line_error("hpsv2", checkpoints["hps_file"].parent, "no HPS_v2_compressed.pt")  # only the v2.1 file there
    corrupt = tmp_path / "corrupt" / "HPS_v2.1_compressed.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(checkpoints["hps_file"].read_bytes()[:1000])  # truncated zip
    _one_line_error("hpsv21", corrupt, "weights_only=True", "HPS_v2.1_compressed.pt")
    no_state = tmp_path / "no_state" / "HPS_v2.1_compressed.pt"
    no_state.parent.mkdir()
    torch.save({"weights": {}}, no_state)
    _one_line_error("hpsv21", no_state, "no 'state_dict'")
    # Missing keys, then a wrong shape: strict-load failures, reported in one line. (The config is copied along: a
    # checkpoint without one is built as ViT-H-14, ~1 B parameters, too heavy for a unit test.)
    config = checkpoints["hps_file"].parent / "open_clip_config.json"
    state = torch.load(checkpoints["hps_file"], weights_only=True)["state_dict"]
    for case, edit, needle in [
        ("missing", lambda sd: sd.pop("logit_scale"), "1 missing keys ['logit_scale']"),
        ("shape", lambda sd: sd.update(logit_scale=torch.zeros(3)), "size mismatch"),
    ]:
        broken = dict(state)
        edit(broken)
        folder = tmp_path / case
        folder.mkdir()
        (folder / "open_clip_config.json").write_bytes(config.read_bytes())
        torch.save({"state_dict": broken}, folder / "HPS_v2.1_compressed.pt")
        _one_line_error("hpsv21", folder, "does not match open_clip tiny-hps", needle)


def test_hf_clip_bad_folders(tmp_path, checkpoints):
    _one_line_error("pickscore", tmp_path, "missing config.json", "preprocessor_config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoints["clip"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    _one_line_error("clipscore", broken, "cannot load", "model.safetensors")


def test_aesthetic_bad_files(tmp_path, checkpoints):
    folder = tmp_path / "aesthetic"
    folder.mkdir()
    _one_line_error("aesthetic", folder, "missing sac+logos+ava1-l14-linearMSE.pth")
    (folder / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"garbage")
    _one_line_error("aesthetic", folder, "weights_only=True")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, folder / "sac+logos+ava1-l14-linearMSE.pth")
    _one_line_error("aesthetic", folder, "not the aesthetic MLP state dict")
