"""The QKS model on a tiny random-initialised open_clip ViT (no downloads)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import TINY_SPEC, tiny_model_config

from qks.backbones import create_backbone
from qks.config import RECIPES, HeadConfig, ModelConfig
from qks.head import QueryHead
from qks.model import QKSModel
from qks.prompts import LabelEmbedder, load_prompts
from qks.scoring import score


def test_image_tokens_pool_to_open_clip_encode_image(tiny_backbone):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tiny_backbone.image_tokens(pixels)
    assert tokens.shape == (3, 1 + (32 // 8) ** 2, 64)  # CLS + 4x4 patches, width 64
    pooled = tokens[:, 0] @ tiny_backbone.projection()
    reference = tiny_backbone.model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)


def test_random_init_is_the_same_model_every_time(tiny_backbone):
    again = create_backbone(TINY_SPEC)
    assert again.text_fingerprint() == tiny_backbone.text_fingerprint()
    torch.testing.assert_close(again.projection(), tiny_backbone.projection())


def test_drop_cls_option(tiny_backbone):
    """image_tokens keeps CLS (what --cached-tokens stores, what CLIP's zero-shot needs); the head
    reads the patch tokens alone."""
    torch.manual_seed(0)
    model = QKSModel(ModelConfig.from_dict({**tiny_model_config().to_dict(), "drop_cls": True}), tiny_backbone).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.image_tokens(x)
    assert tokens.shape[1] == 17
    with torch.no_grad():
        torch.testing.assert_close(model.query_features(x), model.head(tokens[:, 1:]), rtol=0, atol=0)
        assert not torch.allclose(model.head(tokens[:, 1:]), model.head(tokens[:, :16]))


def test_openclip_zero_shot_features_are_clip_image_embeddings(tiny_backbone):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z = tiny_backbone.zero_shot_features(tiny_backbone.image_tokens(x))
        ref = tiny_backbone.model.encode_image(x, normalize=True)
    assert z.shape == (3, 1, tiny_backbone.embed_dim)
    torch.testing.assert_close(z[:, 0], ref, rtol=1e-5, atol=1e-6)


def _zero_shot_model(backbone, weight: float, **head):
    torch.manual_seed(0)
    model = QKSModel(tiny_model_config(zero_shot=True, **head), backbone).eval()
    model.head.zero_shot_weight.fill_(weight)
    model.head.zero_shot_offset.copy_(torch.randn(backbone.embed_dim) * 0.1)
    return model


def test_zero_shot_term_adds_the_backbone_scores(tiny_backbone):
    """logit = head's + w * (backbone's zero-shot - the offset's score); the deployed pairs give the same
    logits by one max."""
    model = _zero_shot_model(tiny_backbone, 3.5)
    plain = QKSModel(tiny_model_config(), tiny_backbone).eval()
    plain.head.load_state_dict({k: v for k, v in model.head.state_dict().items() if not k.startswith("zero_shot")})
    x = torch.randn(4, 3, 32, 32)
    emb = torch.randn(6, tiny_backbone.embed_dim)
    with torch.no_grad():
        tokens = model.image_tokens(x)
        head, zs = model.logit_parts(tokens, emb)
        torch.testing.assert_close(head, plain.logits(plain.query_features(x), emb))
        z = tiny_backbone.model.encode_image(x, normalize=True)
        torch.testing.assert_close(zs, (z - model.head.zero_shot_offset) @ emb.T, rtol=1e-5, atol=1e-5)
        pairs = model.query_features(x)
        assert pairs.shape == (4, 4 * 1, tiny_backbone.embed_dim)  # Nq x M (CLIP: one image embedding)
        torch.testing.assert_close(model.logits(pairs, emb), head + 3.5 * zs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, emb), head + 3.5 * zs, rtol=1e-5, atol=1e-5)


def test_zero_shot_offset_centres_the_term(tiny_backbone):
    """The offset makes the added term zero on average over the images it was measured on."""
    model = _zero_shot_model(tiny_backbone, 1.0)
    emb = torch.randn(7, tiny_backbone.embed_dim) + 0.5
    with torch.no_grad():
        feats = model.zero_shot_features(model.image_tokens(torch.randn(16, 3, 32, 32)))
    model.set_zero_shot_offset(feats, emb)
    _, zs = model.logit_parts(model.image_tokens(torch.randn(1, 3, 32, 32)), emb)
    with torch.no_grad():
        centred = score(feats, emb) - model.head.zero_shot_offset @ emb.T
    assert abs(centred.mean().item()) < 1e-5 and zs.shape == (1, 7)
    # With one feature per image (CLIP) the offset is exactly their mean.
    torch.testing.assert_close(model.head.zero_shot_offset, feats.mean(dim=(0, 1)), rtol=1e-4, atol=1e-6)


def test_zero_shot_weight_is_a_checkpointed_buffer_not_a_parameter(tiny_backbone):
    model = _zero_shot_model(tiny_backbone, 2.0)
    assert {"zero_shot_weight", "zero_shot_offset"} <= set(model.head_state_dict())
    assert not {"zero_shot_weight", "zero_shot_offset"} & set(dict(model.head.named_parameters()))
    with pytest.raises(ValueError, match="max scoring"):
        QKSModel(ModelConfig(backbone=TINY_SPEC, head=HeadConfig(layers=1, queries=2, heads=4, ffn=32, zero_shot=True),
                             scoring="topk", scoring_k=2), tiny_backbone)


def test_label_embedding_is_mean_of_encode_text_over_pool(tiny_backbone):
    templates = load_prompts()
    assert len(templates) == 85 and all(t.count("{}") == 1 for t in templates)
    emb = LabelEmbedder(tiny_backbone, templates)(["dog", "traffic light"])
    assert emb.shape == (2, tiny_backbone.embed_dim)
    tok = open_clip.get_tokenizer("qks-tiny-vit")  # registered by the backbone from the JSON
    with torch.no_grad():
        for i, label in enumerate(["dog", "traffic light"]):
            feats = tiny_backbone.model.encode_text(tok([t.format(label) for t in templates]), normalize=False)
            torch.testing.assert_close(emb[i], feats.mean(0), rtol=1e-5, atol=1e-6)
    # The mean is unnormalised: its norm is not 1.
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-3)


def test_label_embedding_cache_on_disk(tiny_backbone, tmp_path):
    templates = ["a photo of a {}."]
    first = LabelEmbedder(tiny_backbone, templates, cache_dir=tmp_path)(["cat"])
    assert len(list(tmp_path.glob("*.npy"))) == 1
    second = LabelEmbedder(tiny_backbone, templates, cache_dir=tmp_path)
    second._compute = lambda label: pytest.fail("cached label was recomputed")
    torch.testing.assert_close(second(["cat"]), first)
    # Another pool is another key.
    LabelEmbedder(tiny_backbone, ["a {}."], cache_dir=tmp_path)(["cat"])
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_bad_prompt_pool(tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("a photo of a thing.\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_prompts(str(pool))


def test_scoring_equals_brute_force():
    torch.manual_seed(1)
    qf, emb = torch.randn(3, 5, 8), torch.randn(7, 8)
    got_max, got_top2 = score(qf, emb, "max"), score(qf, emb, "topk", k=2)
    for b in range(3):
        for lab in range(7):
            dots = sorted((float(qf[b, q] @ emb[lab]) for q in range(5)), reverse=True)
            assert got_max[b, lab].item() == pytest.approx(dots[0], abs=1e-5)
            assert got_top2[b, lab].item() == pytest.approx(dots[0] + dots[1], abs=1e-5)
    with pytest.raises(ValueError):
        score(qf, emb, "mean")


def test_head_shapes_recipes_and_no_unused_parameters(tiny_backbone):
    assert (RECIPES["nuswide"].layers, RECIPES["nuswide"].queries) == (7, 12)
    assert (RECIPES["openimages"].layers, RECIPES["openimages"].queries) == (8, 22)
    model = QKSModel(tiny_model_config(), tiny_backbone)
    qf = model.query_features(torch.randn(2, 3, 32, 32))
    assert qf.shape == (2, 4, 32)
    qf.sum().backward()
    unused = [n for n, p in model.head.named_parameters() if p.grad is None]
    assert unused == []
    # The projection starts as the backbone's own visual projection.
    torch.testing.assert_close(QKSModel(tiny_model_config(), tiny_backbone).head.projection.detach(),
                               tiny_backbone.projection())


def test_head_with_other_width_adapts_tokens():
    head = QueryHead(HeadConfig(layers=1, queries=3, width=16, heads=2, ffn=32), token_dim=24, embed_dim=8)
    out = head(torch.randn(2, 5, 24))
    assert out.shape == (2, 3, 8)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_only_head_gets_gradients_and_backbone_stays_eval(tiny_backbone):
    model = QKSModel(tiny_model_config(), tiny_backbone)
    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    emb = torch.randn(5, 32)
    logits = model(torch.randn(2, 3, 32, 32), emb)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_config_round_trips_through_json():
    cfg = ModelConfig(backbone=TINY_SPEC, head=HeadConfig(layers=3, queries=5, width=64, heads=4),
                      scoring="topk", scoring_k=2)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["head"]["queries"] == 5


def test_unknown_backbone_and_arch():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("nosuch:thing")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        create_backbone("openclip:NoSuchArch:none")
    with pytest.raises(FileNotFoundError):
        create_backbone("openclip:/does/not/exist.json:none")


def test_projection_only_head_scores_every_token():
    """layers=0 is the projection-only ablation: no queries, every image token projected to D."""
    head = QueryHead(HeadConfig(layers=0, queries=3, heads=2, ffn=16), token_dim=8, embed_dim=8,
                     projection=torch.eye(8))
    assert not hasattr(head, "queries") and head.memory_norm is None and len(head.layers) == 0
    tokens = torch.randn(2, 5, 8)
    assert torch.equal(head(tokens), tokens)  # identity projection: the tokens themselves, [B, N, D]
    narrow = QueryHead(HeadConfig(layers=0, width=4, heads=2), token_dim=8, embed_dim=6)
    out = narrow(tokens)
    assert out.shape == (2, 5, 6)
    out.sum().backward()
    assert all(p.grad is not None for p in narrow.parameters())
    with pytest.raises(ValueError, match="layers must be >= 0"):
        QueryHead(HeadConfig(layers=-1), token_dim=8, embed_dim=8)


def test_memory_norm_makes_the_head_blind_to_token_scale():
    """With memory_norm the decoder reads LayerNormed tokens: the lite backbone's small-scale tokens
    (about 0.04 a dimension) count as much as unit-scale ones. Without it they do not."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 16)
    for memory_norm in (True, False):
        torch.manual_seed(1)
        head = QueryHead(HeadConfig(layers=1, queries=3, heads=2, ffn=32, memory_norm=memory_norm),
                         token_dim=16, embed_dim=8).eval()
        # LayerNorm's eps (1e-5) leaves a small difference at this scale; without it, a large one.
        diff = (head(tokens) - head(0.04 * tokens)).abs().max().item()
        assert (diff < 0.01) == memory_norm, diff


def test_old_configs_and_runs_load_without_memory_norm():
    """Checkpoints and runs written before memory_norm existed were trained without it."""
    from qks.train import TrainOptions

    old = json.loads(ModelConfig(backbone=TINY_SPEC).to_json())
    del old["head"]["memory_norm"]
    assert ModelConfig.from_dict(old).head.memory_norm is False
    assert ModelConfig().head.memory_norm is True and RECIPES["nuswide"].memory_norm is True
    opts = TrainOptions(data="d", seen="s", out="o").to_dict()
    del opts["memory_norm"]
    assert TrainOptions.from_dict(opts).memory_norm is False
