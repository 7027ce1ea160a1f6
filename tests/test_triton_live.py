"""A real Triton server serving qks: nvidia-pytriton's tritonserver 2.51 from the serving environment
(`make serve-venv` -> .venv-serve; $QKS_SERVE_VENV names another) on 127.0.0.1 and free ports,
explicit model-control mode, the `qks-triton --backend python` repository of the tiny bundle.
Checked with tritonclient over HTTP and gRPC: qks-infer's probabilities for encoded images and for
pixels at batch 1 and 8, dynamic batching, a --labels-only swap while requests keep coming, clear
error responses for a broken image, a wrong shape and a wrong dtype, and a server that is stopped
by its own pid whatever happens. Skipped, with the reason, when the serving environment is missing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import photo
from test_triton_python import qks_infer_scores
from triton_helpers import NEW_LABELS, triton_cli, write_labels

ROOT = Path(__file__).resolve().parent.parent
SERVE_VENV = Path(os.environ.get("QKS_SERVE_VENV") or ROOT / ".venv-serve")
PHOTOS = {"astronaut.jpg": "astronaut", "coffee.png": "coffee", "chelsea.webp": "chelsea", "rocket.jpg": "rocket",
          "camera.png": "camera", "coins.jpg": "coins", "hubble.jpg": "hubble_deep_field", "logo.png": "logo"}
BROKEN = b"\xff\xd8\xff\xe0 truncated jpeg"

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed (pip install 'qks[triton]')")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (pip install 'qks[triton]')")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _missing_serving_environment() -> str | None:
    from qks.serving.triton_server import ServerError, find_install

    try:
        find_install(SERVE_VENV / "bin" / "python")
    except ServerError as e:
        return f"no serving environment at {SERVE_VENV} ({e})"
    return None


_MISSING = _missing_serving_environment()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")  # before any fixture is made


def _serve_python() -> Path:
    return SERVE_VENV / "bin" / "python"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight real photos (scikit-image) as JPEG, PNG (grey, RGBA) and WebP files."""
    root = tmp_path_factory.mktemp("live-photos")
    for name, source in PHOTOS.items():
        photo(source).save(root / name, **({"quality": 95} if name.endswith((".jpg", ".webp")) else {}))
    return root


@pytest.fixture(scope="module")
def expected(runtime_bundle, photos, tmp_path_factory) -> dict[str, np.ndarray]:
    """qks-infer's probabilities per file, in the bank's label order."""
    from qks.runtime.bundle import Bundle
    from qks.runtime.labels import LabelBank

    scores = qks_infer_scores(runtime_bundle, photos, tmp_path_factory.mktemp("infer") / "scores.jsonl")
    names = LabelBank.from_bundle(Bundle.load(runtime_bundle)).names
    assert sorted(scores) == sorted(PHOTOS)
    return {f: np.array([s[n] for n in names]) for f, s in scores.items()}


def _repo(bundle: Path, out: Path) -> Path:
    code, _out, err = triton_cli([bundle, out, "--backend", "python", "--max-batch", "8", "-q"])
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def pyrepo_live(runtime_bundle, tmp_path_factory) -> Path:
    """The module's repository (max_batch_size 8), served read-only."""
    _serve_python()
    return _repo(runtime_bundle, tmp_path_factory.mktemp("live-repo") / "repo")


@pytest.fixture(scope="module")
def server(pyrepo_live):
    from qks.serving.triton_server import TritonServer

    with TritonServer(pyrepo_live, python=_serve_python()) as s:
        yield s
    assert s.proc is None  # stopped


def _inputs(mod, name: str, arr: np.ndarray, dtype: str):
    inp = mod.InferInput(name, list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return [inp]


def _blobs(photos: Path, files: list[str]) -> np.ndarray:
    return np.array([[(photos / f).read_bytes()] for f in files], dtype=object)


def _pixels(bundle: Path, photos: Path, files: list[str]) -> np.ndarray:
    from qks.runtime.bundle import Bundle

    pp = Bundle.load(bundle).preprocess
    return np.stack([pp.load(photos / f) for f in files])


@pytest.fixture
def clients(request):
    """tritonclient clients, closed after the test (an open HTTP connection holds a stopping server
    for its whole exit timeout)."""
    made = []

    def make(mod, url):
        made.append(mod.InferenceServerClient(url))
        return made[-1]
    yield make
    for c in made:
        c.close()


def _client(clients, mod, server):
    return clients(mod, server.url if mod is http else server.grpc_url)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("form", ["image", "pixels"])
def test_probabilities_equal_qks_infer_at_batch_1_and_8(server, runtime_bundle, photos, expected, protocol, form,
                                                        clients):
    mod = http if protocol == "http" else grpc
    client = _client(clients, mod, server)
    assert client.is_server_ready() and client.is_model_ready("qks")
    files = sorted(PHOTOS)

    def infer(batch: list[str]):
        arr, dtype = ((_blobs(photos, batch), "BYTES") if form == "image" else
                      (_pixels(runtime_bundle, photos, batch), "FP32"))
        res = client.infer("qks", _inputs(mod, form, arr, dtype))
        probs, logits = res.as_numpy("probabilities"), res.as_numpy("logits")
        assert probs.dtype == logits.dtype == np.float32 and probs.shape == logits.shape == (len(batch), 5)
        np.testing.assert_allclose(1 / (1 + np.exp(-logits.astype(np.float64))), probs, rtol=0, atol=1e-6)
        # `selected`: p >= the label's threshold (a bank without qks-calibrate's thresholds: 0.5 each)
        assert np.array_equal(res.as_numpy("selected"), probs >= np.float32(0.5))
        return probs

    want = np.stack([expected[f] for f in files])
    one_by_one = np.concatenate([infer([f]) for f in files])
    np.testing.assert_allclose(one_by_one, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(infer(files), want, rtol=0, atol=1e-5)


def test_dynamic_batching_groups_concurrent_requests(server, photos, expected, clients):
    """16 one-image requests sent over gRPC while the model works on an 8-image one: all answered with
    qks-infer's numbers, and Triton's statistics count fewer model executions than requests (the
    dynamic batcher grouped the queued ones)."""
    client = clients(grpc, server.grpc_url)
    stats = client.get_inference_statistics("qks", as_json=True)["model_stats"][0]
    before = (int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)))
    files = sorted(PHOTOS) + [sorted(PHOTOS)[i % len(PHOTOS)] for i in range(16)]
    done, results = threading.Semaphore(0), {}

    def callback(i):
        def cb(result, error):
            results[i] = error if error is not None else result.as_numpy("probabilities")
            done.release()
        return cb

    requests = [files[:8]] + [[f] for f in files[8:]]
    for i, batch in enumerate(requests):
        client.async_infer("qks", _inputs(grpc, "image", _blobs(photos, batch), "BYTES"), callback(i))
    for _ in requests:
        assert done.acquire(timeout=60)
    for i, batch in enumerate(requests):
        assert not isinstance(results[i], Exception), results[i]
        np.testing.assert_allclose(results[i], [expected[f] for f in batch], rtol=0, atol=1e-5)
    deadline = time.monotonic() + 30  # Triton records an execution's statistics after its responses are sent
    while True:
        stats = client.get_inference_statistics("qks", as_json=True)["model_stats"][0]
        inferences = int(stats.get("inference_count", 0)) - before[0]
        executions = int(stats.get("execution_count", 0)) - before[1]
        if inferences >= 8 + 16 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert inferences == 8 + 16 and executions < len(requests), (inferences, executions)


def _error(call) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clear_errors_and_the_server_stays_up(server, runtime_bundle, photos, expected, protocol,
                                                               clients):
    mod = http if protocol == "http" else grpc
    client = _client(clients, mod, server)
    good = _blobs(photos, ["coffee.png"])
    pixels = _pixels(runtime_bundle, photos, ["coffee.png"])
    broken = np.array([[good[0, 0]], [BROKEN]], dtype=object)
    cases = [
        (lambda: client.infer("qks", _inputs(mod, "image", broken, "BYTES")), "image 2 of 2: "),
        (lambda: client.infer("qks", _inputs(mod, "image", np.array([[b""]], dtype=object), "BYTES")),
         "image: empty image (0 bytes)"),
        (lambda: client.infer("qks", _inputs(mod, "pixels", pixels[:, :, :16], "FP32")),
         "unexpected shape for input 'pixels' for model 'qks'. Expected [-1,3,32,32], got [1,3,16,32]"),
        (lambda: client.infer("qks", _inputs(mod, "pixels", pixels.astype(np.float64), "FP64")),
         "inference input 'pixels' data-type is 'FP64', but model 'qks' expects 'FP32'"),
        (lambda: client.infer("qks", _inputs(mod, "image", np.zeros((1, 1), np.int32), "INT32")),
         "inference input 'image' data-type is 'INT32', but model 'qks' expects 'BYTES'"),
        (lambda: client.infer("qks", _inputs(mod, "pixels", pixels, "FP32") + _inputs(mod, "image", good, "BYTES")),
         "give exactly one input"),
        (lambda: client.infer("qks", _inputs(mod, "image", np.repeat(good, 9, axis=0), "BYTES")),
         "batch-size must be <= 8"),
    ]
    for call, expect in cases:
        message = _error(call)
        assert expect in message and "\n" not in message and "Traceback" not in message, (expect, message)
        assert server.proc.poll() is None and client.is_server_live() and client.is_model_ready("qks")
    res = client.infer("qks", _inputs(mod, "image", good, "BYTES"))  # still serving the right numbers
    np.testing.assert_allclose(res.as_numpy("probabilities")[0], expected["coffee.png"], rtol=0, atol=1e-5)
    assert "decode" in _error(cases[0][0]) or "readable" in _error(cases[0][0])


def _request_loop(url: str, blob: np.ndarray, stop: threading.Event, log: list) -> None:
    """Requests one after another until `stop`: (start, end, label count or the error)."""
    with http.InferenceServerClient(url) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                n = client.infer("qks", _inputs(http, "image", blob, "BYTES")).as_numpy("probabilities").shape[1]
            except Exception as e:  # recorded, asserted on below
                n = f"{type(e).__name__}: {e}"
            log.append((start, time.monotonic(), n))


def test_label_swap_while_serving(runtime_bundle, photos, tmp_path, clients):
    """--labels-only, then load_model in explicit mode, with two clients sending requests all along:
    no request fails, the old labels are served until the reload, the new ones after it, and the new
    probabilities are qks-infer's for the new labels."""
    from qks.serving.triton_server import TritonServer

    python = _serve_python()
    repo = _repo(runtime_bundle, tmp_path / "repo")
    labels = write_labels(tmp_path / "new.txt", NEW_LABELS)
    want = qks_infer_scores(runtime_bundle, photos, tmp_path / "new.jsonl", labels)["chelsea.webp"]
    blob = _blobs(photos, ["chelsea.webp"])
    with TritonServer(repo, python=python) as server:
        stop, logs = threading.Event(), [[], []]
        threads = [threading.Thread(target=_request_loop, args=(server.url, blob, stop, log)) for log in logs]
        for t in threads:
            t.start()
        try:
            while min(len(log) for log in logs) < 5:
                time.sleep(0.05)
            code, _out, err = triton_cli([runtime_bundle, repo, "--labels-only", "--labels", labels, "-q"])
            assert code == 0, err
            client = clients(http, server.url)
            load_started = time.monotonic()
            client.load_model("qks")  # explicit mode: the new folder is loaded, then replaces the old model
            reloaded = time.monotonic()
            while min(sum(1 for s, _e, _n in log if s > reloaded) for log in logs) < 5:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        entries = [e for log in logs for e in log]
        failed = [n for _s, _e, n in entries if not isinstance(n, int)]
        assert failed == [], failed[:3]
        assert {n for _s, e, n in entries if e < load_started} == {5}  # the rewritten files alone change nothing
        assert {n for s, _e, n in entries if s > reloaded} == {len(NEW_LABELS)}
        res = client.infer("qks", _inputs(http, "image", blob, "BYTES"))
        np.testing.assert_allclose(res.as_numpy("probabilities")[0], [want[n] for n in NEW_LABELS], rtol=0, atol=1e-5)
        top = http.InferRequestedOutput("probabilities", class_count=len(NEW_LABELS))
        ranked = client.infer("qks", _inputs(http, "image", blob, "BYTES"), outputs=[top]).as_numpy("probabilities")
        assert sorted(r.decode().split(":", 2)[2] for r in ranked[0]) == sorted(NEW_LABELS)  # classification labels
        pid = server.pid
        client.close()
    assert server.proc is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_broken_reload_is_refused_and_the_old_model_keeps_serving(runtime_bundle, photos, expected, tmp_path,
                                                                     clients):
    """load_model on a damaged folder: HTTP 400 with the model's own reason; the loaded model stays."""
    from qks.serving.triton_server import TritonServer

    repo = _repo(runtime_bundle, tmp_path / "repo")
    # exit_timeout 2: after a refused reload Triton 2.51 waits its whole exit timeout when stopped
    with TritonServer(repo, python=_serve_python(), exit_timeout=2) as server:
        client = clients(http, server.url)
        np.save(repo / "qks" / "1" / "labels.npy", np.zeros((5, 32), np.float32))
        message = _error(lambda: client.load_model("qks"))
        assert "labels.npy does not match its sha256" in message, message
        res = client.infer("qks", _inputs(http, "image", _blobs(photos, ["rocket.jpg"]), "BYTES"))
        np.testing.assert_allclose(res.as_numpy("probabilities")[0], expected["rocket.jpg"], rtol=0, atol=1e-5)
        client.close()


def test_a_model_that_cannot_load_stops_the_start_with_its_reason(runtime_bundle, tmp_path):
    from qks.serving.triton_server import ServerError, TritonServer

    repo = _repo(runtime_bundle, tmp_path / "repo")
    (repo / "qks" / "1" / "image_encoder.onnx").unlink()
    server = TritonServer(repo, python=_serve_python())
    with pytest.raises(ServerError) as e:
        with server:
            pass
    assert "image_encoder.onnx is missing" in str(e.value) and "\n" not in str(e.value)
    assert server.proc is None


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_the_serving_environment_and_its_command(runtime_bundle, pyrepo_live, tmp_path, stop):
    """.venv-serve has no torch (nor onnx: it cannot write repositories, and says so in one line), and
    its qks-triton-server serves a repository on 127.0.0.1 until Ctrl-C or SIGTERM, which stop the
    server too: also when it was started with SIGINT ignored, as a shell's background job is."""
    import re
    import signal
    import subprocess
    import urllib.request

    python = _serve_python()
    bin_dir = python.parent
    r = subprocess.run([str(python), "-c", "import importlib.util as u; "
                        "print([m for m in ('torch', 'torchvision', 'open_clip', 'onnx') if u.find_spec(m)])"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = subprocess.run([str(bin_dir / "qks-triton"), str(runtime_bundle), str(tmp_path / "repo"), "--backend", "python"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "needs the onnx package: pip install 'qks[triton]'" in r.stderr
    assert r.stderr.count("error") == 1 and "Traceback" not in r.stderr
    cli = subprocess.Popen([str(bin_dir / "qks-triton-server"), str(pyrepo_live), "--http-port", "0", "--grpc-port", "0",
                            "--no-metrics"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pid = None
    try:
        line = ""
        while "serving" not in line:
            line = cli.stderr.readline()
            assert line or cli.poll() is None, "qks-triton-server ended before serving"
        url = re.search(r"HTTP (127\.0\.0\.1:\d+)", line)[1]
        pid = int(re.search(r"\(pid (\d+)\)", line)[1])
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=10) as resp:
            assert resp.status == 200
        cli.send_signal(getattr(signal, stop))  # Ctrl-C, or a service manager's stop
        assert cli.wait(60) == 0  # before reading: a server left running would hold stderr open
        assert "qks-triton-server: stopped" in cli.stderr.read()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the tritonserver it started is gone with it
        pid = None
    finally:
        if cli.poll() is None:
            cli.kill()
        if pid is not None:  # a tritonserver left behind would keep its ports and stderr
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cli.wait(30)
