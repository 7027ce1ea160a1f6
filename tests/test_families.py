"""The whole chain for every open_clip image-tower family, on tiny random-weight configs (tests/data):
qks-train one epoch, export (fp32, FP16, INT8 with their gates), qks-infer equal to PyTorch, qks-tag
equal to qks-infer; and the same for the zero-shot bundle of each backbone, whose PyTorch reference is
open_clip's own `encode_image`/`encode_text` and the family's scoring rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cpp_fixtures import BUILD, compare_records, run_tool, skip_reason
from PIL import Image
from qks.runtime.cli import _infer as infer_command  # the click command behind qks-infer

from qks.cli import train_main

DATA = Path(__file__).parent / "data"
# family -> tiny open_clip model config (each builds in seconds with random weights)
FAMILIES = {
    "openclip-vit": "qks-tiny-vit.json",  # OpenAI-style ViT (CLS pooled)
    "siglip": "qks-tiny-siglip.json",  # timm ViT with MAP pooling, Unigram tokenizer, sigmoid scoring
    "siglip2": "qks-tiny-siglip2.json",  # the same tower with a Gemma-style BPE tokenizer
    "mobileclip": "qks-tiny-mobileclip.json",  # timm FastViT, reparameterized
    "eva": "qks-tiny-eva.json",  # timm EVA02
    "convnext": "qks-tiny-convnext.json",  # timm ConvNeXt with open_clip's linear projection
    "resnet": "qks-tiny-resnet.json",  # open_clip ModifiedResNet with attention pooling
}
SEEN = ["red", "green", "blue", "square"]
UNSEEN = ["circle", "yellow"]
ZERO_SHOT_LABELS = ["cat", "dog", "a red car", "Straße", "猫", "tree"]
TOL = 1e-4  # probabilities, qks-infer (fp32 graph) against PyTorch


def spec(family: str) -> str:
    return f"openclip:{DATA / FAMILIES[family]}:none"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """12 training images with labels, and 6 photos of several sizes and formats to tag."""
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "photos").mkdir()
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        labels = [lab for lab in SEEN if rng.random() < 0.5] or ["red"]
        lines.append(json.dumps({"image": f"img/{i}.png", "labels": labels}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "seen.txt").write_text("\n".join(SEEN) + "\n")
    (root / "unseen.txt").write_text("\n".join(UNSEEN) + "\n")
    (root / "pool.txt").write_text("a photo of a {}.\nthere is a {} in the scene.\n")
    (root / "animals.txt").write_text("\n".join(ZERO_SHOT_LABELS) + "\n", encoding="utf-8")
    for i, (w, h, ext) in enumerate([(300, 200, "jpg"), (120, 340, "png"), (64, 64, "jpg"), (500, 90, "png"),
                                     (257, 255, "jpg"), (31, 47, "png")]):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 255 // w), (y * 255 // h), rng.integers(0, 256, (h, w))], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(root / "photos" / f"{i}.{ext}", quality=92)
    return root


@pytest.fixture(scope="module")
def bundles(ds, tmp_path_factory):
    """family -> {"trained": bundle, "zero-shot": bundle, "ckpt": best.pt}, built once per family on use."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = _build(family, ds, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _build(family: str, ds: Path, work: Path) -> dict:
    from qks.export.bundle import export_bundle, export_zero_shot

    args = ["--data", str(ds / "train.jsonl"), "--seen", str(ds / "seen.txt"), "--unseen", str(ds / "unseen.txt"),
            "--backbone", spec(family), "--out", str(work / "run"), "--layers", "1", "--queries", "2",
            "--heads", "4", "--ffn", "32", "--batch-size", "6", "--lr", "1e-3", "--val-fraction", "0.25",
            "--prompts", str(ds / "pool.txt"), "--workers", "0", "--quiet", "--epochs", "1", "--cached-tokens"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    ckpt = work / "run" / "best.pt"
    trained = export_bundle(ckpt, work / "trained", fp16=True, int8=True, calibration_images=ds / "photos")
    zero_shot = export_zero_shot(spec(family), work / "zero-shot", labels={"animals": ZERO_SHOT_LABELS},
                                 fp16=True, int8=True, calibration_images=ds / "photos")
    return {"trained": trained, "zero-shot": zero_shot, "ckpt": ckpt}


def qks_infer(bundle: Path, photos: Path, *extra) -> str:
    result = CliRunner().invoke(infer_command, [str(photos), "--bundle", str(bundle), "--all-scores", "--no-progress",
                                             "--threads", "1", *extra])
    assert result.exit_code == 0, result.output
    return result.stdout


def scores_of(text: str) -> dict[str, dict[str, float]]:
    return {r["image"]: r["scores"] for r in map(json.loads, text.splitlines())}


def torch_pixels(backbone, photos: Path) -> tuple[list[str], torch.Tensor]:
    """The photos through the training transform (PyTorch's side of the comparison)."""
    from qks.images import open_rgb
    from qks.transforms import eval_transform

    names = sorted(p.name for p in photos.iterdir())
    transform = eval_transform(backbone.preprocess)
    return names, torch.stack([transform(open_rgb(photos / n)) for n in names])


def assert_close(got: dict, names: list[str], labels: list[str], probs: np.ndarray) -> None:
    assert sorted(got) == names
    for i, name in enumerate(names):
        assert list(got[name]) == labels
        diff = np.abs(np.array([got[name][lab] for lab in labels]) - probs[i])
        assert diff.max() <= TOL, (name, diff.max())


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_bundle_scores_like_pytorch(family, bundles, ds):
    from qks.runtime.bundle import Bundle

    from qks.checkpoint import model_from_checkpoint

    b = bundles(family)
    manifest = Bundle.load(b["trained"]).manifest
    assert manifest["model"]["family"] == ("timm" if family in ("siglip", "siglip2", "mobileclip", "eva", "convnext")
                                           else "modified-resnet" if family == "resnet" else "openclip-vit")
    assert {"image_encoder_fp16", "image_encoder_int8"} <= set(manifest["graphs"])  # both passed their gates
    model = model_from_checkpoint(b["ckpt"]).eval()
    names, pixels = torch_pixels(model.backbone, ds / "photos")
    bank = np.load(b["trained"] / "labels" / "default.npy")
    with torch.no_grad():
        probs = torch.sigmoid(model.logits(model.query_features(pixels), torch.from_numpy(bank))).numpy()
    got = scores_of(qks_infer(b["trained"], ds / "photos", "--precision", "fp32"))
    assert_close(got, names, SEEN + UNSEEN, probs)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_shot_bundle_scores_like_open_clip(family, bundles, ds):
    """The zero-shot bundle against open_clip itself: sigmoid(scale * cos(image, text) + bias), SigLIP with
    its learned bias, CLIP-trained models centred at CLIP_CENTRE."""
    from qks.backbones import create_backbone

    b = bundles(family)
    manifest = json.loads((b["zero-shot"] / "manifest.json").read_text())
    rule = manifest["scoring"]["zero_shot"]
    sigmoid_trained = family.startswith("siglip")
    assert rule["trained_with"] == ("sigmoid" if sigmoid_trained else "softmax")
    assert rule["calibrated"] is sigmoid_trained
    assert manifest["default_bank"] == "animals" and manifest["model"]["kind"] == "zero-shot"
    from qks.backbones.openclip import CLIP_CENTRE

    backbone = create_backbone(spec(family))
    clip = backbone.model
    templates = (b["zero-shot"] / "prompts.txt").read_text().splitlines()
    assert templates == ["a photo of a {}."]
    names, pixels = torch_pixels(backbone, ds / "photos")
    with torch.no_grad():
        image = clip.encode_image(pixels, normalize=True)
        text = clip.encode_text(backbone.tokenize([templates[0].format(lab) for lab in ZERO_SHOT_LABELS]), normalize=True)
        scale = clip.logit_scale.exp()
        bias = clip.logit_bias if sigmoid_trained else -scale * CLIP_CENTRE
        probs = torch.sigmoid(scale * image @ text.T + bias).numpy()
    got = scores_of(qks_infer(b["zero-shot"], ds / "photos", "--precision", "fp32"))
    assert_close(got, names, ZERO_SHOT_LABELS, probs)


@pytest.mark.parametrize("kind", ["trained", "zero-shot"])
@pytest.mark.parametrize("family", FAMILIES)
def test_qks_tag_equals_qks_infer(family, kind, bundles, ds):
    if skip_reason():
        pytest.skip(skip_reason())
    bundle = bundles(family)[kind]
    for precision in ("fp32", "int8"):
        py = qks_infer(bundle, ds / "photos", "--precision", precision, "--batch-size", "4")
        cpp = run_tool(BUILD, "qks-tag", [ds / "photos", "--bundle", bundle, "--all-scores", "--no-progress",
                                          "--precision", precision, "--batch-size", "4", "--threads", "1"])
        assert cpp.returncode == 0, cpp.stderr
        compare_records(cpp.stdout, py)


def test_zero_shot_export_from_the_command_line(ds, tmp_path):
    """`qks-export --zero-shot` without labels gets the everyday bank and says so; bad combinations of
    options are one line each."""
    from qks.export.cli import main

    out = tmp_path / "zs"
    result = CliRunner().invoke(main, ["--zero-shot", "--backbone", spec("openclip-vit"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "everyday labels" in result.output and "not calibrated" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["default_bank"] == "default" and manifest["label_banks"]["default"]["count"] > 100
    got = scores_of(qks_infer(out, ds / "photos", "--labels", str(ds / "animals.txt")))
    assert all(list(s) == ZERO_SHOT_LABELS for s in got.values())
    for args, words in [([], "give --ckpt"), (["--zero-shot"], "needs --backbone"),
                        (["--zero-shot", "--backbone", spec("openclip-vit"), "--ckpt", "x.pt"], "not --ckpt"),
                        (["--ckpt", "x.pt", "--backbone", "lite"], "goes with --zero-shot"),
                        (["--zero-shot", "--backbone", "openclip:no-such-arch:none"], "unknown open_clip architecture"),
                        (["--zero-shot", "--backbone", spec("openclip-vit"), "--prompts", str(tmp_path / "none.txt")],
                         "prompt pool")]:
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 1 and words in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_unsupported_tower_is_one_line():
    from torch import nn

    from qks.backbones.towers import tower_for

    with pytest.raises(ValueError, match=r"^some-arch: image tower Sequential is not supported \(supported families"):
        tower_for(nn.Sequential(), "some-arch")


def test_vit_tokens_unchanged_for_existing_checkpoints(tiny_backbone):
    """Heads trained before the adapters read open_clip ViT tokens computed as `ln_post(transformer(
    _embeds(x)))`; the adapter (public `forward_intermediates`) must give them exactly."""
    visual = tiny_backbone.model.visual
    x = torch.randn(3, 3, tiny_backbone.preprocess.size, tiny_backbone.preprocess.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = visual.ln_post(visual.transformer(visual._embeds(x)))
        assert torch.equal(tiny_backbone.image_tokens(x), old)
        old_pooled = old[:, 0] @ visual.proj
        assert torch.allclose(tiny_backbone.zero_shot_features(old)[:, 0], torch.nn.functional.normalize(old_pooled, dim=-1))


def test_clip_rule_keeps_real_cosines_apart_in_float32(tiny_backbone, monkeypatch):
    """With real CLIP weights (scale 100, image-text cosines 0.1-0.35) `sigmoid(100 * cos)` is exactly 1.0
    in float32 for every relevant label and top-k cannot rank them; the centred rule keeps them apart."""
    monkeypatch.setattr(tiny_backbone.model.logit_scale, "data", torch.tensor(np.log(100.0)))
    rule = tiny_backbone.zero_shot_rule()
    assert rule.trained_with == "softmax" and not rule.calibrated
    cos = np.linspace(0.10, 0.36, 27, dtype=np.float32)
    probs = 1 / (1 + np.exp(-(np.float32(rule.scale) * cos + np.float32(rule.bias))))
    assert (np.diff(probs) > 0).all() and probs.max() < 1.0
    assert (1 / (1 + np.exp(-np.float32(rule.scale) * cos)) == 1.0).sum() > 10  # what the plain scale did


# timm and open_clip towers beyond the tiny family configs: each adapter's pooled embedding must be the
# tower's own (`encode_image`). Small random-weight configs that build in seconds.
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TOWER_CONFIGS = {
    "vit-avg-pool": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8, "pool_type": "avg"},
    "vit-final-ln-after-pool": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                                "final_ln_after_pool": True},
    "coca-attention-pool": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8,
                            "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8},
    "timm-vit-avg-fc-norm": {"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "avg", "timm_proj": "linear"},
    "timm-swin-nhwc": {"image_size": 224, "timm_model_name": "swin_tiny_patch4_window7_224", "timm_pool": "avg",
                       "timm_proj": "linear"},
    "timm-resnet-mlp": {"image_size": 160, "timm_model_name": "test_resnet", "timm_pool": "avg", "timm_proj": "mlp"},
}


@pytest.mark.parametrize("name", TOWER_CONFIGS)
def test_adapter_pools_like_encode_image(name, tmp_path):
    from qks.backbones import create_backbone

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": TOWER_CONFIGS[name], "text_cfg": TEXT}))
    backbone = create_backbone(f"openclip:{path}:none")
    size = backbone.preprocess.size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = backbone.image_tokens(x)
        got = backbone.zero_shot_features(tokens)[:, 0]
        want = backbone.model.encode_image(x, normalize=True)
    assert tokens.shape[-1] == backbone.token_dim and got.shape[-1] == backbone.embed_dim
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    proj = backbone.projection()
    assert proj is None or tuple(proj.shape) == (backbone.token_dim, backbone.embed_dim)


def test_colon_in_a_config_path(tmp_path):
    from qks.backbones import create_backbone

    path = tmp_path / "with:colon.json"
    path.write_text((DATA / "qks-tiny-vit.json").read_text())
    assert create_backbone(f"openclip:{path}:none").spec == f"openclip:{path}:none"
