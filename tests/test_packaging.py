"""The install layout: torch-free runtime, no generic top-level modules."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_runtime_and_engines_do_not_import_torch(tmp_path):
    code = (
        "import sys, qks, qks.runtime, qks.engines\n"
        "import pkgutil, importlib\n"
        "for pkg in (qks.runtime, qks.engines):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
        "bad = [m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    res = _run(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout


def test_no_generic_top_level_modules(tmp_path):
    for name in ("export", "engines", "runtime"):
        res = _run(f"import {name}", tmp_path)
        assert res.returncode != 0, f"a top-level module {name!r} is installed"
    res = _run("import qks.export, qks.engines, qks.runtime", tmp_path)
    assert res.returncode == 0, res.stderr
