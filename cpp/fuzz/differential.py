"""The differential check: files through libqks's image pipeline (qks_fuzz_pixels, the fuzz build)
and through Pillow + the Python runtime's preprocessing (qks.runtime.infer.decode_image), which
must agree: the same float32 tensor bit for bit, or an error on both sides (with the same text,
reported separately).

    python cpp/fuzz/differential.py [--save DIR] [--driver BIN] PATH...   # files or folders
    python cpp/fuzz/differential.py --mutants 20000 --seed 1 PATH...      # plus random mutants of them

Why a batch driver and not the Python side inside the fuzzer: an embedded interpreter would run
Pillow's C code in the fuzz process, where ASan, libFuzzer's leak and memory checks and its coverage
feedback would all count Pillow's behaviour as ours, and every execution would pay for the GIL and
numpy. Replaying the corpora the coverage-guided targets grew (every input that reached new code)
through both sides tests exactly the inputs that matter, at Pillow's full speed, with no coupling.

Exit status 0: no divergence beyond KNOWN; 1: divergences (listed, and copied to --save).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "cpp" / "build-fuzz" / "fuzz" / "qks_fuzz_pixels"
BATCH = 200

# qks-tag names the formats it does not read (BMP, TIFF, WebP, ...) in its error; qks-infer reads them.
OTHER_FORMAT = "(qks-tag reads JPEG, PNG and GIF; qks-infer reads it)"
# Inputs whose difference is not in qks's code: sha256 of the file -> why (FUZZING.md, "Known differences").
# A JPEG whose difference goes away when libqks runs on Pillow's own libjpeg-turbo (3.2, bundled in its
# wheel, against Debian bookworm's 2.1.5) is classified "libjpeg" automatically, not listed here.
KNOWN: dict[str, str] = {}


@dataclass
class Outcome:
    tensor_sha: str | None = None
    error: str | None = None
    skipped: bool = False

    def kind(self) -> str:
        return "skipped" if self.skipped else "error" if self.error is not None else "tensor"


def pillow_libjpeg() -> str:
    """The libjpeg-turbo Pillow's wheel bundles (pillow.libs/libjpeg-*.so.62*)."""
    import PIL

    libs = sorted((Path(PIL.__file__).parent.parent / "pillow.libs").glob("libjpeg-*.so.62*"))
    if not libs:
        raise SystemExit("differential: no libjpeg in pillow.libs (a Pillow not installed from its wheel?)")
    return str(libs[-1])


def cpp_outcomes(driver: Path, files: list[Path], preload: str | None = None) -> list[Outcome]:
    env = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"}
    if preload:  # libqks on another libjpeg of the same ABI (libjpeg.so.62): the library's share of a difference
        env = {"LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=1:verify_asan_link_order=0",
               "UBSAN_OPTIONS": "halt_on_error=1"}
    out = []
    for i in range(0, len(files), BATCH):
        batch = files[i:i + BATCH]
        res = subprocess.run([str(driver), *map(str, batch)], capture_output=True, text=True,
                             env=env)
        if res.returncode != 0:  # a sanitizer report or a crash: find the file it happened on
            done = len(res.stdout.splitlines())
            raise SystemExit(f"qks_fuzz_pixels failed on {batch[done]} (exit {res.returncode}):\n{res.stderr[-3000:]}")
        for line in res.stdout.splitlines():
            r = json.loads(line)
            out.append(Outcome(r.get("sha256"), r["error"], r["skipped"]))
    return out


def python_outcome(path: Path) -> Outcome:
    from qks.runtime.infer import decode_image
    from qks.runtime.preprocess import Preprocess

    size = path.stat().st_size
    squash = size % 2 == 1  # as fuzz_image.cpp and qks_fuzz_pixels choose
    pp = Preprocess(size=24, resize_mode="squash" if squash else "shortest",
                    interpolation="bilinear" if squash else "bicubic")
    _, pixels, error = decode_image(None, str(path), pp)
    if error is not None:
        return Outcome(error=error)
    return Outcome(tensor_sha=hashlib.sha256(pixels.astype("float32").tobytes()).hexdigest())


def collect(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return files


def snapshot(files: list[Path], out: Path) -> list[Path]:
    """Copies of the files (a running fuzzer replaces corpus files while they are read)."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, f in enumerate(files):
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            continue
        copies.append(out / f"{i:06d}-{f.name}")
        copies[-1].write_bytes(data)
    return copies


def write_mutants(files: list[Path], n: int, seed: int, out: Path) -> list[Path]:
    """n copies of randomly picked files (under 60 KB), each with 1-4 byte edits: set, insert, delete
    or flip. Blind, unlike the coverage-guided targets, but it reaches what changes pixels without
    breaking a checksum (quantisation tables, EXIF fields, palettes, filter bytes)."""
    rng = random.Random(seed)
    pool = [f for f in files if f.stat().st_size < 60_000] or files
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        f = rng.choice(pool)
        d = bytearray(f.read_bytes())
        for _ in range(rng.randint(1, 4)):
            k, op = (rng.randrange(len(d)) if d else 0), rng.random()
            if op < 0.6 and d:
                d[k] = rng.randrange(256)
            elif op < 0.75:
                d[k:k] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op < 0.9 and d:
                del d[k:k + rng.randint(1, 16)]
            elif d:
                d[k] ^= 1 << rng.randrange(8)
        made.append(out / f"{f.stem}-{seed}-{i}{f.suffix}")
        made[-1].write_bytes(bytes(d))
    return made


def compare(files: list[Path], driver: Path, preload: str | None = None) -> dict[str, list]:
    """{"agree", "known", "libjpeg", "skipped", "other_format": [file], "text", "diverge": [(file, python, c++)]}"""
    result = {k: [] for k in ("agree", "text", "diverge", "skipped", "known", "other_format", "libjpeg")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, EXIF and palette notes
        outcomes = [(f, c, None if c.skipped else python_outcome(f)) for f, c in zip(files, cpp_outcomes(driver, files, preload),
                                                                                      strict=True)]
    for f, c, p in outcomes:
        if c.skipped or (c.error or "").endswith(OTHER_FORMAT):
            result["skipped" if c.skipped else "other_format"].append(f)
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if p.kind() == c.kind() == "tensor" and p.tensor_sha == c.tensor_sha:
            result["agree"].append(f)
        elif p.kind() == c.kind() == "error":
            result["agree" if p.error == c.error else "text"].append(f if p.error == c.error else (f, p, c))
        elif digest in KNOWN and not preload:
            result["known"].append(f)
        else:
            result["diverge"].append((f, p, c))
    if not preload and any(f.read_bytes()[:3] == b"\xff\xd8\xff" for f, _, _ in result["diverge"]):
        again = compare([f for f, _, _ in result["diverge"]], driver, pillow_libjpeg())
        gone = set(again["agree"]) | {f for f, _, _ in again["text"]}
        result["libjpeg"] = [f for f, _, _ in result["diverge"] if f in gone]
        result["diverge"] = [d for d in result["diverge"] if d[0] not in gone]
    return result


def report(r: dict, save: Path | None) -> None:
    for f, p, c in r["diverge"]:
        print(f"DIVERGE {f}: python {p.kind()} {p.error or p.tensor_sha} / c++ {c.kind()} {c.error or c.tensor_sha}")
        if save:
            save.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, save / (hashlib.sha256(f.read_bytes()).hexdigest()[:16] + f.suffix))
    for f, p, c in r["text"]:
        print(f"TEXT {f}: python {p.error!r} / c++ {c.error!r}")
    n = sum(len(v) for v in r.values())
    print(f"differential: {n} files: {len(r['agree'])} agree, {len(r['diverge'])} diverge, "
          f"{len(r['text'])} errors with other texts, {len(r['known'])} known differences, "
          f"{len(r['libjpeg'])} from the libjpeg-turbo version (agree on Pillow's), "
          f"{len(r['skipped'])} above 16 M pixels (not compared), {len(r['other_format'])} in formats qks-tag names")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--driver", type=Path, default=DRIVER)
    ap.add_argument("--save", type=Path, help="copy every diverging input here (named by its sha256)")
    ap.add_argument("--mutants", type=int, default=0, help="also compare this many random mutants of the files")
    ap.add_argument("--seed", type=int, default=1, help="the mutants' random seed")
    ap.add_argument("--pillow-libjpeg", action="store_true",
                    help="run libqks on the libjpeg-turbo of Pillow's wheel: compares only qks's own code")
    args = ap.parse_args(argv)
    if not args.driver.is_file():
        print(f"differential: no {args.driver}: run cpp/scripts/fuzz.sh build", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        files = snapshot(collect(args.paths), Path(tmp) / "in")
        if args.mutants:
            files += write_mutants(files, args.mutants, args.seed, Path(tmp))
        r = compare(files, args.driver, pillow_libjpeg() if args.pillow_libjpeg else None)
        report(r, args.save)
    return 1 if r["diverge"] else 0


if __name__ == "__main__":
    sys.exit(main())
