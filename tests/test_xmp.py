"""XMP sidecars (qks.runtime.xmp): every sidecar written here is read back by exiftool, the
independent reader photo tools agree with; merging keeps foreign fields, a rerun replaces only
qks's keywords, and a read-only folder or a corrupt sidecar is a one-line XmpError with nothing lost."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from qks.runtime.xmp import XmpError, check_available, read_keywords, sidecar_path, write_sidecar
from runtime_fixtures import as_nobody

pytest.importorskip("pyexiv2", reason="pyexiv2 is not installed (pip install 'qks[library]')")
if shutil.which("exiftool") is None:
    pytest.skip("exiftool is not installed (make exiftool)", allow_module_level=True)

SHA = hashlib.sha256(b"bundle").hexdigest()
OURS = ("XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "XMP-x:XMPToolkit")  # fields qks writes (+ XMP-qks:*)
FOREIGN = ["-XMP-dc:Subject=cat", "-XMP-dc:Subject=holiday", "-XMP-lr:HierarchicalSubject=places|Rome",
           "-XMP-xmp:Rating=4", "-XMP-dc:Title=Beach day", "-XMP-photoshop:City=Rome",
           "-XMP-exif:DateTimeOriginal=2020:01:02 03:04:05+01:00", "-XMP-digiKam:TagsList=People/Anna",
           "-XMP-xmpMM:DocumentID=xmp.did:1234", "-XMP-dc:Creator=Anna", "-XMP-dc:Creator=Ben"]


def exiftool(path: Path) -> dict:
    r = subprocess.run(["exiftool", "-j", "-G1", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)[0]
    return {k: v for k, v in data.items() if k.split(":")[0].startswith("XMP")}


def as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def qks_view(path: Path) -> dict:
    """What exiftool reads of the fields qks owns."""
    x = exiftool(path)
    return {"subject": as_list(x.get("XMP-dc:Subject")), "hier": as_list(x.get("XMP-lr:HierarchicalSubject")),
            "own": as_list(x.get("XMP-qks:Keywords")), "model": x.get("XMP-qks:Model"),
            "sha": x.get("XMP-qks:BundleSha256"), "root": x.get("XMP-qks:Root")}


def foreign(path: Path) -> dict:
    return {k: v for k, v in exiftool(path).items() if k not in OURS and not k.startswith("XMP-qks:")}


@pytest.fixture
def image(tmp_path) -> Path:
    p = tmp_path / "IMG_0001.jpg"
    Image.new("RGB", (16, 12), (200, 30, 30)).save(p, quality=90)
    return p


def test_new_sidecar_is_read_by_exiftool_and_the_image_is_untouched(image):
    before = (image.read_bytes(), image.stat().st_mtime_ns)
    labels = ["cat", "sofa", "café au lait", "a, b", "x|y"]
    side = write_sidecar(image, labels, model="tiny-vit", bundle_sha256=SHA)
    assert side == image.with_name("IMG_0001.jpg.xmp") and side.is_file()
    assert (image.read_bytes(), image.stat().st_mtime_ns) == before
    assert qks_view(side) == {"subject": labels, "hier": ["qks|label|" + k.replace("|", "/") for k in labels],
                              "own": labels, "model": "tiny-vit", "sha": SHA, "root": "qks|label"}
    assert read_keywords(side)["subject"] == labels
    assert sorted(p.name for p in image.parent.iterdir()) == ["IMG_0001.jpg", "IMG_0001.jpg.xmp"]  # no temp left


def test_base_naming_and_a_custom_root(image):
    side = write_sidecar(image, ["dog"], model="m", bundle_sha256=SHA, root="Auto|qks", naming="base")
    assert side == image.with_name("IMG_0001.xmp") and not sidecar_path(image, "ext").exists()
    assert qks_view(side)["hier"] == ["Auto|qks|dog"]
    with pytest.raises(XmpError, match="unknown sidecar naming 'lr' \\(ext or base\\)"):
        write_sidecar(image, ["dog"], model="m", bundle_sha256=SHA, naming="lr")


def test_merge_keeps_foreign_fields_and_a_rerun_replaces_only_qks_keywords(image):
    side = sidecar_path(image)
    r = subprocess.run(["exiftool", "-q", "-o", str(side), *FOREIGN, str(image)], capture_output=True, text=True)
    assert r.returncode == 0 and side.is_file(), r.stderr
    theirs = foreign(side)
    assert theirs["XMP-xmp:Rating"] == 4 and theirs["XMP-digiKam:TagsList"] == "People/Anna"

    write_sidecar(image, ["cat", "dog"], model="m1", bundle_sha256=SHA)  # "cat" was already the user's
    assert foreign(side) == theirs
    view = qks_view(side)
    assert view["subject"] == ["cat", "holiday", "dog"] and view["own"] == ["dog"]
    assert view["hier"] == ["places|Rome", "qks|label|cat", "qks|label|dog"]

    write_sidecar(image, ["bird"], model="m2", bundle_sha256="0" * 64)  # rerun: cat and dog no longer found
    assert foreign(side) == theirs
    view = qks_view(side)
    assert view["subject"] == ["cat", "holiday", "bird"]  # the user's "cat" survives, qks's "dog" goes
    assert view["hier"] == ["places|Rome", "qks|label|bird"] and view["own"] == ["bird"]
    assert (view["model"], view["sha"]) == ("m2", "0" * 64)

    write_sidecar(image, ["bird"], model="m2", bundle_sha256=SHA, root="tags")  # a new root drops the old one
    assert qks_view(side)["hier"] == ["places|Rome", "tags|bird"]
    write_sidecar(image, [], model="m2", bundle_sha256=SHA, root="tags")  # nothing found: only the user's left
    view = qks_view(side)
    assert (view["subject"], view["hier"], view["own"]) == (["cat", "holiday"], ["places|Rome"], [])
    assert foreign(side) == theirs


# A darktable sidecar (its own XML, as darktable writes it): a history of edits as an array of structs.
DARKTABLE = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:darktable="http://darktable.sf.net/"
   xmp:Rating="1" darktable:xmp_version="5" darktable:history_end="2">
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:num="0" darktable:operation="exposure" darktable:enabled="1" darktable:params="0000803f"/>
     <rdf:li darktable:num="1" darktable:operation="crop" darktable:enabled="0" darktable:params="00000000"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def test_a_darktable_sidecar_keeps_its_edit_history(image):
    side = sidecar_path(image)
    side.write_text(DARKTABLE)

    def darktable() -> dict:
        r = subprocess.run(["exiftool", "-j", "-G1", "-struct", "-XMP-darktable:all", "-XMP-xmp:all", str(side)],
                           capture_output=True, text=True, timeout=60)
        return {k: v for k, v in json.loads(r.stdout)[0].items() if k != "SourceFile"}

    before = darktable()
    assert len(before["XMP-darktable:History"]) == 2 and before["XMP-xmp:Rating"] == 1
    write_sidecar(image, ["cat"], model="m", bundle_sha256=SHA)
    assert darktable() == before and qks_view(side)["subject"] == ["cat"]


@pytest.mark.parametrize("content, reason", [
    (b"<?xpacket begin='' id='W5M0MpCehiHzreSzNTczkc9d'?><x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF",
     "existing sidecar is unreadable (left as it is): "),
    (b"\x00\x01garbage" * 20, "existing sidecar is unreadable (left as it is): "),
    (None, "existing sidecar is not an XMP file; left as it is"),  # a JPEG named .xmp
])
def test_a_corrupt_sidecar_is_an_error_and_is_not_overwritten(image, content, reason):
    side = sidecar_path(image)
    side.write_bytes(image.read_bytes() if content is None else content)
    before = side.read_bytes()
    with pytest.raises(XmpError) as e:
        write_sidecar(image, ["cat"], model="m", bundle_sha256=SHA)
    assert str(e.value).startswith(reason) and "\n" not in str(e.value)
    assert side.read_bytes() == before


def test_other_refusals_are_one_line(image, tmp_path):
    with pytest.raises(XmpError, match="^image not found$"):
        write_sidecar(tmp_path / "gone.jpg", ["cat"], model="m", bundle_sha256=SHA)
    with pytest.raises(XmpError, match="^the hierarchical keyword root is empty$"):
        write_sidecar(image, ["cat"], model="m", bundle_sha256=SHA, root="|")
    with pytest.raises(XmpError, match="^keyword 'type=Alt' starts with 'type=', which exiv2 cannot store as text$"):
        write_sidecar(image, ["cat", "type=Alt"], model="m", bundle_sha256=SHA)
    assert not sidecar_path(image).exists()
    sidecar_path(image).mkdir()
    with pytest.raises(XmpError, match="^sidecar path is a directory$"):
        write_sidecar(image, ["cat"], model="m", bundle_sha256=SHA)


def test_a_read_only_folder_or_sidecar_is_an_error_and_nothing_is_lost():
    """As an unprivileged user (root writes anywhere): the child drops to `nobody` after fork."""
    check_available()  # pyexiv2 loaded before the fork: `nobody` cannot read the venv under /root
    d = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        old, new = d / "old.jpg", d / "new.jpg"
        for p in (old, new):
            Image.new("RGB", (8, 8)).save(p)
        write_sidecar(old, ["cat"], model="m", bundle_sha256=SHA)
        sidecar_path(old).chmod(0o666)  # the sidecar itself is writable; its folder is not
        before = (sidecar_path(old).read_bytes(), qks_view(sidecar_path(old)))
        d.chmod(0o555)
        got = as_nobody(lambda: [_error_of(old), _error_of(new)])
        assert got == ["cannot write sidecar: Permission denied"] * 2
        d.chmod(0o777)  # a writable folder, but the sidecar itself read-only: respected, not replaced
        sidecar_path(old).chmod(0o444)
        assert as_nobody(lambda: _error_of(old)) == "existing sidecar is read-only; left as it is"
        assert (sidecar_path(old).read_bytes(), qks_view(sidecar_path(old))) == before
        assert sorted(p.name for p in d.iterdir()) == ["new.jpg", "old.jpg", "old.jpg.xmp"]
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)


def _error_of(image: Path) -> str | None:
    try:
        write_sidecar(image, ["dog"], model="m", bundle_sha256=SHA)
    except XmpError as e:
        return str(e)
    return None


def test_without_pyexiv2_the_error_names_the_fix(image):
    code = ("import sys\n"
            "class B:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'pyexiv2': raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, B())\n"
            "from qks.runtime.xmp import XmpError, write_sidecar\n"
            "try:\n"
            f"    write_sidecar({str(image)!r}, ['cat'], model='m', bundle_sha256='x')\n"
            "except XmpError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "XMP sidecars need pyexiv2: pip install 'qks[library]'", r.stderr
    assert not sidecar_path(image).exists()


def test_threads_may_write_sidecars_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    images = []
    for i in range(24):
        images.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (4, 4)).save(images[-1])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_sidecar(images[i], [f"label{i}", "cat"], model="m", bundle_sha256=SHA),
                      range(len(images))))
    assert [read_keywords(sidecar_path(p))["subject"] for p in images] == [[f"label{i}", "cat"] for i in range(24)]
