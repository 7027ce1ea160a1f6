"""Helpers shared by the qks-triton tests (test_triton*.py): the CLI in-process, config parsing, file hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

NEW_LABELS = ["zebra", "hot air balloon", "cup of coffee", "Éclair", "东京 ramen", "cat"]


def pb():
    return pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse_config(path: Path):
    from google.protobuf import text_format

    cfg = pb().ModelConfig()
    text_format.Parse(path.read_text(encoding="utf-8"), cfg)
    return cfg


def run_cli(main, args) -> tuple[int, str, str]:
    """A click `main(argv)` in-process: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    def run():
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            return e.code or 0
        return 0

    with CliRunner().isolation() as (out, err, _mixed):
        code = run()
    return code, out.getvalue().decode(), err.getvalue().decode()


def triton_cli(args) -> tuple[int, str, str]:
    from qks.export.triton import main

    return run_cli(main, args)


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_labels(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    return path
