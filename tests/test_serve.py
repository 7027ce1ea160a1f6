"""qks-serve against real servers: `qks-serve` (uvicorn) on a free port of 127.0.0.1, started and
stopped by the tests through its pid. Parity with qks-infer, 16 concurrent clients and the
micro-batching they cause (in /metrics), a label swap under load, bad inputs each with its 4xx, the
queue bound, the per-request timeout and SIGTERM's drain (a second server with a long batching
wait), and a schemathesis run over the service's own OpenAPI schema."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from runtime_fixtures import BLOCK_TORCH, photo, read_jsonl, run_blocked

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY, ADMIN_KEY = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"
USER, ADMIN = {"X-API-Key": API_KEY}, {"X-API-Key": ADMIN_KEY}
NEW_LABELS = ["zebra", "hot air balloon", "cup of coffee", "Éclair", "东京 ramen", "cat"]


# -- the server harness --------------------------------------------------------------------------------


class Served:
    """qks-serve in a child process (its own session), stopped by its pid."""

    def __init__(self, bundle: Path, workdir: Path, *args: str):
        from qks.serving.triton_server import free_ports

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"qks-serve-{self.port}.log"
        exe = Path(sys.executable).with_name("qks-serve")
        cmd = [str(exe), "--bundle", str(bundle), "--port", str(self.port), "--no-verify", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"qks-serve exited with {self.proc.returncode}: {self.log()[-2000:]}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"qks-serve was not ready: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.split(" ")[0] == name)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    (d / "keys.txt").write_text(f"# users\n{API_KEY}\n", encoding="utf-8")
    (d / "admin.txt").write_text(ADMIN_KEY + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def server(runtime_bundle, keys_dir, tmp_path_factory):
    """The main server: its own copy of the tiny bundle, API keys, small limits, a 20 ms batching wait."""
    bundle = tmp_path_factory.mktemp("serve") / "bundle"
    shutil.copytree(runtime_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    s = Served(bundle, keys_dir, "--api-keys-file", str(keys_dir / "keys.txt"), "--admin-keys-file",
               str(keys_dir / "admin.txt"), "--max-batch", "16", "--max-wait-ms", "20", "--max-images", "8",
               "--max-upload-mb", "1", "--max-pixels", "1000000", "--max-labels", "32", "--max-banks", "40",
               "--threads", "1")
    yield s
    code = s.stop()
    assert code == 0, s.log()[-2000:]


def jpeg(name: str = "astronaut", size=(96, 64), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    photo(name).convert("RGB").resize(size).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def tag(server, files=None, data=None, json_body=None, headers=USER, **kw):
    return httpx.post(server.url + "/v1/tag", files=files, data=data, json=json_body, headers=headers, timeout=60, **kw)


# -- behaviour -------------------------------------------------------------------------------------------


def test_serving_imports_no_torch():
    code = BLOCK_TORCH + ("import qks.serving.app, qks.serving.cli, qks.serving.service, qks.serving.triton_model, "
                          "qks.serving.triton_server\n"
                          "assert not [m for m in ('torch', 'open_clip') if m in sys.modules]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _photo_files(photo_dir: Path) -> list[tuple[str, bytes]]:
    names = ["astronaut.jpg", "sub/coffee.png", "sub/deeper/chelsea.JPG", "rocket.webp", "sub/camera_gray.png"]
    return [(n, (photo_dir / n).read_bytes()) for n in names]


def _infer(runtime_bundle, photo_dir, out: Path, *args) -> dict[str, dict]:
    r = run_blocked("infer", [str(photo_dir), "--bundle", str(runtime_bundle), "--backend", "ort-cpu",
                              "--no-progress", "--out", str(out), *args])
    assert r.returncode in (0, 1), r.stderr  # 1: the folder's non-images became error records
    return {rec["image"]: rec for rec in read_jsonl(out) if "error" not in rec}


@pytest.mark.parametrize("options", [[], ["--all-scores"], ["--top-k", "2"], ["--threshold", "0.3", "--labels"]])
def test_records_match_qks_infer(server, runtime_bundle, photo_dir, tmp_path, options):
    """The same images and labels: multipart and base64 JSON both answer qks-infer's records, key for key."""
    args, form, body = list(options), {}, {}
    if "--all-scores" in args:
        form["all_scores"], body["all_scores"] = "true", True
    if "--top-k" in args:
        form["top_k"], body["top_k"] = "2", 2
    if "--threshold" in args:
        form["threshold"], body["threshold"] = "0.3", 0.3
    if "--labels" in args:
        (tmp_path / "labels.txt").write_text("\n".join(NEW_LABELS) + "\n", encoding="utf-8")
        args.append(str(tmp_path / "labels.txt"))
        form["labels"], body["labels"] = NEW_LABELS, NEW_LABELS
    want = _infer(runtime_bundle, photo_dir, tmp_path / "infer.jsonl", *args)
    files = _photo_files(photo_dir)
    r = tag(server, files=[("images", (n, b)) for n, b in files], data=form)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["labels"] == (len(NEW_LABELS) if "--labels" in args else 5)
    assert {rec["image"]: rec for rec in got["results"]} == {n: want[n] for n, _ in files}
    assert [rec["image"] for rec in got["results"]] == [n for n, _ in files]
    r = tag(server, json_body={"images": [{"name": n, "data": base64.b64encode(b).decode()} for n, b in files], **body})
    assert r.status_code == 200 and r.json()["results"] == got["results"]


def test_sixteen_concurrent_clients_are_micro_batched(server):
    blobs = [jpeg(n) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    runs0, images0 = server.metric("qks_batch_images_count"), server.metric("qks_batch_images_sum")
    statuses, lock = [], threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(headers=USER, timeout=60) as c:
            for i in range(6):
                r = c.post(server.url + "/v1/tag", files=[("images", (f"{k}-{i}.jpg", blobs[(k + i) % 4]))])
                ok = r.status_code == 200 and len(r.json()["results"]) == 1 and "labels" in r.json()["results"][0]
                with lock:
                    statuses.append(r.status_code if ok else (r.status_code, r.text))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert statuses == [200] * 96
    runs = server.metric("qks_batch_images_count") - runs0
    images = server.metric("qks_batch_images_sum") - images0
    assert images == 96 and runs < images, (runs, images)  # some engine runs held several requests' images
    assert server.metric("qks_images_total") >= 96


def _until(done, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the clients stopped getting answers"
        time.sleep(0.02)


def test_label_swap_under_load(server):
    old, new = ["cat", "dog", "car"], ["zebra", "boat", "tree", "lamp"]
    r = httpx.put(server.url + "/v1/labels/swap", json={"labels": old}, headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json() == {**r.json(), "bank": "swap", "labels": 3}
    blob, stop, seen, swapped_at = jpeg("coffee"), threading.Event(), [], {}
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(headers=USER, timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = c.post(server.url + "/v1/tag", files=[("images", ("c.jpg", blob))],
                           data={"bank": "swap", "all_scores": "true"})
                with lock:
                    seen.append((sent, r.status_code, list(r.json()["results"][0]["scores"]) if r.status_code == 200
                                 else r.text))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    _until(lambda: len(seen) >= 24)
    r = httpx.put(server.url + "/v1/labels/swap", json={"labels": new}, headers=ADMIN, timeout=60)
    swapped_at["t"] = time.monotonic()
    assert r.status_code == 200 and r.json()["replaced"] is True
    n = len(seen)
    _until(lambda: len(seen) >= n + 24)
    stop.set()
    for t in threads:
        t.join(60)
    assert all(code == 200 for _, code, _ in seen), [s for s in seen if s[1] != 200][:3]
    assert all(names in (old, new) for _, _, names in seen)
    after = [names for sent, _, names in seen if sent > swapped_at["t"]]
    assert after and all(names == new for names in after)
    assert any(names == old for _, _, names in seen)


def test_labels_listing_and_admin_only_put(server):
    r = httpx.get(server.url + "/v1/labels", headers=USER, timeout=30)
    assert r.status_code == 200
    banks = {b["name"]: b for b in r.json()["banks"]}
    assert r.json()["default"] == "default" and banks["default"]["labels"] == 5 == len(banks["default"]["names"])
    assert httpx.put(server.url + "/v1/labels/x", json={"labels": ["a"]}, headers=USER).status_code == 403
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert "auto: picked ort-cpu" in httpx.get(server.url + "/readyz").json()["backend"]


def _bad_cases() -> list:
    """(id, request kwargs, status, part of the reason)."""
    good = jpeg()
    png = io.BytesIO()
    photo("coffee").resize((40, 30)).save(png, "PNG")
    png = png.getvalue()
    b64 = base64.b64encode(good).decode()

    def f(*blobs, **form):
        return {"files": [("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)], "data": form}

    def j(**body):
        return {"json_body": body}

    def raw_json(text: str):
        return {"content": text.encode(), "headers": {**USER, "Content-Type": "application/json"}}

    big_pixels = io.BytesIO()
    from PIL import Image

    Image.new("L", (2000, 1000)).save(big_pixels, "PNG")  # 2 MP, a few kB: refused from its header
    return [
        ("broken-jpeg", f(b"\xff\xd8\xff\xe0 not really a jpeg"), 400, "image 1 (0.jpg)"),
        ("empty-file", f(b""), 400, "empty file"),
        ("truncated-jpeg", f(good[: len(good) // 3]), 400, "image 1"),
        ("truncated-png", f(png[:200]), 400, "image 1"),
        ("text-file", f(b"hello, world\n"), 400, "not a readable image"),
        ("second-image-broken", f(good, b"junk"), 400, "image 2 (1.jpg)"),
        ("pixel-bomb", f(big_pixels.getvalue()), 413, "pixels"),
        ("huge-upload", f(b"\x00" * (1 << 20 + 1)), 413, "bytes"),
        ("too-many-images", f(*[good] * 9), 413, "at most 8"),
        ("no-images-multipart", {"files": {"other": ("a.txt", b"x")}}, 400, "unknown form field"),
        ("images-as-text-field", {"data": {"images": "abc"}, "files": [("labels", ("l.txt", b"x"))]}, 400, ""),
        ("unknown-form-field", f(good, colour="red"), 400, "unknown form field 'colour'"),
        ("top-k-zero", f(good, top_k="0"), 400, "top_k"),
        ("top-k-negative", f(good, top_k="-3"), 400, "top_k"),
        ("top-k-text", f(good, top_k="three"), 400, "top_k must be an integer"),
        ("top-k-float", f(good, top_k="2.5"), 400, "top_k must be an integer"),
        ("threshold-above-1", f(good, threshold="1.5"), 400, "threshold"),
        ("threshold-negative", f(good, threshold="-0.1"), 400, "threshold"),
        ("threshold-nan", f(good, threshold="nan"), 400, "threshold must be a finite number"),
        ("threshold-text", f(good, threshold="high"), 400, "threshold must be a number"),
        ("all-scores-text", f(good, all_scores="maybe"), 400, "all_scores"),
        ("unknown-bank", f(good, bank="nope"), 404, "no label bank 'nope'"),
        ("labels-and-bank", f(good, bank="default", labels="cat"), 400, "not both"),
        ("label-too-long", f(good, labels="x" * 201), 413, "longer than 200"),
        ("too-many-labels", f(good, labels=[f"l{i}" for i in range(33)]), 413, "at most 32"),
        ("blank-label", f(good, labels="   "), 400, "empty"),
        ("wrong-content-type", {"content": good, "headers": {**USER, "Content-Type": "image/jpeg"}}, 415, "content type"),
        ("no-content-type", {"content": b"x", "headers": USER}, 415, "content type"),
        ("text-plain", {"content": b"images", "headers": {**USER, "Content-Type": "text/plain"}}, 415, ""),
        ("bad-json", {"content": b"{not json", "headers": {**USER, "Content-Type": "application/json"}}, 400,
         "invalid JSON"),
        ("empty-json-body", {"content": b"", "headers": {**USER, "Content-Type": "application/json"}}, 400, "empty"),
        ("json-array", {"json_body": [b64]}, 400, "must be an object"),
        ("json-no-images", j(top_k=1), 400, "no images"),
        ("json-images-empty", j(images=[]), 400, "non-empty list"),
        ("json-images-not-list", j(images=b64), 400, "non-empty list"),
        ("bad-base64", j(images=["not base64!!"]), 400, "not valid base64"),
        ("base64-not-text", j(images=[123]), 400, "base64 text"),
        ("base64-of-junk", j(images=[base64.b64encode(b"junk").decode()]), 400, "not a readable image"),
        ("image-object-without-data", j(images=[{"name": "a"}]), 400, "needs \"data\""),
        ("image-object-extra-field", j(images=[{"data": b64, "url": "x"}]), 400, "unknown field 'url'"),
        ("json-unknown-field", j(images=[b64], colour="red"), 400, "unknown field 'colour'"),
        ("json-top-k-bool", j(images=[b64], top_k=True), 400, "top_k must be an integer"),
        ("json-top-k-string", j(images=[b64], top_k="2"), 400, "top_k must be an integer"),
        ("json-threshold-string", j(images=[b64], threshold="0.5"), 400, "finite number"),
        ("json-all-scores-int", j(images=[b64], all_scores=1), 400, "all_scores"),
        ("json-labels-not-list", j(images=[b64], labels="cat"), 400, "labels must be a non-empty list"),
        ("json-labels-number", j(images=[b64], labels=["cat", 3]), 400, "labels[1]"),
        ("json-bank-number", j(images=[b64], bank=3), 400, "bank must be"),
        ("json-unknown-bank", j(images=[b64], bank="nope"), 404, "nope"),
        ("json-name-lone-surrogate", raw_json(f'{{"images": [{{"name": "\\ud800", "data": "{b64}"}}]}}'), 400,
         "valid Unicode"),
        ("json-label-lone-surrogate", raw_json(f'{{"images": ["{b64}"], "labels": ["cat\\udfff"]}}'), 400,
         "labels[0] is not valid Unicode"),
        ("missing-key", {**f(good), "headers": {}}, 401, "API key is required"),
        ("wrong-key", {**f(good), "headers": {"X-API-Key": "not-a-key"}}, 401, "not valid"),
        ("wrong-bearer", {**f(good), "headers": {"Authorization": "Bearer nope"}}, 401, "not valid"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_gets_its_4xx_and_the_server_stays_up(server, case):
    _, kwargs, status, reason = case
    r = tag(server, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and reason in body["error"], body
    if status == 401:
        assert API_KEY not in r.text and "not-a-key" not in r.text and "WWW-Authenticate" in r.headers
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_bad_label_puts_and_routes(server):
    put = server.url + "/v1/labels/"
    cases = [(httpx.put(put + "new", json={"labels": []}, headers=ADMIN), 400),
             (httpx.put(put + "new", json={"names": ["a"]}, headers=ADMIN), 400),
             (httpx.put(put + "new", content=b"a\nb", headers={**ADMIN, "Content-Type": "text/plain"}), 415),
             (httpx.put(put + "-bad", json={"labels": ["a"]}, headers=ADMIN), 400),
             (httpx.put(put + "new", json={"labels": ["a"]}), 401),
             (httpx.get(server.url + "/v1/nothing", headers=USER), 404),
             (httpx.delete(server.url + "/v1/tag", headers=USER), 405)]
    for r, status in cases:
        assert r.status_code == status and list(r.json()) == ["error"], (r.status_code, r.text)
    assert "access" not in server.log() or API_KEY not in server.log() and ADMIN_KEY not in server.log()


def test_access_log_is_json_and_never_holds_keys(server):
    tag(server, files=[("images", ("a.jpg", jpeg()))])
    lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    assert lines and {"request_id", "method", "path", "status", "ms", "client"} <= set(lines[-1])
    assert any(ln["path"] == "/v1/tag" and ln["status"] == 200 and ln["images"] == 1 for ln in lines)
    assert API_KEY not in server.log() and ADMIN_KEY not in server.log()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    """Property-based requests from the service's own OpenAPI schema (positive and negative), with the
    admin key: no 5xx, every status documented, every body and content type as the schema says. One worker:
    with two, hypothesis described lambdas through ast.parse in two threads at once and CPython 3.11's parser
    failed inside schemathesis ("AST constructor recursion depth mismatch", a clean-clone run)."""
    exe = Path(sys.executable).with_name("schemathesis")
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
              "response_headers_conformance")
    r = subprocess.run([str(exe), "run", server.url + "/openapi.json", "--checks", checks, "--max-examples", "60",
                        "--phases", "examples,coverage,fuzzing", "--seed", "1", "--workers", "1", "--no-color",
                        "--generation-database", "none", "-H", f"X-API-Key: {ADMIN_KEY}", "--request-timeout", "60",
                        "--suppress-health-check", "all"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert httpx.get(server.url + "/healthz").status_code == 200


# -- the queue bound, the timeout and SIGTERM's drain: a server that waits long for batches ----------------


@pytest.fixture
def slow_server(runtime_bundle, tmp_path):
    s = Served(runtime_bundle, tmp_path, "--max-wait-ms", "8000", "--max-batch", "8", "--max-queue", "2",
               "--max-in-flight", "3", "--timeout", "4", "--threads", "1")
    yield s
    s.stop()


def _wait_for(server, metric: str, value: int) -> None:
    _until(lambda: server.metric(metric) >= value, 30)


def _wait_for_queue(server, images: int) -> None:
    _wait_for(server, "qks_queue_images", images)


def test_full_queue_in_flight_limit_and_timeout_answer_503(slow_server):
    blob, first = jpeg(), {}
    t = threading.Thread(target=lambda: first.update(r=tag(slow_server, files=[("images", ("a.jpg", blob))] * 2)))
    t.start()
    _wait_for_queue(slow_server, 2)
    r = tag(slow_server, files=[("images", ("b.jpg", blob))])
    assert r.status_code == 503 and "queue is full" in r.json()["error"] and r.headers["Retry-After"] == "1"
    # two clients that send their headers but not their bodies: with the first request, 3 in flight
    head = (b"POST /v1/tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{")
    slow = [socket.create_connection(("127.0.0.1", slow_server.port)) for _ in range(2)]
    try:
        for sock in slow:
            sock.sendall(head)
        _wait_for(slow_server, "qks_in_flight_requests", 4)  # 3 tag requests + this /metrics request
        r = tag(slow_server, files=[("images", ("c.jpg", blob))])
        assert r.status_code == 503 and "requests in flight" in r.json()["error"] and r.headers["Retry-After"] == "1"
    finally:
        for sock in slow:
            sock.close()
    t.join(60)
    # nothing else came to fill the batch: the first request waited past its 4 s timeout
    assert first["r"].status_code == 503 and "timed out" in first["r"].json()["error"]
    assert "Retry-After" in first["r"].headers
    assert httpx.get(slow_server.url + "/healthz").status_code == 200


def test_sigterm_drains_requests_in_flight_then_exits(slow_server):
    blob, result = jpeg(), {}
    t = threading.Thread(target=lambda: result.update(r=tag(slow_server, files=[("images", ("a.jpg", blob))])))
    t.start()
    _wait_for_queue(slow_server, 1)
    slow_server.proc.send_signal(signal.SIGTERM)  # the batcher runs what waits at once; then the process ends
    t.join(60)
    assert result["r"].status_code == 200 and "labels" in result["r"].json()["results"][0]
    assert slow_server.proc.wait(60) == 0, slow_server.log()[-2000:]
    assert "stopped" in slow_server.log()


@pytest.mark.parametrize("args, reason", [
    (["--bundle", "/nonexistent/bundle"], "bundle folder not found"),
    (["--api-keys-file", "/nonexistent/keys.txt"], "cannot read the key file"),
    (["--bank", "nope"], "no label bank 'nope'"),
    (["--max-batch", "0"], "--max-batch"),
])
def test_cli_refusals_are_one_line(runtime_bundle, args, reason):
    """A server that cannot start says why in one line, exit 2, before binding a port."""
    exe = Path(sys.executable).with_name("qks-serve")
    r = subprocess.run([str(exe), "--bundle", str(runtime_bundle), "--port", "1", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("qks-serve: error: "), r.stderr
    assert reason in r.stderr


def test_without_the_serve_extra_it_says_what_to_install(runtime_bundle):
    block = ("import sys\n"
             "class _Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('fastapi', 'uvicorn'):\n"
             "            raise ImportError('blocked', name=name.split('.')[0])\n"
             "sys.meta_path.insert(0, _Block())\n"
             f"from qks.serving.cli import main\nmain(['--bundle', {str(runtime_bundle)!r}])\n")
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pip install 'qks[serve]'" in r.stderr, r.stderr
