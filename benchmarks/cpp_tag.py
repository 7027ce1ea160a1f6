"""qks-tag (C++, cpp/) against qks-infer (Python) on the same bundle and images: throughput and start-up.

Method: both commands run as separate processes over the same folder of synthetic 640x480 JPEGs
(qks.runtime.bench.generate_images: PIL-drawn gradients, shapes and mild noise), same bundle, same
image graph (--precision), same --batch-size, --threads (ONNX Runtime intra-op threads) and
decode workers (min(4, CPUs), both), output to a file. Rounds alternate the two commands so a
shared machine's noise falls on both. Per run:
- `images/s`: the command's own figure (its summary line: images / seconds from the first decode
  to the last record; bundle loading and the ONNX Runtime session excluded);
- `wall s`: the whole process (start-up included), measured here;
- `start-up s`: the whole process on an empty folder (bundle checks with every file's sha256,
  ONNX Runtime loaded and the session created, the label bank, then nothing to tag); `no-verify`:
  the same with --no-verify (sizes checked, no sha256), which leaves the session creation.
The records of the two are compared too (same images, same labels in the same order, the largest
probability difference, how many lines are byte-identical).

    python benchmarks/cpp_tag.py --bundle /tmp/vitb16 [--images 48] [--batch-size 8] [--threads 1] [--rounds 2]

Needs `make cpp` (cpp/build/qks-tag). A benchmark that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) images tagged \((\d+) errors, \d+ already done\) in ([0-9.]+) s, ([0-9.]+) images/s")


def ort_library() -> str:
    import onnxruntime

    libs = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.1.*"))
    return str(libs[-1])


def command(tool: str, images: Path, bundle: Path, out: Path | None, args: list[str]) -> list[str]:
    common = [str(images), "--bundle", str(bundle), *args] + (["--out", str(out), "--overwrite"] if out else [])
    if tool == "qks-tag":
        return [str(ROOT / "cpp" / "build" / "qks-tag"), *common]
    return [sys.executable, "-c", "from qks.runtime.cli import infer_main; infer_main()", *common, "--no-progress"]


def run(tool: str, images: Path, bundle: Path, out: Path | None, args: list[str]) -> dict:
    env = dict(os.environ, QKS_ORT_LIBRARY=ort_library())
    t0 = time.perf_counter()
    res = subprocess.run(command(tool, images, bundle, out, args), capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 1):
        raise SystemExit(f"{tool} failed ({res.returncode}): {res.stderr.strip().splitlines()[-1]}")
    m = SUMMARY.search(res.stderr)
    return {"tool": tool, "wall_s": round(wall, 3), "images": int(m.group(1)) if m else 0,
            "seconds": float(m.group(3)) if m else 0.0, "images_per_s": float(m.group(4)) if m else 0.0}


def compare(cpp: Path, py: Path) -> dict:
    a = [json.loads(line) for line in cpp.read_text(encoding="utf-8").splitlines()]
    b = [json.loads(line) for line in py.read_text(encoding="utf-8").splitlines()]
    same_images = [r["image"] for r in a] == [r["image"] for r in b]
    diffs = [abs(x["labels"][k] - y["labels"][k]) for x, y in zip(a, b, strict=False) for k in y.get("labels", {})
             if k in x.get("labels", {})]
    same_labels = all(list(x.get("labels", {})) == list(y.get("labels", {})) for x, y in zip(a, b, strict=False))
    return {"records": len(a), "same_images": same_images, "same_labels": same_labels,
            "max_probability_diff": max(diffs) if diffs else 0.0,
            "identical_lines": sum(x == y for x, y in zip(cpp.read_text().splitlines(), py.read_text().splitlines(), strict=False))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=int, default=48, help="synthetic 640x480 JPEGs to tag")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for both")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not (ROOT / "cpp" / "build" / "qks-tag").is_file():
        raise SystemExit("no cpp/build/qks-tag: run `make cpp` first")

    from qks.runtime.bench import cpu_info, generate_images, versions

    work = Path(tempfile.mkdtemp(prefix="qks-cpp-bench-"))
    images = generate_images(work / "images", args.images)
    empty = work / "empty"
    empty.mkdir()
    opts = ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--precision", args.precision,
            "--top-k", str(args.top_k)]
    runs, starts = [], []
    for r in range(args.rounds):
        order = ("qks-tag", "qks-infer") if r % 2 == 0 else ("qks-infer", "qks-tag")
        for tool in order:
            starts.append(dict(run(tool, empty, args.bundle, None, opts), round=r))
            starts.append(dict(run(tool, empty, args.bundle, None, [*opts, "--no-verify"]), round=r, no_verify=True))
            runs.append(dict(run(tool, images, args.bundle, work / f"{tool}.jsonl", opts), round=r))
            print(f"round {r + 1} {tool:9s}: {runs[-1]['images_per_s']:6.2f} images/s, wall {runs[-1]['wall_s']:6.1f} s, "
                  f"start-up {starts[-2]['wall_s']:5.2f} s ({starts[-1]['wall_s']:5.2f} s --no-verify)", flush=True)
    parity = compare(work / "qks-tag.jsonl", work / "qks-infer.jsonl")

    def summary(tool: str) -> dict:
        ips = [x["images_per_s"] for x in runs if x["tool"] == tool]
        return {"images_per_s_median": statistics.median(ips), "images_per_s_rounds": ips,
                "wall_s_median": statistics.median(x["wall_s"] for x in runs if x["tool"] == tool),
                "startup_s_median": statistics.median(x["wall_s"] for x in verified if x["tool"] == tool),
                "startup_s_rounds": [x["wall_s"] for x in verified if x["tool"] == tool],
                "startup_no_verify_s_median": statistics.median(x["wall_s"] for x in starts
                                                                if x["tool"] == tool and x.get("no_verify"))}

    verified = [x for x in starts if not x.get("no_verify")]

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    report = {"machine": {"cpu": cpu_info(), "versions": versions(), "load_average": os.getloadavg()},
              "model": manifest["model"].get("backbone"), "bundle": str(args.bundle),
              "options": {"images": args.images, "batch_size": args.batch_size, "threads": args.threads,
                          "precision": args.precision, "top_k": args.top_k, "rounds": args.rounds},
              "method": __doc__.split("Method: ")[1].split("\n\n")[0], "runs": runs, "startup_runs": starts,
              "summary": {t: summary(t) for t in ("qks-tag", "qks-infer")}, "parity": parity}
    s = report["summary"]
    print(f"\n{manifest['model'].get('backbone')}, {args.images} images, batch {args.batch_size}, "
          f"--threads {args.threads}, precision {args.precision}, {args.rounds} rounds; CPU: {report['machine']['cpu']['model']}, "
          f"{report['machine']['cpu']['usable_cpus']} CPUs, load {report['machine']['load_average'][0]:.2f}")
    print("| command | images/s (median) | per round | wall s | start-up s | start-up s, --no-verify |")
    print("|---|---|---|---|---|---|")
    for t in ("qks-tag", "qks-infer"):
        print(f"| {t} | {s[t]['images_per_s_median']:.2f} | {', '.join(f'{v:.2f}' for v in s[t]['images_per_s_rounds'])} "
              f"| {s[t]['wall_s_median']:.1f} | {s[t]['startup_s_median']:.2f} | {s[t]['startup_no_verify_s_median']:.2f} |")
    print(f"ratio qks-tag / qks-infer: {s['qks-tag']['images_per_s_median'] / s['qks-infer']['images_per_s_median']:.2f}x "
          f"images/s, start-up {s['qks-infer']['startup_s_median'] / s['qks-tag']['startup_s_median']:.1f}x faster")
    print(f"parity: {parity}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
