"""The C ABI and the sanitizer build: a C program that uses only qks.h, the C++ example, an
installed libqks found with find_package(qks), and the AddressSanitizer/UBSan build of qks-tag,
qks-pixels and the C program on the odd and broken images and on tampered bundles (no memory
error, no undefined behaviour, no leak; the same output as the release build)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cpp_fixtures import (
    ASAN_BUILD,
    BUILD,
    CPP,
    TAMPERING,
    cpp_env,
    make_broken_images,
    make_odd_images,
    run_tool,
    skip_reason,
)

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "images"
    make_odd_images(root / "odd")
    make_broken_images(root / "broken")
    return root


def test_c_program_tags_through_qks_h(runtime_bundle, zoo, tmp_path):
    odd = sorted((zoo / "odd").glob("*.jpg"))[:4]
    broken = zoo / "broken" / "text.jpg"
    res = run_tool(BUILD, "tag_image_c", [runtime_bundle, *odd, broken])
    assert res.returncode == 1, res.stderr  # one image failed
    lines = res.stdout.splitlines()
    assert lines[-1] == f"{broken}: error: not a readable image (unidentified format)"
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    tops = [ln for ln in lines if not ln.startswith("{")][:-1]
    assert len(records) == len(tops) == 4
    ref = run_tool(BUILD, "qks-tag", [zoo / "odd", "--bundle", runtime_bundle, "--all-scores", "--threads", "1"])
    by_name = {json.loads(ln)["image"]: json.loads(ln) for ln in ref.stdout.splitlines()}
    for path, rec, top in zip(odd, records, tops, strict=True):
        assert rec == dict(by_name[path.name], image=str(path))  # qks_results_record == qks-tag's record
        best = sorted(rec["scores"].items(), key=lambda kv: -kv[1])[:3]
        assert top == f"{path}: " + " ".join(f"{k}={v:.4f}" for k, v in best)
    bad = run_tool(BUILD, "tag_image_c", [tmp_path / "no-bundle", odd[0]])
    assert bad.returncode == 2 and bad.stderr.strip() == f"tag_image: bundle folder not found: {tmp_path / 'no-bundle'}"


def test_cpp_example(runtime_bundle, zoo):
    img = sorted((zoo / "odd").glob("*.png"))[0]
    res = run_tool(BUILD, "tag_image_cpp", [runtime_bundle, img, zoo / "broken" / "empty.jpg"])
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0].startswith(f"{img}:") and out[0].count("=") == 5
    assert out[1] == f"{zoo / 'broken' / 'empty.jpg'}: error: empty file (0 bytes)"


def test_installed_package_config_builds_a_consumer(runtime_bundle, zoo, tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", str(BUILD), "--prefix", str(prefix)], check=True, capture_output=True)
    assert (prefix / "include" / "qks" / "qks.h").is_file()
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    shutil.copy(CPP / "examples" / "tag_image.c", consumer / "main.c")
    (consumer / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(consumer C)\nfind_package(qks 0.1 REQUIRED)\n"
        "add_executable(consumer main.c)\ntarget_link_libraries(consumer PRIVATE qks::qks)\n")
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", consumer, "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}"], ["cmake", "--build", build]):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    img = sorted((zoo / "odd").glob("*.png"))[0]
    r = subprocess.run([str(build / "consumer"), str(runtime_bundle), str(img)], capture_output=True, text=True,
                       env=cpp_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{img}:")


# -- AddressSanitizer / UBSan ------------------------------------------------------------------------

asan = pytest.mark.skipif(skip_reason(ASAN_BUILD) is not None, reason=skip_reason(ASAN_BUILD) or "")


def assert_clean(res: subprocess.CompletedProcess) -> None:
    bad = [m for m in SANITIZER_MARKS if m in res.stderr]
    assert not bad and res.returncode not in (98, 99), res.stderr[-4000:]


@asan
def test_sanitizer_build_tags_the_zoo_like_the_release_build(runtime_bundle, zoo, tmp_path):
    args = [zoo, "--bundle", runtime_bundle, "--threads", "1", "--workers", "2", "--batch-size", "5", "--all-scores"]
    san = run_tool(ASAN_BUILD, "qks-tag", [*args, "--out", tmp_path / "asan.jsonl"], timeout=600)
    assert_clean(san)
    rel = run_tool(BUILD, "qks-tag", [*args, "--out", tmp_path / "rel.jsonl"])
    assert san.returncode == rel.returncode == 1
    assert (tmp_path / "asan.jsonl").read_bytes() == (tmp_path / "rel.jsonl").read_bytes()


@asan
def test_sanitizer_build_preprocesses_every_file(runtime_bundle, zoo, tmp_path):
    files = sorted(p for p in zoo.rglob("*") if p.is_file() or p.is_symlink())
    out = tmp_path / "pix"
    out.mkdir()
    res = run_tool(ASAN_BUILD, "qks-pixels", ["--bundle", runtime_bundle, "--out", out, *files], timeout=600)
    assert_clean(res)
    assert res.returncode == 0
    assert len(list(out.iterdir())) == len(files)


@asan
def test_sanitizer_build_refuses_tampered_bundles_and_runs_the_c_program(bundle_copy, zoo):
    img = sorted((zoo / "odd").glob("*.jpg"))[0]
    res = run_tool(ASAN_BUILD, "tag_image_c", [bundle_copy, img, zoo / "broken" / "jpeg_corrupt.jpg", zoo / "broken" / "empty.jpg"])
    assert_clean(res)
    assert res.returncode == 1
    for case in ("bank_pickle", "bank_more_names", "path_traversal", "symlink_outside", "graph_bytes_changed"):
        work = bundle_copy.parent / f"t_{case}"
        shutil.copytree(bundle_copy, work, symlinks=True)
        TAMPERING[case](work)
        r = run_tool(ASAN_BUILD, "qks-tag", [zoo / "odd", "--bundle", work])
        assert_clean(r)
        assert r.returncode == 2 and r.stderr.strip().startswith("qks-tag: error: "), r.stderr
