"""Run the Triton server that `nvidia-pytriton` bundles on a model repository: `qks-triton-server REPO`.

`pip install nvidia-pytriton==0.7.0` (`make serve-venv` puts it, qks's runtime core and ONNX
Runtime in `.venv-serve`) ships a real `tritonserver` (2.51) with the `python` backend only, so it
serves `qks-triton --backend python` repositories on a CPU. Starting it by hand has traps, which
this module handles:

- the Python backend's stub is shipped per Python version (`python_backend_stubs/3.x/`); a
  backend folder is assembled (symbolic links) with the stub of the serving Python;
- the stub runs `python3` from PATH: the serving environment's `bin` goes first on PATH;
- that Python's own libpython folder (`sysconfig` LIBDIR) goes first on LD_LIBRARY_PATH, else the
  stub may mix two Python builds; `nvidia_pytriton.libs` follows;
- Triton binds 0.0.0.0 by default: here HTTP, gRPC and metrics bind 127.0.0.1 unless told otherwise;
- each server gets its own shared-memory prefix for the Python backend (servers side by side);
- `--model-control-mode explicit` with every model loaded at start is the default, so a
  repository rewritten by `qks-triton --labels-only` is picked up by `POST
  /v2/repository/models/NAME/load`, while the old model keeps serving until the new one is ready.

`TritonServer` (a context manager: started on enter, stopped by its own pid on exit, whatever
happens) is what the tests and `benchmarks/triton_load.py` use. Nothing here imports torch or
tritonclient; readiness is polled over HTTP with the standard library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import click

INSTALL_HINT = "make serve-venv (or pip install 'qks[triton-server]' in a virtual environment of its own: it pins numpy<2)"
MODEL_CONTROL_MODES = ("explicit", "poll", "none")
STOP_TIMEOUT_S = 20.0


class ServerError(RuntimeError):
    """The server cannot be found, started or reached; one line."""


# -- the installation ------------------------------------------------------------------------------

_PROBE = r"""
import importlib.util, json, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
root = None if spec is None else spec.submodule_search_locations[0]
print(json.dumps({"pytriton": root, "version": "%d.%d" % sys.version_info[:2], "bin": sysconfig.get_path("scripts"),
                  "libdir": sysconfig.get_config_var("LIBDIR"), "prefix": sys.prefix}))
"""


@dataclass(frozen=True)
class ServerInstall:
    """Where a Python environment's nvidia-pytriton keeps its tritonserver and Python backend."""

    python: Path
    version: str  # the Python's "3.x": which backend stub runs it
    bin_dir: Path  # the environment's scripts folder (first on PATH)
    libdir: Path | None  # the Python's libpython folder (first on LD_LIBRARY_PATH)
    dist: Path  # pytriton/tritonserver

    @property
    def tritonserver(self) -> Path:
        return self.dist / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.dist / "python_backend_stubs" / self.version / "triton_python_backend_stub"

    @property
    def libs(self) -> Path:
        return self.dist.parent.parent / "nvidia_pytriton.libs"


def find_install(python: str | Path | None = None) -> ServerInstall:
    """nvidia-pytriton's server in the environment of `python` (default: this interpreter)."""
    python = Path(python or sys.executable)
    if not python.exists():
        raise ServerError(f"no Python at {python}: {INSTALL_HINT}")
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        raise ServerError(f"cannot run {python} ({type(e).__name__})") from None
    if not info["pytriton"]:
        raise ServerError(f"nvidia-pytriton is not installed for {python}: {INSTALL_HINT}")
    install = ServerInstall(python, info["version"], Path(info["bin"]), Path(info["libdir"]) if info["libdir"] else None,
                            Path(info["pytriton"]) / "tritonserver")
    for what, path in (("tritonserver", install.tritonserver), (f"the Python {install.version} backend stub", install.stub),
                       ("the python backend", install.dist / "backends" / "python" / "libtriton_python.so")):
        if not path.is_file():
            raise ServerError(f"{what} is missing from {install.dist} (nvidia-pytriton 0.7.0 ships Python 3.8-3.13 "
                              "stubs; reinstall it)")
    return install


def prepare_backends(install: ServerInstall, dest: Path) -> Path:
    """A backend folder for --backend-directory: the python backend with this Python's stub (links)."""
    python_dir = Path(dest) / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    src = install.dist / "backends" / "python"
    for target in (src / "libtriton_python.so", src / "triton_python_backend_utils.py", install.stub):
        link = python_dir / target.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return Path(dest)


def server_env(install: ServerInstall, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(install.bin_dir), env.get("PATH", "")]).rstrip(os.pathsep)
    libs = [str(p) for p in (install.libdir, install.libs) if p is not None]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports nobody listens on now (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_command(install: ServerInstall, repo: Path, backends: Path, *, address: str = "127.0.0.1",
                   http_port: int, grpc_port: int, metrics_port: int | None, model_control: str = "explicit",
                   shm_prefix: str, exit_timeout: int = 10, extra: list[str] | None = None) -> list[str]:
    if model_control not in MODEL_CONTROL_MODES:
        raise ServerError(f"unknown model-control mode {model_control!r} (one of {', '.join(MODEL_CONTROL_MODES)})")
    cmd = [str(install.tritonserver), f"--model-repository={Path(repo).absolute()}",
           f"--backend-directory={backends}", f"--model-control-mode={model_control}",
           f"--http-address={address}", f"--http-port={http_port}",
           f"--grpc-address={address}", f"--grpc-port={grpc_port}",
           f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
           "--pinned-memory-pool-byte-size=0", f"--exit-timeout-secs={exit_timeout}", "--allow-gpu-metrics=false"]
    if metrics_port is None:
        cmd.append("--allow-metrics=false")
    else:
        cmd += [f"--metrics-address={address}", f"--metrics-port={metrics_port}"]
    if model_control == "explicit":
        cmd.append("--load-model=*")
    return cmd + list(extra or [])


# -- a running server ------------------------------------------------------------------------------


class TritonServer:
    """tritonserver on REPO, started on enter and stopped (by its own pid) on exit.

    Ports 0 are picked free. `url` / `grpc_url` are "127.0.0.1:PORT" (tritonclient's form). The log
    goes to `log_path` (in `workdir`, a temporary folder unless given). On SIGTERM Triton waits up
    to `exit_timeout` seconds for in-flight requests, open HTTP connections and loaded models;
    after a refused reload (Triton 2.51) it always waits that long."""

    def __init__(self, repo: str | Path, *, python: str | Path | None = None, model_control: str = "explicit",
                 http_port: int = 0, grpc_port: int = 0, metrics_port: int | None = None, address: str = "127.0.0.1",
                 workdir: str | Path | None = None, startup_timeout: float = 120.0, exit_timeout: int = 10,
                 extra: list[str] | None = None, log_file: bool = True):
        self.repo = Path(repo)
        self.install = find_install(python)
        self.model_control, self.address, self.extra = model_control, address, extra
        self.ports = (http_port, grpc_port, metrics_port)
        self.startup_timeout, self.exit_timeout = startup_timeout, exit_timeout
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="qks-triton-server-")
        self.workdir = Path(workdir or self._tmp.name)
        self.log_path = self.workdir / "tritonserver.log" if log_file else None
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = None

    @property
    def url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> TritonServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if not self.repo.is_dir():
            raise ServerError(f"model repository not found: {self.repo}")
        backends = prepare_backends(self.install, self.workdir / "backends")
        for attempt in range(3):  # a picked port can be taken before the server binds it
            self._launch(backends)
            try:
                return self.wait_ready()
            except ServerError:
                in_use = "address already in use" in self.log().lower()  # (a log file tells)
                self.stop()
                if not in_use or attempt == 2 or 0 not in self.ports[:2]:
                    raise

    def _launch(self, backends: Path) -> None:
        http, grpc, metrics = self.ports
        picked = free_ports(3)
        self.http_port, self.grpc_port = http or picked[0], grpc or picked[1]
        metrics = None if metrics is None else (metrics or picked[2])
        shm = f"qks{os.getpid()}x{os.urandom(3).hex()}"
        cmd = server_command(self.install, self.repo, backends, address=self.address, http_port=self.http_port,
                             grpc_port=self.grpc_port, metrics_port=metrics, model_control=self.model_control,
                             shm_prefix=shm, exit_timeout=self.exit_timeout, extra=self.extra)
        log = open(self.log_path, "ab") if self.log_path else None  # None: the server writes to our stdout
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                                         env=server_env(self.install), cwd=self.workdir, start_new_session=True)
        finally:
            if log:
                log.close()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} before it was ready: "
                                  f"{self._why()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise ServerError(f"tritonserver was not ready after {self.startup_timeout:.0f} s: {self._why()}")

    def _why(self) -> str:
        return _last_error(self.log()) if self.log_path else "see its log above"

    def stop(self) -> int | None:
        """SIGTERM to the server's pid, then SIGKILL after STOP_TIMEOUT_S; returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # Triton stops its Python-backend stubs itself
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
                _kill_leftovers(proc.pid)
        return proc.returncode

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _kill_leftovers(pgid: int) -> None:
    """Python-backend stubs left in the process group of a server that had to be killed (its group:
    start_new_session made the server its leader)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_error(log: str) -> str:
    """The line of a server log that says why: a model's load failure (its first line), else the last error."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    loads = [ln for ln in lines if "failed to load '" in ln and " version " in ln]
    if loads:
        return loads[-1].split('"', 1)[-1].split("\\n")[0].rstrip('"')[:400]
    errors = [ln for ln in lines if ln[:1] == "E" or "error" in ln.lower() or "failed" in ln.lower()]
    pick = errors[-1] if errors else (lines[-1] if lines else "no output")
    return pick[:400]


# -- command line --------------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--address", default="127.0.0.1", show_default=True, help="address HTTP, gRPC and metrics bind to")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True)
@click.option("--no-metrics", is_flag=True, help="no metrics endpoint")
@click.option("--model-control-mode", "model_control", type=click.Choice(MODEL_CONTROL_MODES), default="explicit",
              show_default=True, help="explicit: every model loaded at start, reloaded on POST "
              "/v2/repository/models/NAME/load; poll: reloaded when its files change")
@click.option("--python", type=click.Path(path_type=Path), default=None,
              help="the serving environment's Python [default: this one]")
def _cli(repo, address, http_port, grpc_port, metrics_port, no_metrics, model_control, python):
    """Serve a Triton model repository (qks-triton --backend python) with the tritonserver that
    nvidia-pytriton bundles, in the foreground; Ctrl-C stops it."""
    server = TritonServer(repo, python=python, model_control=model_control, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=None if no_metrics else metrics_port, address=address, log_file=False)
    with server:
        click.echo(f"qks-triton-server: serving {repo} (pid {server.pid}): HTTP {server.url}, gRPC {server.grpc_url}; "
                   "Ctrl-C stops it", err=True)
        code = server.proc.wait()
    raise ServerError(f"tritonserver exited with code {code} (its log is above)")


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so the server is stopped with this process: also
    where the shell started it with SIGINT ignored (a background job, `cmd &`), which Python keeps."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    _stop_on_signals()
    try:
        _cli.main(args=argv, prog_name="qks-triton-server", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("qks-triton-server: stopped", err=True)
    except click.ClickException as e:
        click.echo(f"qks-triton-server: error: {e.format_message()} (see --help)", err=True)
        sys.exit(2)
    except ServerError as e:
        click.echo(f"qks-triton-server: error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
