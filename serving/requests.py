"""Request bodies of `POST /v1/tag` and `PUT /v1/labels/{bank}`, read within the limits and checked
field by field, each refusal a `ServeError` with its one-line reason.

`POST /v1/tag` takes either
- `multipart/form-data`: one or more file parts named `images`, and optional text fields `labels`
  (repeated, one label each), `bank`, `top_k`, `threshold`, `all_scores`; or
- `application/json`: `{"images": [...], "labels": [...], "bank", "top_k", "threshold", "all_scores"}`,
  where each image is base64 text or `{"name": ..., "data": base64}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math

from starlette.datastructures import UploadFile
from starlette.requests import Request

from .service import Limits, ServeError, TagOptions

TAG_FIELDS = {"images", "labels", "bank", "top_k", "threshold", "all_scores"}
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) past `limit` bytes: from Content-Length before reading, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServeError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise ServeError(413, f"request body of {int(declared)} bytes; at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json(body: bytes) -> dict:
    if not body.strip():
        raise ServeError(400, "empty body: send a JSON object")
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise ServeError(400, "the JSON body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ServeError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ServeError(400, "invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ServeError(400, "the JSON body must be an object")
    return doc


# -- options -----------------------------------------------------------------------------------------


def _int(name: str, v, form: bool) -> int:
    if form and isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int):
        raise ServeError(400, f"{name} must be an integer")
    return v


def _float(name: str, v, form: bool) -> float:
    if form and isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ServeError(400, f"{name} must be a number") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ServeError(400, f"{name} must be a finite number")
    return float(v)


def _bool(name: str, v, form: bool) -> bool:
    if form and isinstance(v, str) and v.strip().lower() in TRUE | FALSE:
        return v.strip().lower() in TRUE
    if not isinstance(v, bool):
        raise ServeError(400, f"{name} must be true or false")
    return v


def _utf8(text: str) -> bool:
    """False for text JSON can carry but UTF-8 cannot (a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def tag_options(fields: dict, form: bool) -> TagOptions:
    """`labels`, `bank`, `top_k`, `threshold`, `all_scores` from a JSON object or form fields (strings)."""
    top_k = threshold = None
    if fields.get("top_k") is not None:
        top_k = _int("top_k", fields["top_k"], form)
        if not 1 <= top_k <= 100_000:
            raise ServeError(400, f"top_k must be between 1 and 100000, got {top_k}")
    if fields.get("threshold") is not None:
        threshold = _float("threshold", fields["threshold"], form)
        if not 0.0 <= threshold <= 1.0:
            raise ServeError(400, f"threshold must be between 0 and 1, got {threshold:g}")
    all_scores = _bool("all_scores", fields["all_scores"], form) if fields.get("all_scores") is not None else False
    bank = fields.get("bank")
    if bank is not None and (not isinstance(bank, str) or not bank):
        raise ServeError(400, "bank must be a bank name (GET /v1/labels lists them)")
    labels = fields.get("labels")
    if labels is not None and bank is not None:
        raise ServeError(400, "give labels or bank, not both")
    return TagOptions(labels=labels, bank=bank, top_k=top_k, threshold=threshold, all_scores=all_scores)


# -- POST /v1/tag ------------------------------------------------------------------------------------


def _b64(i: int, text) -> bytes:
    if not isinstance(text, str):
        raise ServeError(400, f"images[{i}]: the data must be base64 text")
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"images[{i}]: not valid base64") from None


def json_images(images, limits: Limits) -> list[tuple[str, bytes]]:
    if not isinstance(images, list) or not images:
        raise ServeError(400, "images must be a non-empty list (base64 text or {\"name\", \"data\"} objects)")
    if len(images) > limits.max_images:
        raise ServeError(413, f"{len(images)} images; at most {limits.max_images} per request")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, dict):
            extra = set(item) - {"name", "data"}
            if extra or "data" not in item:
                raise ServeError(400, f"images[{i}]: an object needs \"data\" (base64) and may have \"name\""
                                 + (f"; unknown field {sorted(extra)[0]!r}" if extra else ""))
            name = item.get("name", str(i))
            if not isinstance(name, str) or not name or len(name) > 1000 or not _utf8(name):
                raise ServeError(400, f"images[{i}]: name must be a non-empty string of at most 1000 characters "
                                      "(valid Unicode)")
            out.append((name, _b64(i, item["data"])))
        else:
            out.append((str(i), _b64(i, item)))
    return out


async def tag_request(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], TagOptions]:
    """A POST /v1/tag request -> (images as (name, bytes), options)."""
    kind = media_type(request)
    if kind not in ("multipart/form-data", "application/json"):
        raise ServeError(415, f"content type {kind or 'none'!r}: send multipart/form-data (files named images) "
                              "or application/json (base64 images)")
    body = await read_body(request, limits.max_upload_bytes)
    if kind == "application/json":
        doc = parse_json(body)
        unknown = sorted(set(doc) - TAG_FIELDS)
        if unknown:
            raise ServeError(400, f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(TAG_FIELDS))})")
        if "images" not in doc:
            raise ServeError(400, "no images: give \"images\": [base64, ...]")
        return json_images(doc["images"], limits), tag_options(doc, form=False)
    return await _multipart(request, body, limits)


async def _multipart(request: Request, body: bytes, limits: Limits):
    async def replay():  # the body was read (within its limit) already; the form parser reads it again
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_images + 1,
                                                         max_fields=limits.max_labels + 16)
    except Exception as e:  # python-multipart's and Starlette's parse errors: a malformed body
        reason = getattr(e, "detail", None) or getattr(e, "message", None) or type(e).__name__
        raise ServeError(400, f"malformed multipart body: {str(reason).splitlines()[0][:200]}") from None
    try:
        unknown = sorted(set(form.keys()) - TAG_FIELDS)
        if unknown:
            raise ServeError(400, f"unknown form field {unknown[0]!r} (fields: {', '.join(sorted(TAG_FIELDS))})")
        files = form.getlist("images")
        if not files:
            raise ServeError(400, "no images: send files in form fields named images")
        if len(files) > limits.max_images:
            raise ServeError(413, f"{len(files)} images; at most {limits.max_images} per request")
        images = []
        for i, f in enumerate(files):
            if not isinstance(f, UploadFile):
                raise ServeError(400, f"images[{i}] is a text field; send a file (curl -F images=@photo.jpg)")
            images.append((f.filename or str(i), await f.read()))
        fields = {k: form.get(k) for k in ("bank", "top_k", "threshold", "all_scores") if k in form}
        for k, v in fields.items():
            if len(form.getlist(k)) > 1 or not isinstance(v, str):
                raise ServeError(400, f"{k} must be given once, as a text field")
        if "labels" in form:
            fields["labels"] = form.getlist("labels")
            if not all(isinstance(v, str) for v in fields["labels"]):
                raise ServeError(400, "labels must be text fields (one label each)")
        return images, tag_options(fields, form=True)
    finally:
        await form.close()


# -- PUT /v1/labels/{bank} ---------------------------------------------------------------------------


async def labels_request(request: Request, limits: Limits) -> list:
    if media_type(request) != "application/json":
        raise ServeError(415, "send application/json: {\"labels\": [\"label\", ...]}")
    doc = parse_json(await read_body(request, limits.max_upload_bytes))
    unknown = sorted(set(doc) - {"labels"})
    if unknown or "labels" not in doc:
        raise ServeError(400, "the body must be {\"labels\": [\"label\", ...]}"
                         + (f"; unknown field {unknown[0]!r}" if unknown else ""))
    return doc["labels"]
