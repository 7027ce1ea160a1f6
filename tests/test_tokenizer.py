"""tokenizer.json (Hugging Face `tokenizers`) gives open_clip's token ids: the runtime computes new
labels with it, without Python's open_clip tokenizer."""

from __future__ import annotations

import json
import random

import pytest

open_clip = pytest.importorskip("open_clip")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    # plain words and multi-word labels
    "cat", "dog", "traffic light", "a photo of a golden retriever.", "there is a fire hydrant in the scene.",
    "Sports Car", "UPPER CASE LABEL", "mixedCase label",
    # punctuation and contractions
    "rock'n'roll", "it's", "they're", "we've", "i'm", "you'll", "he'd", "don't", "hello, world!",
    "t-shirt", "e.g. (parenthesised) [bracketed] {braced}", "a/b\\c", "#hashtag @mention", "50% off!!!",
    "ellipsis...", "quote \"double\" 'single'", "under_score", "a+b=c", "~tilde`",
    # digits
    "3d printer", "2024 olympics", "route 66", "1234567890", "0.5mm", "4x4 truck", "covid-19",
    # accented and non-Latin text
    "café", "naïve résumé", "Ñandú", "crème brûlée", "Ångström", "straße", "İstanbul", "ΟΔΟΣ", "Σ", "σοφία", "ΑΣ̳Α", "ΤΕΛΟΣ.", "争ͅΣ",
    "東京タワー", "寿司", "кошка", "Москва", "مرحبا", "שלום", "नमस्ते", "ภาษาไทย", "한국어", "Tiếng Việt",
    # emoji and symbols
    "😀", "😀 smile", "👨‍👩‍👧 family", "🇫🇷 flag", "☕️ coffee", "♥", "°C", "€100", "™ ©",
    # ftfy's character fixes, HTML entities, whitespace
    "“curly quotes”", "‘single curly’", "ﬁsh ﬂower", "ＡＢＣ１２３ full width", "AT&amp;T", "&amp;lt;tag&amp;gt;",
    "fish &amp; chips", "a&lt;b&gt;c", "&quot;quoted&quot;", "tab\tand\nnewline", "  leading and trailing  ",
    "non\u00a0breaking", "zero\u200bwidth", "line\u2028separator", "ctrl\x07char", "a\x1cb",
    # special tokens written as text
    "<start_of_text>", "<END_OF_TEXT> x", "<|endoftext|>",
    # empty and blank
    "", " ", "\n",
    # longer than the context (truncation keeps the end-of-text token)
    "a" * 300, " ".join(["word"] * 100), " ".join(f"label{i}" for i in range(80)), "🙂" * 100,
]

# What a `tokenizers` JSON cannot express (see qks/backbones/clip_tokenizer.py): ftfy's mojibake
# repair, HTML entities outside the common set, numeric character references. open_clip repairs
# these, tokenizer.json leaves them as they are.
KNOWN_DIFFERENT = ["cafÃ©", "&eacute;", "&#233;", "âœ” done"]


@pytest.fixture(scope="module")
def clip_tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_backbone):
    return tokenizers.Tokenizer.from_str(tiny_backbone.tokenizer_json())


def _ids(tok, texts):
    return [e.ids for e in tok.encode_batch(texts)]


def test_corpus_ids_equal_open_clip(clip_tokenizer, hf_tokenizer, tiny_backbone):
    expected = clip_tokenizer(CORPUS).tolist()
    got = _ids(hf_tokenizer, CORPUS)
    mismatches = [(text, e, g) for text, e, g in zip(CORPUS, expected, got, strict=True) if e != g]
    assert not mismatches, mismatches[:3]
    # the backbone's own tokenize() is the same tokenizer
    assert tiny_backbone.tokenize(CORPUS).tolist() == expected


def test_shape_truncation_and_padding(clip_tokenizer, hf_tokenizer, tiny_backbone):
    T = tiny_backbone.context_length
    sot, eot = clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id
    for text in ("", "cat", "a" * 300, " ".join(["word"] * 100)):
        ids = hf_tokenizer.encode(text).ids
        assert len(ids) == T
        assert ids[0] == sot
        assert eot in ids
        end = ids.index(eot)
        assert all(i == 0 for i in ids[end + 1:])  # padded with 0 after end-of-text
    long = hf_tokenizer.encode(" ".join(["word"] * 100)).ids
    assert long[-1] == eot and 0 not in long  # truncated: the last position is end-of-text
    assert hf_tokenizer.encode("").ids[:3] == [sot, eot, 0]


def test_seeded_fuzz_equal_open_clip(clip_tokenizer, hf_tokenizer):
    """Random strings over many scripts, symbols, combining marks and emoji. C1 control characters
    are left out: ftfy reads them as mojibake and repairs the text (a known difference)."""
    rng = random.Random(1234)
    ranges = [(0x20, 0x7F), (0xA0, 0x250), (0x300, 0x370), (0x370, 0x400), (0x400, 0x500), (0x590, 0x700),
              (0x900, 0x980), (0x1E00, 0x2000), (0x2000, 0x2070), (0x3040, 0x3100), (0x4E00, 0x4F00),
              (0xAC00, 0xAD00), (0xFF00, 0xFFF0), (0x1F300, 0x1F650)]
    texts = ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 16)))
             for _ in range(3000)]
    expected = clip_tokenizer(texts).tolist()
    got = _ids(hf_tokenizer, texts)
    mismatches = [t for t, e, g in zip(texts, expected, got, strict=True) if e != g]
    assert not mismatches, [ascii(t) for t in mismatches[:5]]


def test_known_differences_are_still_different(clip_tokenizer, hf_tokenizer):
    """Documented limits of tokenizer.json (mojibake repair, rare HTML entities): if a change makes
    them equal, update the documentation in clip_tokenizer.py and move them into the corpus."""
    expected = clip_tokenizer(KNOWN_DIFFERENT).tolist()
    got = _ids(hf_tokenizer, KNOWN_DIFFERENT)
    assert all(e != g for e, g in zip(expected, got, strict=True))


def test_json_is_plain_tokenizers_format(tiny_backbone):
    data = json.loads(tiny_backbone.tokenizer_json())
    assert data["model"]["type"] == "BPE"
    assert data["model"]["end_of_word_suffix"] == "</w>"
    assert len(data["model"]["vocab"]) == 49408
    assert data["truncation"]["max_length"] == tiny_backbone.context_length
    assert data["padding"]["strategy"] == {"Fixed": tiny_backbone.context_length}
    assert data["padding"]["pad_id"] == 0
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    ids = tok.encode("a photo of a cat.").ids
    eot = data["model"]["vocab"]["<end_of_text>"]
    # padding is id 0 ("!"), so decode up to the end-of-text token; special tokens are skipped
    assert tok.decode(ids[:ids.index(eot) + 1]).strip() == "a photo of a cat ."
