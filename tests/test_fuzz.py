"""The libFuzzer targets of cpp/fuzz (FUZZING.md), in `make test`:

- every committed regression file (tests/data/fuzz/<target>/: inputs that crashed a target, tripped
  ASan/UBSan, or made the two image pipelines disagree) replays through its target, clean;
- the image regression files give the same tensor bit for bit, or the same error text, in C++ and in
  Pillow + the Python runtime (cpp/fuzz/differential.py);
- every target fuzzes for a few seconds from its seed corpus without a finding (a smoke run: the
  campaign itself is `make fuzz`).

The fuzz build (cpp/build-fuzz, clang + libFuzzer, `make fuzz-build`) is skipped with its reason
where clang-16/libfuzzer-16-dev cannot be installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ_BUILD = ROOT / "cpp" / "build-fuzz" / "fuzz"
DATA = ROOT / "tests" / "data" / "fuzz"
TARGETS = ("fuzz_jpeg", "fuzz_png", "fuzz_gif", "fuzz_image_any", "fuzz_exif", "fuzz_npy", "fuzz_bundle",
           "fuzz_labels", "fuzz_records")
IMAGE_TARGETS = ("fuzz_jpeg", "fuzz_png", "fuzz_gif", "fuzz_image_any")
SMOKE_SECONDS = 3


def _skip_reason() -> str | None:
    if all((FUZZ_BUILD / t).is_file() for t in TARGETS):
        return None
    note = ROOT / "cpp" / ".deps" / "FUZZ_UNAVAILABLE"
    if note.is_file():
        return f"fuzz build unavailable here: {note.read_text().strip()}"
    return f"no fuzz build in {FUZZ_BUILD}: run `make fuzz-build` first"


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
ENV = dict(os.environ, UBSAN_OPTIONS="print_stacktrace=1", ASAN_OPTIONS="detect_leaks=1")


# libFuzzer's RSS limit reads getrusage's peak RSS, which on Linux a child started by fork/vfork + exec
# inherits from its parent: under a pytest that has grown past 2 GiB every target reported out-of-memory
# on its first input (CI). So the tests turn the RSS limit off and cap single allocations instead.
MEMORY_LIMITS = ("-rss_limit_mb=0", "-malloc_limit_mb=2048")


def _run(target: str, args: list, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(FUZZ_BUILD / target), *MEMORY_LIMITS, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(ENV, TMPDIR=str(tmp)), cwd=tmp)


def test_every_target_has_regression_files_or_seeds():
    assert {p.name for p in DATA.iterdir() if p.is_dir()} <= set(TARGETS)


@pytest.mark.parametrize("target", sorted(p.name for p in DATA.iterdir() if p.is_dir()))
def test_regression_files_replay_clean(target, tmp_path):
    files = sorted((DATA / target).iterdir())
    res = _run(target, files, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert len(re.findall(r"^Executed ", res.stderr, re.M)) == len(files), res.stderr[-2000:]


def _differential():
    sys.path.insert(0, str(ROOT / "cpp" / "fuzz"))
    import differential

    files = differential.collect([str(DATA / t) for t in IMAGE_TARGETS if (DATA / t).is_dir()])
    return differential, files


def test_image_regressions_agree_with_pillow():
    differential, files = _differential()
    r = differential.compare(files, differential.DRIVER)
    assert not r["diverge"] and not r["text"], (r["diverge"], r["text"])
    # the known differences: corrupt JPEGs that libjpeg-turbo 2.1 (Debian) and 3.2 (Pillow's wheel) decode apart
    assert sorted(f.name for f in r["libjpeg"]) == sorted(f.name for f in files if f.name.startswith("libjpeg_"))
    assert len(r["agree"]) + len(r["libjpeg"]) == len(files)


def test_image_regressions_agree_bit_for_bit_on_pillows_libjpeg():
    """With Pillow's own libjpeg-turbo preloaded, every regression file (the libjpeg_* ones too) agrees:
    the known differences are the library's, not the parsing around it."""
    differential, files = _differential()
    r = differential.compare(files, differential.DRIVER, differential.pillow_libjpeg())
    assert len(r["agree"]) == len(files), (r["diverge"], r["text"])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seeds")
    subprocess.run([sys.executable, str(ROOT / "cpp" / "fuzz" / "seeds.py"), str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_smoke_run_finds_nothing(target, seeds, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    dict_name = {"fuzz_jpeg": "jpeg", "fuzz_png": "png", "fuzz_gif": "gif", "fuzz_image_any": "image"}.get(
        target, target.removeprefix("fuzz_"))
    res = _run(target, [f"-max_total_time={SMOKE_SECONDS}", "-timeout=60",
                        f"-dict={ROOT / 'cpp' / 'fuzz' / 'dict' / (dict_name + '.dict')}",
                        f"-artifact_prefix={tmp_path}/", corpus, seeds / target], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    runs = re.search(r"Done (\d+) runs", res.stderr)
    assert runs and int(runs.group(1)) > 0, res.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("leak-*"))
