"""Makes the two tiny tokenizer folders the tokenizer tests load (run from the repository root):

    .venv/bin/python tests/data/make_tiny_tokenizers.py

- tiny-siglip-tokenizer/: like timm/ViT-B-16-SigLIP's (T5 SentencePiece Unigram): `T5Tokenizer`,
  `<pad>`=0, `</s>`=1 (end of text, and the pad token, as in big_vision: pad_value=1), `<unk>`=2, no
  beginning-of-text token, no sentinel (extra_id) tokens, Metaspace pieces ("▁word").
- tiny-siglip2-tokenizer/: like timm/ViT-B-16-SigLIP2's (Gemma SentencePiece BPE): `GemmaTokenizer`,
  `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4, then the 256 byte-fallback tokens `<0x00>`..`<0xFF>`;
  add_bos_token false, add_eos_token true, padded on the right.

The SigLIP one is trained with the `tokenizers` library's UnigramTrainer, the SigLIP2 one with the small
BPE trainer below, on the mixed-language corpus below (at most 1,000 pieces each, so that characters outside
it become `<unk>` or byte tokens); transformers' own tokenizer classes write them (`save_pretrained`), so
open_clip's HFTokenizer loads them offline like the hub ones.
The output is deterministic: run it twice and the files are equal.
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # the trainers' only source of run-to-run variation
os.environ["TOKENIZERS_PARALLELISM"] = "false"

HERE = Path(__file__).parent
PROMPTS = HERE.parent.parent / "qks" / "prompts" / "default.txt"

LABELS = ["cat", "dog", "car", "bird", "traffic light", "fire hydrant", "golden retriever", "sports car",
          "person", "bicycle", "mountain", "beach", "sunset", "street", "building", "tree", "flower", "food",
          "coffee", "boat", "airplane", "train", "horse", "sheep", "cow", "elephant", "giraffe", "zebra"]

SENTENCES = """\
a photo of a cat sitting on a red sofa in the living room
two dogs are running along the beach at sunset
the old town has narrow streets and colourful houses
ein Foto von einer Katze auf dem Sofa im Wohnzimmer
zwei Hunde laufen am Strand entlang, die Sonne geht unter
Straßenbahn, Fahrrad und Fußgänger in der Großstadt
une photo d'un chat assis sur un canapé rouge
deux chiens courent le long de la plage au coucher du soleil
le café est servi avec une crème brûlée et des fraises
una foto de un perro jugando en el parque con niños
la ciudad antigua tiene calles estrechas y casas de colores
фотография кошки, сидящей на красном диване
две собаки бегут по пляжу на закате солнца
в старом городе узкие улицы и разноцветные дома
一只猫坐在客厅的红色沙发上
两只狗在日落时沿着海滩奔跑
東京タワーの近くで寿司を食べました
猫がソファの上で寝ています
صورة قطة تجلس على أريكة حمراء
كلبان يركضان على الشاطئ عند غروب الشمس
고양이가 소파 위에 앉아 있습니다
Ελληνικά: μια φωτογραφία μιας γάτας στον καναπέ
Türkçe: kanepede oturan bir kedinin fotoğrafı
Tiếng Việt: một bức ảnh con mèo ngồi trên ghế sofa
naïve résumé, Ångström, Ñandú, São Paulo, Zürich, Kraków
numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3d 4x4
"""


def corpus() -> list[str]:
    """Prompt templates with labels, and the sentences above; lowercased and without ASCII punctuation,
    as open_clip's clean="canonicalize" leaves text."""
    drop = str.maketrans("", "", string.punctuation)
    templates = [ln.strip() for ln in PROMPTS.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.startswith("#")]
    lines = [t.format(label) for t in templates for label in LABELS[:6]]
    lines += [s for s in SENTENCES.splitlines() if s] * 4
    return [" ".join(ln.replace("_", " ").translate(drop).lower().split()) for ln in lines]


def make_siglip(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=1000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      max_piece_length=8, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    # The trainer orders equally frequent pieces, and scores them in the 4th decimal, in hash order, which
    # changes from run to run: rounded scores and a sorted order make the files reproducible.
    trained = [(piece, round(score, 2)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    specials, rest = trained[:3], sorted(trained[3:], key=lambda ps: (-ps[1], ps[0]))
    vocab = specials + rest
    # open_clip's SigLipTokenizer: T5 with no sentinels, end of text `</s>` and pad id 1 (= `</s>`).
    hf = T5Tokenizer(vocab=vocab, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                     model_max_length=64)
    hf.save_pretrained(out)


def make_siglip2(out: Path) -> None:
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    alphabet, merges = train_bpe(corpus(), vocab_size=1000 - len(specials) - 256, alphabet_size=150)
    # Gemma's layout: the special tokens, the 256 byte-fallback tokens, then the pieces.
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + alphabet + ["".join(m) for m in merges]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    hf = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True, padding_side="right",
                        model_max_length=64)
    hf.save_pretrained(out)


def train_bpe(lines: list[str], vocab_size: int, alphabet_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A plain BPE trainer over SentencePiece-style words ("▁" before every word but the first, as Gemma
    adds no dummy prefix). `tokenizers`' BpeTrainer breaks ties between equal counts in hash order, which
    changes from run to run; this one breaks them by the pair's text, so the files are reproducible."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        for i, w in enumerate(line.split(" ")):
            words[tuple(("▁" if i else "") + w)] += 1
    chars: Counter[str] = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    alphabet = [c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:alphabet_size]]
    known = set(alphabet)
    merges: list[tuple[str, str]] = []
    while len(alphabet) + len(merges) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:], strict=False):
                if a in known and b in known:
                    pairs[a, b] += n
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        known.add(a + b)
        words = Counter({_merge(w, a, b): n for w, n in words.items()})
    return alphabet, merges


def _merge(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def main() -> None:
    make_siglip(HERE / "tiny-siglip-tokenizer")
    make_siglip2(HERE / "tiny-siglip2-tokenizer")
    for d in ("tiny-siglip-tokenizer", "tiny-siglip2-tokenizer"):
        for f in sorted((HERE / d).iterdir()):
            print(f"{f.relative_to(HERE)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
