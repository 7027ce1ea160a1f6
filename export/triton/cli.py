"""`qks-triton`: the command line over both repository kinds, and `write_labels_only`, which rewrites the
labels of whichever kind REPO holds. Every error is one line on stderr, exit 1 (2 for usage)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from ..errors import ExportError, one_line
from . import common
from .common import DEFAULT_MAX_BATCH, MARKER, TritonError, TritonReport, read_marker
from .image_model import IMAGE_MODELS
from .onnx_repo import write_onnx_labels_only, write_repository
from .python_repo import write_python_labels_only, write_python_repository
from .validate import validate_repository


def write_labels_only(bundle_dir: str | Path, repo: str | Path, *, labels: str | Path | None = None,
                      bank: str | None = None, name: str | None = None, log=None) -> TritonReport:
    """Rewrite only REPO/NAME_scoring for another label list; the image model and ensemble stay."""
    log = log or (lambda msg: None)
    repo = Path(repo)
    if not repo.is_dir():
        raise TritonError(f"Triton repository not found: {repo} (write it first without --labels-only)")
    marker = read_marker(repo)
    if marker is None:
        raise TritonError(f"{repo} is not a qks Triton repository (no {MARKER}); write it without --labels-only")
    if name is not None and name != marker.get("name"):
        raise TritonError(f"{repo} holds the models named {marker.get('name')!r}, not {name!r}")
    if marker.get("backend") == "python":
        return write_python_labels_only(bundle_dir, repo, marker, labels=labels, bank=bank, log=log)
    return write_onnx_labels_only(bundle_dir, repo, marker, labels=labels, bank=bank, log=log)


def _log_default(msg: str) -> None:
    click.echo(f"qks-triton: {msg}", err=True)


def _fail(msg: str, code: int = 1):
    click.echo(f"qks-triton: error: {msg}", err=True)
    sys.exit(code)


BACKENDS = ("onnx", "python")


def _check_only(check_repo: Path) -> None:
    problems = validate_repository(check_repo)
    if len(problems) == 1:
        _fail(f"{check_repo} does not validate: {problems[0]}")
    for p in problems:
        click.echo(f"qks-triton: {p}", err=True)
    if problems:
        _fail(f"{check_repo} does not validate: {len(problems)} problems (above)")
    n = len(_model_folders(check_repo))
    click.echo(f"{check_repo}: valid Triton repository ({n} model{'s' if n != 1 else ''}; configs parsed with "
               "tritonclient's ModelConfig)")


def _write_labels_only_cli(bundle_dir, repo, labels_file, bank, name, backend, image_model, max_batch, gpu_sm, log):
    if image_model != "auto" or max_batch is not None or gpu_sm is not None:
        _fail("--labels-only rewrites the scoring model only: --image-model, --max-batch and --gpu-sm do not apply", 2)
    if backend is not None and repo.is_dir():
        marker = read_marker(repo) or {}
        if marker and marker.get("backend", "onnx") != backend:
            _fail(f"{repo} is a --backend {marker.get('backend', 'onnx')} repository, not --backend {backend}", 2)
    report = write_labels_only(bundle_dir, repo, labels=labels_file, bank=bank, name=name, log=log)
    return report, report.models.get("scoring") or report.models["model"]


def _write_cli(bundle_dir, repo, labels_file, bank, name, backend, image_model, max_batch, gpu_sm, log):
    if backend == "python":
        if gpu_sm is not None:
            _fail("--gpu-sm picks a TensorRT plan; --backend python runs ONNX graphs on the CPU", 2)
        report = write_python_repository(bundle_dir, repo, labels=labels_file, bank=bank, name=name or "qks",
                                         image_model=image_model, max_batch=max_batch, log=log)
    else:
        report = write_repository(bundle_dir, repo, labels=labels_file, bank=bank, name=name or "qks",
                                  image_model=image_model, max_batch=max_batch, gpu_sm=gpu_sm, log=log)
    log(f"label bank: {report.labels} labels ({report.bank_source})")
    return report, ", ".join(report.models.values())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_dir", metavar="BUNDLE", required=False, type=click.Path(path_type=Path))
@click.argument("repo", metavar="REPO", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="onnx: image model (ONNX or TensorRT plan) + scoring model + ensemble, for Triton's onnxruntime "
                   "and tensorrt backends (NGC containers); python: one model running qks.runtime in Triton's "
                   "python backend, pixels or encoded images in (the CPU server from make serve-venv) "
                   "[default: onnx; with --labels-only: the repository's]")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path),
              help="label file (UTF-8, one label a line) for the scoring model; encoded with the bundle's label "
                   "encoder (cached). Default: the bundle's default bank")
@click.option("--bank", help="a label bank stored in the bundle (qks-labels --name)")
@click.option("--name", default=None, help="model name: writes NAME_image, NAME_scoring and the ensemble NAME "
              "(--backend python: the model NAME) [default: qks]")
@click.option("--image-model", type=click.Choice(IMAGE_MODELS), default="auto", show_default=True,
              help="auto: a TensorRT plan built for --gpu-sm if the bundle has one, else the fp32 ONNX graph "
                   "(--backend python: the graph qks-infer runs on the CPU, INT8 if the bundle has it); "
                   "onnx | fp16 | int8: that ONNX graph; plan: the bundle's TensorRT plan")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="max_batch_size [default: the plan's profile max; without a plan the bundle's recorded max "
                   f"batch, else {DEFAULT_MAX_BATCH}]")
@click.option("--gpu-sm", default=None, help="compute capability of the GPU Triton runs on (e.g. 90): picks the "
              "plan built for it")
@click.option("--labels-only", is_flag=True, help="rewrite only the model that holds the labels in an existing "
              "repository (new labels)")
@click.option("--check", "check_repo", metavar="REPO", type=click.Path(path_type=Path), default=None,
              help="only validate the Triton repository REPO (give no BUNDLE then)")
@click.option("--quiet", "-q", is_flag=True, help="print only the result line")
def _cli(bundle_dir, repo, backend, labels_file, bank, name, image_model, max_batch, gpu_sm, labels_only, check_repo,
         quiet):
    """Write a Triton Inference Server model repository REPO from a qks BUNDLE: an image model
    (ONNX or TensorRT plan, dynamic batching), a scoring model holding the label bank (a small ONNX
    graph: max over queries, sigmoid), and an ensemble from pixels to probabilities; or, with
    --backend python, one model that runs the qks runtime (pixels or encoded images in)."""
    log = (lambda msg: None) if quiet else _log_default
    if check_repo is not None:
        if bundle_dir is not None or repo is not None:
            _fail("--check REPO takes no other arguments", 2)
        return _check_only(check_repo)
    if bundle_dir is None or repo is None:
        _fail("give BUNDLE and REPO (or --check REPO); see qks-triton --help", 2)
    write = _write_labels_only_cli if labels_only else _write_cli
    report, what = write(bundle_dir, repo, labels_file, bank, name, backend, image_model, max_batch, gpu_sm, log)
    if report.validated:
        log("validated: every config.pbtxt parses with tritonclient's ModelConfig"
            + ("" if "model" in report.models else " and the ensemble connects"))
    else:
        log(f"validation skipped: {common.tritonclient_missing() or 'tritonclient is not available'}")
    click.echo(f"wrote {report.path} ({what})")


def _model_folders(repo: Path) -> list[str]:
    return [p.name for p in Path(repo).iterdir() if p.is_dir() and not p.name.startswith(".")]


def main(argv: list[str] | None = None) -> None:
    """`qks-triton`: every error one line on stderr, exit 1 (2 for usage), never a traceback."""

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"qks-triton: warning: {message}", err=True)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        _cli.main(args=argv, prog_name="qks-triton", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted; nothing was changed", 130)
    except click.ClickException as e:
        _fail(f"{e.format_message()} (see qks-triton --help)", 2)
    except ExportError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was changed", 130)
    except Exception as e:  # an unexpected failure still gets one line and a non-zero exit
        _fail(f"unexpected {type(e).__name__}: {one_line(e)}")
    finally:
        warnings.showwarning = previous
