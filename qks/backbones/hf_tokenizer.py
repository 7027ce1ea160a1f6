"""open_clip's Hugging Face tokenizers (SigLIP, SigLIP2, ...) as one `tokenizers` JSON, and the entry
point for every open_clip tokenizer: `tokenizer_json_for`.

open_clip's `HFTokenizer(texts)` is: its clean function on each text, then the transformers fast
tokenizer with `max_length=context_length, padding="max_length", truncation=True`, then (optionally)
every separator id set to 0. A transformers fast tokenizer runs all of that second step in its backend,
a `tokenizers.Tokenizer`: normalizer, pre-tokenizer, model, post-processor (the eos/bos tokens its
add_bos_token/add_eos_token flags chose), truncation and padding. So the JSON is that backend with:

- the clean function prepended to its normalizer (`clean="canonicalize"` for SigLIP/SigLIP2: ftfy's
  character fixes, NFC, HTML entities, "_" -> " ", ASCII punctuation removed, Python's lower(), Python's
  whitespace collapsed, strip; "lower" and "whitespace" likewise). Like the CLIP path
  (clip_tokenizer.py), ftfy's mojibake repair and the rarer HTML entities are not expressible and are left
  out: open_clip repairs "cafÃ©", this JSON does not. The exporter checks every prompt's ids anyway;
- truncation to the context length and padding to exactly it with the tokenizer's pad id and side,
  as transformers sets them for that call;
- added (special) tokens: transformers matches them on the text as open_clip passes it, after cleaning,
  so one the cleaning always removes ("</s>", "<pad>", "<eos>": canonicalize drops "<", "/", ">") never
  matches there, and is left out of the JSON's added tokens (the post-processor and padding name their
  ids directly; a `tokenizers` JSON would otherwise match them in the raw text, before cleaning). One
  that can survive cleaning is matched after all normalisation: exact unless the model's own normaliser
  creates or destroys an occurrence (a literal "▁▁" next to a space under Gemma's " " -> "▁"), rare in
  label text; if that normaliser changes the token itself ("[SEP]" under BERT's lowercasing), in the raw
  text instead, exact unless the cleaning creates or removes one ("［SEP］" made ASCII by ftfy);
- strip_sep_token: the separator id replaced by 0 in the post-processor (and the padding, if the pad
  token is the separator). Not covered: a separator written in the text ("[SEP]" survives
  clean="whitespace"; `tokenizers` takes an added token's id from the vocabulary, so it cannot be
  mapped to 0), and one the model itself could produce from plain text: they keep their id.

Refused with ValueError (one line naming it): tokenizer modes other than the default ("clips"), slow
(Python) tokenizers, split_special_tokens, a tokenizer without a pad token, other clean functions.
"""

from __future__ import annotations

import json
import string

from .clip_tokenizer import (
    _char_class,
    _replace,
    basic_clean_normalizers,
    build_clip_tokenizer_json,
    lower_normalizers,
    whitespace_clean_normalizers,
)


def tokenizer_json_for(tokenizer) -> str:
    """tokenizer.json for any supported open_clip tokenizer: SimpleTokenizer (CLIP BPE) or HFTokenizer."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return build_clip_tokenizer_json(tokenizer)
    if isinstance(tokenizer, HFTokenizer):
        return build_hf_tokenizer_json(tokenizer)
    raise ValueError(f"tokenizer.json export: open_clip tokenizer {type(tokenizer).__name__} is not supported")


def clean_normalizers(clean_fn) -> list[dict]:
    """open_clip's clean function (`get_clean_fn`) as `tokenizers` normalizers."""
    from open_clip import tokenizer as oc

    if clean_fn is oc._clean_canonicalize:  # canonicalize_text(basic_clean(x))
        punctuation = _char_class(string.punctuation)
        return (basic_clean_normalizers() + [_replace("_", " "), _replace(punctuation, "", regex=True)]
                + lower_normalizers() + whitespace_clean_normalizers())
    if clean_fn is oc._clean_lower:  # whitespace_clean(basic_clean(x)).lower()
        return basic_clean_normalizers() + whitespace_clean_normalizers() + lower_normalizers()
    if clean_fn is oc._clean_whitespace:  # whitespace_clean(basic_clean(x))
        return basic_clean_normalizers() + whitespace_clean_normalizers()
    raise ValueError(f"tokenizer.json export: open_clip clean function {getattr(clean_fn, '__name__', clean_fn)} "
                     f"is not supported")


def build_hf_tokenizer_json(tok) -> str:
    """The `tokenizers` JSON that gives exactly `tok(texts)`'s ids for an open_clip `HFTokenizer`."""
    from tokenizers import Tokenizer

    hf = _check_supported(tok)
    T = int(tok.context_length)
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    # What transformers sets on its backend for padding="max_length", truncation=True, max_length=T.
    backend.enable_truncation(T, stride=0, strategy="longest_first", direction=hf.truncation_side)
    backend.enable_padding(direction=hf.padding_side, pad_id=hf.pad_token_id, pad_type_id=hf.pad_token_type_id,
                           pad_token=str(hf.pad_token), length=T)
    data = json.loads(backend.to_str())

    model_norm = hf.backend_tokenizer.normalizer
    own = [] if data["normalizer"] is None else [data["normalizer"]]
    data["normalizer"] = {"type": "Sequence", "normalizers": clean_normalizers(tok.clean_fn) + own}
    data["added_tokens"] = _added_tokens(data["added_tokens"], tok.clean_fn, model_norm)
    if tok.strip_sep_token:
        _strip_separator(data, hf.sep_token_id)
    return json.dumps(data, ensure_ascii=False)


def _check_supported(tok):
    """The transformers tokenizer of `tok`, if a `tokenizers` JSON can reproduce `tok(texts)`."""
    if tok.tokenizer_mode:
        raise ValueError(f"tokenizer.json export: open_clip tokenizer_mode {tok.tokenizer_mode!r} is not supported")
    hf = tok.tokenizer
    if not getattr(hf, "is_fast", False) or not hasattr(hf, "backend_tokenizer"):
        raise ValueError(f"tokenizer.json export needs a fast (tokenizers-backed) Hugging Face tokenizer, "
                         f"not {type(hf).__name__}")
    if getattr(hf, "split_special_tokens", False):
        raise ValueError("tokenizer.json export: split_special_tokens=True is not representable in tokenizer.json")
    if hf.pad_token_id is None:
        raise ValueError(f"tokenizer.json export: {type(hf).__name__} has no pad token (open_clip pads to "
                         f"the context length)")
    if tok.strip_sep_token and hf.sep_token_id is None:
        raise ValueError(f"tokenizer.json export: strip_sep_token is set but {type(hf).__name__} has no "
                         f"separator token")
    return hf


def _added_tokens(tokens: list[dict], clean_fn, model_norm) -> list[dict]:
    """The added tokens open_clip can match, each matched after all normalisation (module notes)."""
    out = []
    for token in tokens:
        content = token["content"]
        probe = f"a{content}a"
        if clean_fn(probe) != probe:
            continue  # the cleaning always changes it: never in the text the tokenizer sees
        if token["normalized"]:
            out.append(token)  # already matched after the model's normaliser, which now runs after cleaning
            continue
        if model_norm is not None and model_norm.normalize_str(content) != content:
            # open_clip matches it before the model's normaliser, which changes it ("[SEP]" under
            # BERT's lowercasing): after all normalisation it is no longer there, so match it in the
            # raw text, before cleaning (cleaning rarely creates or removes one).
            out.append(token)
            continue
        out.append({**token, "normalized": True})
    return out


def _strip_separator(data: dict, sep_id: int) -> None:
    """open_clip's strip_sep_token: every separator id becomes 0."""
    def walk(proc: dict | None) -> None:
        if not proc:
            return
        for sub in proc.get("processors", []):  # a Sequence of post-processors
            walk(sub)
        for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
            if key in proc and proc[key][1] == sep_id:
                proc[key] = [proc[key][0], 0]
        for special in proc.get("special_tokens", {}).values():  # TemplateProcessing
            special["ids"] = [0 if i == sep_id else i for i in special["ids"]]

    walk(data["post_processor"])
    if data["padding"]["pad_id"] == sep_id:
        data["padding"]["pad_id"] = 0
