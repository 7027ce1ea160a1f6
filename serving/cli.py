"""`qks-serve --bundle B [--bank NAME] [--host 127.0.0.1 --port 8000]`: the HTTP tagging service.

The bundle, engine and banks load before the port is bound, so a bad bundle or option is one line
on stderr and exit 2, never a half-started server. uvicorn serves the app; on SIGTERM or Ctrl-C
/readyz turns 503, the listening socket closes, requests in flight finish (up to the request
timeout), the micro-batcher runs what is queued, and the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path

import click

from ..runtime.backend import BACKENDS, PRECISIONS

PROG = "qks-serve"


def _fail(msg: str, code: int = 2):
    click.echo(f"{PROG}: error: {msg}", err=True)
    sys.exit(code)


def _logging(level: str) -> None:
    """Access log lines are JSON objects as they are; the rest is prefixed with the program's name."""
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[plain], force=True)
    access = logging.getLogger("qks.serve.access")
    raw = logging.StreamHandler(sys.stderr)
    raw.setFormatter(logging.Formatter("%(message)s"))
    access.handlers, access.propagate = [raw], False


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundle_dir", default="./bundle", show_default=True, type=click.Path(path_type=Path),
              help="Bundle folder written by qks-export.")
@click.option("--bank", help="The default label bank [default: the bundle's].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Images per engine run (micro-batching across requests).")
@click.option("--max-wait-ms", type=click.FloatRange(0, 10_000), default=2.0, show_default=True,
              help="How long a request waits for others to batch with.")
@click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True,
              help="Images waiting for the engine; beyond it requests get 503 + Retry-After.")
@click.option("--max-images", type=click.IntRange(1), default=64, show_default=True, help="Images per request.")
@click.option("--max-upload-mb", type=click.FloatRange(0.001), default=32.0, show_default=True,
              help="Request body limit (413 beyond).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Pixels per image, read from its header before decoding (413 beyond).")
@click.option("--max-labels", type=click.IntRange(1), default=1000, show_default=True,
              help="Labels in a request's label list or a PUT bank.")
@click.option("--max-banks", type=click.IntRange(1), default=64, show_default=True, help="Label banks held.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds per request (decoding, label encoding, queue, engine); 503 beyond.")
@click.option("--max-in-flight", type=click.IntRange(1), default=64, show_default=True,
              help="Tag requests handled at once (their bodies are held in memory); beyond: 503 + Retry-After.")
@click.option("--workers", type=click.IntRange(1), help="Decode threads (default: min(4, CPUs)).")
@click.option("--api-keys-file", type=click.Path(dir_okay=False, path_type=Path),
              help="API keys, one a line (also $QKS_SERVE_API_KEYS, comma-separated): /v1/ routes need one.")
@click.option("--admin-keys-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Admin keys (also $QKS_SERVE_ADMIN_KEYS): PUT /v1/labels/{bank} needs one when keys are set.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at start.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def _cli(bundle_dir, bank, host, port, backend, precision, threads, max_batch, max_wait_ms, max_queue, max_images,
         max_upload_mb, max_pixels, max_labels, max_banks, timeout_s, max_in_flight, workers, api_keys_file, admin_keys_file,
         no_verify, log_level):
    """Serve a qks bundle over HTTP: POST /v1/tag with image files, get qks-infer's records back."""
    import uvicorn

    from ..engines.base import EngineError
    from ..runtime.labels import LabelError
    from ..runtime.manifest import BundleError
    from .app import create_app
    from .auth import ENV_ADMIN_KEYS, ENV_KEYS, KeyFileError, Keys, read_keys
    from .service import Limits, ServeConfig, ServeError, Service

    _logging(log_level)
    try:
        keys = Keys(read_keys(api_keys_file, ENV_KEYS), read_keys(admin_keys_file, ENV_ADMIN_KEYS))
        limits = Limits(max_images=max_images, max_upload_bytes=int(max_upload_mb * (1 << 20)), max_pixels=max_pixels,
                        max_labels=max_labels, max_banks=max_banks, timeout_s=timeout_s, max_in_flight=max_in_flight)
        config = ServeConfig(bundle_dir, bank=bank, backend=backend, precision=precision, threads=threads,
                             verify=not no_verify, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             limits=limits, **({"decode_workers": workers} if workers else {}))
        service = Service(config)
    except ServeError as e:
        _fail(e.message)
    except (KeyFileError, BundleError, EngineError, LabelError, OSError) as e:
        _fail(str(e) or type(e).__name__)
    if not _loopback(host) and not keys.enabled:
        click.echo(f"{PROG}: warning: binding {host} without API keys: anyone who can reach it can use it "
                   "(--api-keys-file)", err=True)
    click.echo(f"{PROG}: bundle {service.bundle.root}, backend {service.backend_reason}; label banks: "
               f"{', '.join(sorted(service.banks))} (default: {service.default_bank}); max batch {max_batch}, "
               f"max wait {max_wait_ms:g} ms; API keys {'on' if keys.enabled else 'off'}", err=True)
    app = create_app(service, keys)
    server = _server(uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None,
                                    timeout_graceful_shutdown=int(timeout_s) + 5, server_header=False),
                     app.state.qks, service)
    # uvicorn raises the stopping signal again once it has drained, under the handlers it found: these
    # make that a no-op, so a drained server exits 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    click.echo(f"{PROG}: stopped", err=True)


def _server(config, state: dict, service):
    """uvicorn's Server, which on SIGTERM/SIGINT marks the app draining (/readyz and new tag requests
    answer 503) and lets the micro-batcher run what waits at once, then drains as uvicorn does."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state["draining"] = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            state["draining"] = True
            service.batcher.flush()
            await super().shutdown(sockets)

    return DrainingServer(config)


def main(argv: list[str] | None = None) -> None:
    try:
        _cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.ClickException as e:
        _fail(f"{e.format_message()} (see {PROG} --help)")
    except ImportError as e:
        _fail(f"{e.name or e} is not installed: pip install 'qks[serve]'")


if __name__ == "__main__":  # pragma: no cover
    main()
