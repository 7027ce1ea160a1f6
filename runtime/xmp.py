"""XMP sidecars for photo managers: `write_sidecar` writes or updates `IMG.jpg.xmp` (or `IMG.xmp`).

What a sidecar holds after qks wrote it (read by digiKam, darktable, Lightroom, immich, exiftool):
- `dc:subject` (Bag): the labels as flat keywords, after the user's own keywords;
- `lr:hierarchicalSubject` (Bag): `ROOT|label` for every label (ROOT defaults to `qks|label`; a `|`
  inside a label becomes `/`, so a label stays one level);
- the qks namespace `QKS_NS` (prefix `qks`, registered with exiv2): `qks:model`, `qks:bundleSha256`,
  `qks:root` (the root used) and `qks:keywords` (Bag: the `dc:subject` values qks added).

Merging with an existing sidecar: every field qks does not own is kept as exiv2 parsed it (foreign
namespaces, ratings, darktable history, the user's keywords). A rerun removes only qks's own
keywords before adding the new ones: the `dc:subject` values listed in `qks:keywords` and the
hierarchical ones under the previous and the current root. A label the user already had as a
keyword is not claimed (not listed in `qks:keywords`), so it survives a later rerun that drops it.

Writing goes through exiv2 (pyexiv2) in memory, never hand-written XML: the existing sidecar's bytes
(or, for a new one, a packet that exiv2 itself serialises) are opened as an XMP sidecar, changed,
and written to a temp file in the same folder that `os.replace` moves over the sidecar; so a failure
leaves the old sidecar as it was, and a corrupt sidecar is reported, never overwritten. The image
itself is never opened. Errors are `XmpError` with a one-line reason. Threads may call it at once
(exiv2's part runs under a lock); two writers of the same sidecar are not coordinated.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import threading
from pathlib import Path

QKS_NS = "http://ns.qks.dev/xmp/1.0/"
QKS_PREFIX = "qks"
NAMINGS = ("ext", "base")
_XMP_MIME = "application/rdf+xml"
_KEYWORDS, _HIER = "Xmp.dc.subject", "Xmp.lr.hierarchicalSubject"
_OWN, _ROOT, _MODEL, _HASH = (f"Xmp.{QKS_PREFIX}.{k}" for k in ("keywords", "root", "model", "bundleSha256"))

_exiv2 = None  # pyexiv2, imported and set up once
_EMPTY: bytes | None = None  # a new sidecar's starting packet
_EXIV2_LOCK = threading.Lock()  # pyexiv2 collects exiv2's messages in one global buffer: one call at a time


class XmpError(ValueError):
    """A sidecar that cannot be written or read; the message is one line for an error record."""


def check_available():
    """Import pyexiv2 and register the qks namespace (once); XmpError naming the fix if it is missing."""
    global _exiv2
    if _exiv2 is None:
        try:
            import pyexiv2
        except ImportError:
            raise XmpError("XMP sidecars need pyexiv2: pip install 'qks[library]'") from None
        pyexiv2.set_log_level(3)  # errors only: pyexiv2 raises on any logged message, warnings included
        pyexiv2.registerNs(QKS_NS, QKS_PREFIX)
        _exiv2 = pyexiv2
    return _exiv2


def sidecar_path(image, naming: str = "ext") -> Path:
    """`IMG.jpg` -> `IMG.jpg.xmp` (naming "ext": darktable, digiKam) or `IMG.xmp` ("base": Lightroom)."""
    image = Path(image)
    if naming == "ext":
        return image.with_name(image.name + ".xmp")
    if naming == "base":
        return image.with_suffix(".xmp")
    raise XmpError(f"unknown sidecar naming {naming!r} ({' or '.join(NAMINGS)})")


def write_sidecar(image, keywords: list[str], *, model: str, bundle_sha256: str, root: str = "qks|label",
                  naming: str = "ext") -> Path:
    """Write or update the sidecar of `image` with `keywords` (qks's labels); returns the sidecar path."""
    root = root.strip("|")
    if not root:
        raise XmpError("the hierarchical keyword root is empty")
    target = sidecar_path(image, naming)
    if not Path(image).is_file():
        raise XmpError("image not found")
    target = Path(os.path.realpath(target))  # a linked sidecar is updated where it lives
    old = _read_existing(target)
    pyexiv2 = check_available()
    with _EXIV2_LOCK:
        data = _updated(pyexiv2, old, [str(k) for k in keywords], model, bundle_sha256, root)
    _replace(target, data)
    return sidecar_path(image, naming)


def read_keywords(sidecar) -> dict:
    """The qks view of a sidecar: {"subject", "hierarchical", "qks_keywords", "model", "bundle_sha256", "root"}."""
    data = _read_existing(Path(sidecar))
    if data is None:
        raise XmpError("sidecar not found")
    pyexiv2 = check_available()
    with _EXIV2_LOCK:
        try:
            meta = pyexiv2.ImageData(data)
        except RuntimeError as e:
            raise XmpError(f"sidecar is unreadable: {_first_line(e)}") from None
        try:
            xmp = meta.read_xmp()
        finally:
            meta.close()
    return {"subject": _as_list(xmp.get(_KEYWORDS)), "hierarchical": _as_list(xmp.get(_HIER)),
            "qks_keywords": _as_list(xmp.get(_OWN)), "model": xmp.get(_MODEL),
            "bundle_sha256": xmp.get(_HASH), "root": xmp.get(_ROOT)}


# -- steps -----------------------------------------------------------------------------------------


def _updated(pyexiv2, old: bytes | None, labels: list[str], model: str, bundle_sha256: str, root: str) -> bytes:
    """The new sidecar's bytes: `old` (or an empty packet) with qks's fields replaced, through exiv2."""
    meta = None
    try:
        meta = pyexiv2.ImageData(old if old is not None else _empty_packet(pyexiv2))
        if meta.get_mime_type() != _XMP_MIME:
            raise XmpError("existing sidecar is not an XMP file; left as it is")
        # exiv2 mirrors a sidecar's XMP into Exif/IPTC on read and back on write, which re-adds
        # deleted keywords and rewrites foreign dates: with both empty the XMP is written as parsed.
        meta.clear_exif()
        meta.clear_iptc()
        meta.modify_xmp(_changes(meta.read_xmp(), labels, model, bundle_sha256, root))
        return meta.get_bytes()
    except RuntimeError as e:
        what = "existing sidecar is unreadable (left as it is)" if meta is None else "cannot update sidecar"
        raise XmpError(f"{what}: {_first_line(e)}") from None
    finally:
        if meta is not None:
            meta.close()


def _changes(xmp: dict, labels: list[str], model: str, bundle_sha256: str, root: str) -> dict:
    """The pyexiv2 edit that replaces qks's own keywords by `labels` and keeps everything else."""
    labels = list(dict.fromkeys(k for k in labels if k))
    previous = set(_as_list(xmp.get(_OWN)))
    theirs = [k for k in _as_list(xmp.get(_KEYWORDS)) if k not in previous]
    ours = [k for k in labels if k not in theirs]
    roots = {root, str(xmp.get(_ROOT) or root)}
    hier = [h for h in _as_list(xmp.get(_HIER)) if not any(h == r or h.startswith(r + "|") for r in roots)]
    hier += [f"{root}|{k.replace('|', '/')}" for k in labels]
    edit = {**_bag(_KEYWORDS, theirs + ours), **_bag(_HIER, hier), **_bag(_OWN, ours)}
    edit.update({_ROOT: root, _MODEL: str(model), _HASH: str(bundle_sha256)})
    return edit


def _bag(key: str, values: list[str]) -> dict:
    """An unordered array in pyexiv2's terms (its lists become rdf:Seq, and dc:subject is a Bag):
    exiv2 reads "type=Bag" as an empty Bag and `key[i]` as its items; None deletes the key."""
    if not values:
        return {key: None}
    odd = next((v for v in values if v.startswith("type=")), None)
    if odd is not None:  # exiv2 would read it as an array type: refused, the sidecar left as it is
        raise XmpError(f"keyword {odd[:60]!r} starts with 'type=', which exiv2 cannot store as text")
    return {key: "type=Bag", **{f"{key}[{i}]": v for i, v in enumerate(values, 1)}}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _empty_packet(pyexiv2) -> bytes:
    """A sidecar with no property, serialised by exiv2 (from a 1-pixel PNG it carries in memory); once."""
    global _EMPTY
    if _EMPTY is None:
        _EMPTY = _serialise_empty(pyexiv2)
    return _EMPTY


def _serialise_empty(pyexiv2) -> bytes:
    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (1, 1)).save(png, "PNG")
    carrier = pyexiv2.ImageData(png.getvalue())
    try:
        carrier.modify_xmp({_MODEL: ""})  # exiv2 writes no packet for empty XMP; the key is set again
        return carrier.read_raw_xmp().encode("utf-8")
    finally:
        carrier.close()


def _read_existing(target: Path) -> bytes | None:
    """The sidecar's bytes; None if there is none (or it is empty: nothing to keep)."""
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise XmpError("sidecar path is a directory") from None
    except OSError as e:
        raise XmpError(f"cannot read existing sidecar: {e.strerror or e}") from None
    if data and not os.access(target, os.W_OK):
        raise XmpError("existing sidecar is read-only; left as it is")
    return data or None


def _replace(target: Path, data: bytes) -> None:
    """Write `data` beside `target` and move it over: the old sidecar stays whole until the rename."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.qks-tmp")
    try:
        mode = target.stat().st_mode & 0o7777  # an existing sidecar keeps its permissions
    except OSError:
        mode = None
    try:  # a new one gets 0666 less the umask, as open() gives
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    except OSError as e:
        raise XmpError(f"cannot write sidecar: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise XmpError(f"cannot write sidecar: {e.strerror or e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
