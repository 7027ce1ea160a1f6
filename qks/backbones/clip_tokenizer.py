"""open_clip's CLIP tokenizer (`SimpleTokenizer`) as a Hugging Face `tokenizers` JSON.

The deployed runtime (and C++) tokenizes label prompts with `tokenizers` from this JSON alone, so it
must give the ids `open_clip.get_tokenizer(arch)(texts)` gives:

- normaliser (open_clip's `clean="lower"`: `ftfy.fix_text`, `html.unescape` twice, whitespace
  collapse, `str.lower`): ftfy's character-level fixes from ftfy's own tables (C1 controls read as
  Windows-1252, Latin ligatures, full-width forms, curly quotes, line breaks, terminal escapes,
  control characters), NFC, the common HTML entities, Python's whitespace set collapsed to one
  space, strip, Greek final sigma, lowercase;
- pre-tokeniser: open_clip's regex (`'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`,
  matches kept, the rest dropped), then byte-level (GPT-2 byte -> unicode table, no prefix space);
- model: BPE over open_clip's vocabulary and merge ranks, end-of-word suffix `</w>`;
- post-processor: `<start_of_text> $A <end_of_text>`; truncation to `context_length` (the text is cut
  to T - 2 tokens, then SOT/EOT added: open_clip's "truncate, then set the last token to EOT");
  padding with id 0 to exactly `context_length`.

What a `tokenizers` JSON cannot express, and so differs from open_clip (rare in label text):
ftfy's mojibake repair (`fix_encoding`: "cafÃ©" -> "café"), HTML entities other than the common
ones listed in `HTML_ENTITIES` (and numeric references other than those), and ftfy's
HTML-unescape being skipped for text containing "<".
"""

from __future__ import annotations

import functools
import json

# Common named and numeric HTML references, decoded as `html.unescape` does. "&amp;" goes last so
# "&amp;lt;" -> "&lt;" -> "<" happens only through a second round (open_clip unescapes twice).
HTML_ENTITIES = [
    ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&#39;", "'"), ("&#x27;", "'"),
    ("&#34;", '"'), ("&nbsp;", "\u00a0"), ("&amp;", "&"),
]



@functools.lru_cache(maxsize=1)
def _py_whitespace() -> str:
    """Python's `str.split()` whitespace (what open_clip's `whitespace_clean` splits on)."""
    return "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


# open_clip's pre-tokenisation pattern (its special-token alternatives are handled as added tokens).
# Python skips case-ignorable characters first, then asks whether the next one is cased: a character
# that is both (U+0345) is skipped, hence "cased and not case-ignorable".
_C, _I = r"[\p{Cased}&&[^\p{Case_Ignorable}]]", r"[\p{Case_Ignorable}]"
FINAL_SIGMA = (f"(?<={_C}|{_C}{_I}|{_C}{_I}{{2}}|{_C}{_I}{{3}})\u03a3(?!{_I}*{_C})")

# The `'[sſ]` alternative: open_clip's regex runs with IGNORECASE, under which `'s` also matches the
# long s (the only lowercase-stable case variant of the contractions' letters).
CLIP_PATTERN = r"""'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _char_class(chars: str) -> str:
    """A regex character class matching exactly `chars` (each escaped as \\x{...})."""
    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in sorted(set(chars))) + "]"


def _replace(pattern: str, content: str, regex: bool = False) -> dict:
    key = "Regex" if regex else "String"
    return {"type": "Replace", "pattern": {key: pattern}, "content": content}


def _ftfy_normalizers() -> list[dict]:
    """ftfy.fix_text's character-level fixers, in ftfy's order, from ftfy's own tables."""
    import ftfy.chardata as cd
    import ftfy.fixes as fx

    steps: list[dict] = []
    # fix_c1_controls: a C1 control character is read as the Windows-1252 byte it stands for.
    for c in range(0x80, 0xA0):
        fixed = fx.fix_c1_controls(chr(c))
        if fixed != chr(c):
            steps.append(_replace(chr(c), fixed))
    # fix_latin_ligatures and fix_character_width: per-character translations.
    for table in (cd.LIGATURES, cd.WIDTH_MAP):
        for code, repl in sorted(table.items()):
            steps.append(_replace(chr(code), repl if isinstance(repl, str) else chr(repl)))
    # uncurl_quotes
    steps.append(_replace(cd.DOUBLE_QUOTE_RE.pattern, '"', regex=True))
    steps.append(_replace(cd.SINGLE_QUOTE_RE.pattern, "'", regex=True))
    # fix_line_breaks (all become whitespace, collapsed later)
    steps.append(_replace("\r\n|[\r\u2028\u2029\u0085]", "\n", regex=True))
    # remove_terminal_escapes, remove_control_chars
    steps.append(_replace("\x1b\\[((?:\\d|;)*)([a-zA-Z])", "", regex=True))
    control = "".join(chr(c) for c in cd.CONTROL_CHARS)
    if control:
        steps.append(_replace(_char_class(control), "", regex=True))
    return steps


def basic_clean_normalizers() -> list[dict]:
    """open_clip's `basic_clean` without its final strip: `ftfy.fix_text` (its character-level fixes
    and NFC), then `html.unescape` twice (the common entities)."""
    steps = _ftfy_normalizers()
    steps.append({"type": "NFC"})
    for _ in range(2):  # open_clip: html.unescape(html.unescape(text))
        steps += [_replace(a, b) for a, b in HTML_ENTITIES]
    return steps


def whitespace_clean_normalizers() -> list[dict]:
    """open_clip's `whitespace_clean`: Python's whitespace runs collapsed to one space, then strip."""
    return [_replace(_char_class(_py_whitespace()) + "+", " ", regex=True),
            {"type": "Strip", "strip_left": True, "strip_right": True}]


def lower_normalizers() -> list[dict]:
    """Python's `str.lower()`. It maps a word-final capital sigma to final sigma (Unicode Final_Sigma:
    a cased letter before it, none after, case-ignorable characters skipped); `tokenizers` lowercases
    per character. The look-behind skips up to 3 case-ignorable characters."""
    return [_replace(FINAL_SIGMA, "\u03c2", regex=True), {"type": "Lowercase"}]


def build_clip_tokenizer_json(tokenizer) -> str:
    """The `tokenizers` JSON equivalent of an open_clip `SimpleTokenizer` (clean="lower"), any context
    length (77 for most models, 76 for CoCa). Raises ValueError for what it cannot represent."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(tokenizer, SimpleTokenizer):
        raise ValueError(f"tokenizer.json export supports open_clip's SimpleTokenizer, not "
                         f"{type(tokenizer).__name__}")
    if tokenizer.reduction_fn is not None:
        raise ValueError("tokenizer.json export does not support open_clip's reduction masks")
    if tokenizer.clean_fn.__name__ != "_clean_lower":
        raise ValueError(f"tokenizer.json export of open_clip's SimpleTokenizer supports clean='lower' only "
                         f"(this tokenizer uses {tokenizer.clean_fn.__name__})")
    T = int(tokenizer.context_length)
    vocab = dict(tokenizer.encoder)
    merges = [f"{a} {b}" for (a, b), _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    sot_tok, eot_tok = tokenizer.decoder[sot], tokenizer.decoder[eot]
    specials = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
    pad_tok = tokenizer.decoder[0]

    normalizers = basic_clean_normalizers() + whitespace_clean_normalizers() + lower_normalizers() + [
        # U+0345 (combining ypogegrammeni) case-folds to a letter, so under open_clip's IGNORECASE
        # regex neither the letter class nor its negation matches it: open_clip drops it.
        # It still ends the letter run it sits in: a space, which the pre-tokeniser drops.
        _replace("\u0345", " "),
    ]
    data = {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": T, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": T}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": pad_tok},
        "added_tokens": [
            {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": True, "special": True}
            for t in specials
        ],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": sot_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eot_tok, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": sot_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": eot_tok, "type_id": 0}}],
            "special_tokens": {
                sot_tok: {"id": sot_tok, "ids": [sot], "tokens": [sot_tok]},
                eot_tok: {"id": eot_tok, "ids": [eot], "tokens": [eot_tok]},
            },
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            {"type": "Replace", "pattern": {"String": "</w>"}, "content": " "},
            {"type": "Strip", "content": " ", "start": 0, "stop": 1},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }
    return json.dumps(data, ensure_ascii=False)
