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
                                 fp16=True, int8=True, calibration_images=ds / "photos").path
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
    """The zero-shot bundle against open_clip itself: sigmoid(scale * cos(image, mean of normalised prompt
    embeddings) + bias), SigLIP with its learned bias and one prompt, the others with their pool."""
    from qks.backbones import create_backbone

    b = bundles(family)
    manifest = json.loads((b["zero-shot"] / "manifest.json").read_text())
    rule = manifest["scoring"]["zero_shot"]
    sigmoid_trained = family.startswith("siglip")
    assert rule["trained_with"] == ("sigmoid" if sigmoid_trained else "softmax")
    assert rule["calibrated"] is sigmoid_trained
    assert manifest["default_bank"] == "animals" and manifest["model"]["kind"] == "zero-shot"
    backbone = create_backbone(spec(family))
    clip = backbone.model
    templates = (b["zero-shot"] / "prompts.txt").read_text().splitlines()
    assert len(templates) == (1 if sigmoid_trained else 85)
    names, pixels = torch_pixels(backbone, ds / "photos")
    with torch.no_grad():
        image = clip.encode_image(pixels, normalize=True)
        text = torch.stack([clip.encode_text(backbone.tokenize([t.format(lab) for t in templates]), normalize=True)
                            .mean(0) for lab in ZERO_SHOT_LABELS])
        bias = clip.logit_bias if sigmoid_trained else 0.0
        probs = torch.sigmoid(clip.logit_scale.exp() * image @ text.T + bias).numpy()
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
