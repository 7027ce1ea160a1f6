"""tokenizer.json for open_clip's Hugging Face tokenizers (SigLIP, SigLIP2) gives open_clip's ids.

The real tokenizers come from the hub; here two tiny ones made the same way stand in for them
(tests/data/make_tiny_tokenizers.py): a T5-style SentencePiece Unigram (SigLIP) and a Gemma-style BPE
with byte fallback (SigLIP2), both loaded offline by open_clip's HFTokenizer with SigLIP's settings.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import open_clip
import pytest
from open_clip.tokenizer import HFTokenizer
from test_tokenizer import CORPUS as CLIP_CORPUS
from tokenizers import Tokenizer

from qks.backbones.hf_tokenizer import build_hf_tokenizer_json, tokenizer_json_for
from qks.prompts import load_prompts

DATA = Path(__file__).parent / "data"
SIGLIP = DATA / "tiny-siglip-tokenizer"
SIGLIP2 = DATA / "tiny-siglip2-tokenizer"
T = 64  # SigLIP/SigLIP2's context length

CORPUS = [
    # German, French, Chinese, Japanese, Russian, Arabic, Korean, Greek, Turkish
    "Ein Foto von einer Katze", "Straßenbahn und Fußgänger", "GROSSE Übung", "une photo d'un chat",
    "crème brûlée à la française", "l'été dernier", "一只猫坐在沙发上", "东京塔", "東京タワーの近くで寿司",
    "ｶﾀｶﾅ half width", "фотография кошки", "Москва, Россия!", "صورة قطة", "مرحبا بالعالم", "고양이", "ΟΔΟΣ ΣΟΦΙΑ",
    "Türkçe İstanbul", "naïve résumé Ångström Ñandú",
    # emoji, punctuation only, strings the cleaning empties
    "😀", "😀 smile 👨‍👩‍👧 family 🇫🇷", "☕️ coffee", "!!!", "...", "?!,;:", "___", "-_-", "", " ", "\t\n", "&amp;",
    "\"'\"", "()[]{}<>",
    # underscores, mixed case, accents, digits, HTML entities, ftfy's fixes
    "fire_hydrant", "under_score_label", "CamelCase Label", "MiXeD cAsE", "ÉCOLE élève", "Ça va", "3D printer",
    "route 66", "covid-19", "AT&amp;T", "fish &amp; chips", "“curly quotes”", "ﬁsh ﬂower", "ＡＢＣ１２３",
    "non\u00a0breaking", "zero\u200bwidth", "a\u2028b",
    # special tokens written as text (open_clip's cleaning removes their punctuation)
    "</s>", "<pad>", "<eos> <bos>", "<unk> x", "<mask>", "<0x41>", "▁▁ x ▁", "a ▁b",
    # longer than the context: truncated, the end-of-text token kept
    "a " * 200, " ".join(f"word{i}" for i in range(100)), "猫" * 300, "😀" * 100,
] + CLIP_CORPUS

LABELS = ["cat", "traffic light", "fire_hydrant", "Golden Retriever", "T-shirt", "crème brûlée", "Katze",
          "chat noir", "кошка", "猫", "寿司", "قطة", "😀 smile", "rock'n'roll", ""]


def _fuzz(seed: int, n: int) -> list[str]:
    """Random strings over many scripts, symbols, combining marks and emoji (no C1 controls: ftfy
    reads those as mojibake and repairs the text, a documented difference)."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x400), (0x400, 0x500), (0x590, 0x700),
              (0x900, 0x980), (0x1E00, 0x2000), (0x2000, 0x2070), (0x2100, 0x2200), (0x3000, 0x3100),
              (0x4E00, 0x4F00), (0xAC00, 0xAD00), (0xFB00, 0xFB10), (0xFE30, 0xFE70), (0xFF00, 0xFFF0),
              (0x1F300, 0x1F650)]
    return ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def _hf(folder: Path, **kwargs) -> HFTokenizer:
    """open_clip's tokenizer for a SigLIP model whose hf_tokenizer_name is `folder`."""
    kwargs = {"context_length": T, "clean": "canonicalize", **kwargs}
    return HFTokenizer(str(folder), **kwargs)


def _mismatches(tok, texts: list[str]) -> list[str]:
    got = [e.ids for e in Tokenizer.from_str(tokenizer_json_for(tok)).encode_batch(texts)]
    return [ascii(t) for t, e, g in zip(texts, tok(texts).tolist(), got, strict=True) if e != g]


@pytest.fixture(scope="module", params=[SIGLIP, SIGLIP2], ids=["siglip", "siglip2"])
def siglip_tok(request) -> HFTokenizer:
    return _hf(request.param)


def test_corpus_and_prompts_equal_open_clip(siglip_tok):
    prompts = [t.format(label) for t in load_prompts() for label in LABELS]
    texts = CORPUS + prompts
    assert not _mismatches(siglip_tok, texts)


def test_seeded_fuzz_equal_open_clip(siglip_tok):
    assert not _mismatches(siglip_tok, _fuzz(1234, 2000))[:5]


def test_special_tokens_padding_and_truncation(siglip_tok):
    """SigLIP: `</s>` (1) ends the text and pads; SigLIP2: `<eos>` (1) ends it, `<pad>` (0) pads, no `<bos>`."""
    hf = siglip_tok.tokenizer
    tok = Tokenizer.from_str(tokenizer_json_for(siglip_tok))
    eos, pad = hf.eos_token_id, hf.pad_token_id
    assert (eos, pad) == ((1, 1) if "T5" in type(hf).__name__ else (1, 0))
    short = tok.encode("a photo of a cat").ids
    assert len(short) == T and short[0] != 2  # no beginning-of-text token
    assert eos in short and all(i == pad for i in short[short.index(eos) + 1:])
    long = tok.encode("cat " * 200).ids
    assert len(long) == T and long[-1] == eos and long.count(eos) == 1  # truncated, end kept
    assert tok.encode("!!!").ids == [eos] + [pad] * (T - 1)  # cleaned to nothing
    # characters outside the tiny vocabulary: SigLIP's `<unk>` (2), SigLIP2's byte tokens (5..260)
    rare = tok.encode("東京タワー 😀").ids
    assert 2 in rare if pad == 1 else any(5 <= i <= 260 for i in rare)
    data = json.loads(tokenizer_json_for(siglip_tok))
    assert data["padding"]["strategy"] == {"Fixed": T} and data["padding"]["pad_id"] == pad
    assert data["truncation"]["max_length"] == T
    assert data["model"]["type"] == ("Unigram" if pad == 1 else "BPE")
    # "</s>" typed in a label is cleaned to "s" by open_clip: never matched as the special token
    assert {t["content"] for t in data["added_tokens"]}.isdisjoint({"</s>", "<pad>", "<eos>", "<bos>"})


def test_model_normaliser_runs_after_cleaning(tmp_path):
    """A tokenizer.json with its own normaliser (the real SigLIP's is SentencePiece's NFKC charsmap): the
    cleaning goes first, then that normaliser, as in open_clip."""
    folder = tmp_path / "nfkc"
    shutil.copytree(SIGLIP, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads tokenizer.json as it is
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = _hf(folder, clean="whitespace")
    steps = json.loads(tokenizer_json_for(tok))["normalizer"]["normalizers"]
    assert steps[-1] == data["normalizer"]  # the model's own normaliser, last
    texts = CORPUS + ["① ② ³ ㎏", "ｶﾀｶﾅ", "ﬀ ﬃ", "Ⅻ", "﹤pad﹥ x"] + _fuzz(7, 500)
    assert not _mismatches(tok, texts)


def test_clean_modes_lower_and_whitespace():
    for clean in ("lower", "whitespace"):
        assert not _mismatches(_hf(SIGLIP2, clean=clean), CORPUS), clean


def test_strip_sep_token(tmp_path):
    """A BERT-style tokenizer with strip_sep_token (open_clip's bert-base-uncased models): the
    separator id becomes 0."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog", "photo", "of", "the", "a", "##s"]
    words += list("abcdefghijklmnopqrstuvwxyz.,!'-") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    tok = HFTokenizer(str(tmp_path), context_length=16, strip_sep_token=True)
    texts = ["a photo of a cat.", "Dogs", "", "x " * 30, "ÉCOLE", "[CLS] x"]
    assert not _mismatches(tok, texts)
    ids = Tokenizer.from_str(tokenizer_json_for(tok)).encode("cats").ids
    assert ids[0] == 2 and 3 not in ids
    # documented limit (hf_tokenizer.py): a separator written in the text keeps its id
    assert _mismatches(tok, ["x [SEP] y"])


def test_unsupported_tokenizers_raise_value_error():
    with pytest.raises(ValueError, match="tokenizer list is not supported"):
        tokenizer_json_for([])
    with pytest.raises(ValueError, match="tokenizer_mode 'clips'"):
        build_hf_tokenizer_json(_hf(SIGLIP, tokenizer_mode="clips"))
    odd = _hf(SIGLIP)
    odd.clean_fn = str.upper
    with pytest.raises(ValueError, match="clean function upper"):
        tokenizer_json_for(odd)
    with pytest.raises(ValueError, match="reduction masks"):
        tokenizer_json_for(open_clip.SimpleTokenizer(reduction_mask="simple"))


@pytest.mark.parametrize("arch", ["MobileCLIP2-S0", "EVA02-B-16", "convnext_base", "RN50", "coca_ViT-B-32"])
def test_clip_families_equal_open_clip(arch):
    """The other families use open_clip's CLIP tokenizer (offline), CoCa with context length 76."""
    tok = open_clip.get_tokenizer(arch)
    assert isinstance(tok, open_clip.SimpleTokenizer)
    texts = CLIP_CORPUS[:60] + [t.format(label) for t in load_prompts()[:20] for label in LABELS]
    assert not _mismatches(tok, texts)
    data = json.loads(tokenizer_json_for(tok))
    assert data["padding"]["strategy"] == {"Fixed": tok.context_length}
    assert tok.context_length == (76 if arch.startswith("coca") else 77)
