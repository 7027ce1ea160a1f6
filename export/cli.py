"""`qks-export`: a training checkpoint -> a verified deployment bundle (see `qks.export.bundle`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .errors import ExportError, one_line


def _fail(msg: str) -> None:
    click.echo(f"qks-export: error: {msg}", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
# Paths are checked by the exporter, not click: every user error is one line, exit status 1.
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="checkpoint written by qks-train (RUNDIR/best.pt)")
@click.option("--zero-shot", is_flag=True,
              help="export --backbone alone, no checkpoint: the model's own image embedding scored by its family's "
                   "rule (SigLIP: sigmoid(scale*cos+bias)). Tag before training; train a QKS head where it pays")
@click.option("--backbone", default=None, metavar="SPEC",
              help="with --zero-shot: the backbone, e.g. openclip:ViT-B-16-SigLIP2:webli, openclip:MobileCLIP2-S0:dfndr2b, "
                   "openclip:ARCH.json:none, lite")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="with --zero-shot: a prompt-pool file (one template with {} a line); default: 'a photo of a {}.' "
                   "for sigmoid-trained models (SigLIP), the shipped pool for the others")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="bundle folder to write (an existing bundle there is replaced)")
@click.option("--labels", "labels_files", multiple=True, type=click.Path(path_type=Path),
              help="labels file (one label a line) -> a label bank named by the file stem; repeatable. "
                   "The checkpoint's seen+unseen labels always form the bank 'default'; with --zero-shot the first "
                   "file is the default bank (without one: a shipped list of everyday labels)")
@click.option("--fp16", is_flag=True, help="also write image_encoder.fp16.onnx (float32 I/O, FP16 inside)")
@click.option("--int8", is_flag=True, help="also write image_encoder.int8.onnx (INT8 matrix products for CPUs with "
              "VNNI/AMX; parity against fp32 recorded; qks-infer picks it on the CPU)")
@click.option("--tensorrt", is_flag=True, help="build TensorRT engines under engines/ (TensorRT or TensorRT for RTX)")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="largest batch of the TensorRT optimisation profile")
@click.option("--calibration-images", type=click.Path(path_type=Path), default=None,
              help="folder of real images to verify the graphs on (besides random inputs)")
@click.option("--opset", default=None, type=click.IntRange(min=17), help="ONNX opset (default 18)")
@click.option("--label-cache", type=click.Path(path_type=Path), default=None,
              help="label embedding cache folder (default: label_cache/ beside --ckpt, as qks-train writes it)")
@click.option("--trt-sm", default=None, help="TensorRT for RTX without a GPU: target compute capability, e.g. 86")
@click.option("--triton", "triton_repo", type=click.Path(path_type=Path), default=None,
              help="also write a Triton model repository from the bundle (qks-triton BUNDLE REPO with its defaults)")
@click.option("--quiet", "-q", is_flag=True, help="print only the result line")
def main(ckpt, zero_shot, backbone, prompts, out, labels_files, fp16, int8, tensorrt, max_batch, calibration_images,
         opset, label_cache, trt_sm, triton_repo, quiet):
    """Export a qks checkpoint (or, with --zero-shot, a backbone alone) to a bundle: ONNX graphs verified
    against PyTorch, tokenizer.json, prompts, label banks, and optionally FP16/INT8 graphs and TensorRT
    engines."""
    from .bundle import ExportOptions, export_bundle_report, export_zero_shot_report, read_labels_file
    from .graphs import DEFAULT_OPSET

    log = (lambda msg: None) if quiet else (lambda msg: click.echo(f"qks-export: {msg}", err=True))
    started = time.perf_counter()
    try:
        if triton_repo is not None:  # a REPO that cannot be written is said before a long export, not after
            from .triton import check_target

            check_target(triton_repo)
        labels = {}
        for f in labels_files:
            name, names = read_labels_file(f)
            if name in labels:
                raise ExportError(f"two --labels files are named {name!r} (bank names come from file stems)")
            labels[name] = names
        _check_source(ckpt, zero_shot, backbone, prompts)
        options = ExportOptions(labels=labels, fp16=fp16, int8=int8, tensorrt=tensorrt, max_batch=max_batch,
                                calibration_images=calibration_images, opset=opset or DEFAULT_OPSET,
                                trt_compute_capability=trt_sm, label_cache=label_cache, prompts=prompts)
        if zero_shot:
            report = export_zero_shot_report(backbone, out, options, log=log)
        else:
            report = export_bundle_report(ckpt, out, options, log=log)
    except ExportError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no bundle was written")
    except Exception as e:  # an unexpected failure still gets one line (and a non-zero exit)
        _fail(f"unexpected {type(e).__name__}: {one_line(e)}")
    m = report.manifest
    if not quiet:
        for g in m["graphs"].values():
            v = g["verification"]
            parts = []
            for kind in ("random", "calibration", "prompts", "default_bank"):
                if kind in v:
                    met = next(iter(v[kind].values()))  # the graph's first output (the embedding comes after)
                    emb = v[kind].get("embedding")
                    parts.append(f"{kind}: max|err| {met['max_abs_err']:.2e}, cos {met['cosine_min']:.6f}"
                                 + (f", top5 {met['top5_agreement']:.0%}" if "top5_agreement" in met else "")
                                 + (f", embedding cos {emb['cosine_min']:.6f}" if emb else ""))
            click.echo(f"  {g['file']:<26} {g['bytes'] / 2**20:8.1f} MiB  " + "; ".join(parts))
        for e in m["engines"]:
            click.echo(f"  {e['file']}  ({e['trt_module']} {e['trt_version']}, SM{e['sm']}, {e['precision']})")
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {report.path} ({len(m['files'])} files) in {time.perf_counter() - started:.1f} s")
    if triton_repo is not None:
        from .triton import tritonclient_missing, write_repository

        try:
            tri = write_repository(report.path, triton_repo, log=log)
        except ExportError as e:
            _fail(f"the bundle was written, the Triton repository was not: {e}")
        except KeyboardInterrupt:
            _fail("interrupted; the bundle was written, the Triton repository was not")
        except Exception as e:
            _fail(f"the bundle was written, the Triton repository was not: unexpected {type(e).__name__}: {one_line(e)}")
        checked = "validated" if tri.validated else f"not validated: {tritonclient_missing()}"
        click.echo(f"wrote {tri.path} ({', '.join(tri.models.values())}; {checked})")


def _check_source(ckpt, zero_shot: bool, backbone, prompts) -> None:
    """Exactly one source: --ckpt, or --zero-shot with --backbone."""
    if zero_shot:
        if ckpt is not None:
            raise ExportError("--zero-shot exports a backbone alone: give --backbone SPEC, not --ckpt")
        if not backbone:
            raise ExportError("--zero-shot needs --backbone SPEC (e.g. openclip:ViT-B-16-SigLIP2:webli)")
        return
    if ckpt is None:
        raise ExportError("give --ckpt RUNDIR/best.pt, or --zero-shot --backbone SPEC to export a backbone alone")
    for flag, value in (("--backbone", backbone), ("--prompts", prompts)):
        if value is not None:
            raise ExportError(f"{flag} goes with --zero-shot (a checkpoint names its own backbone and prompts)")


if __name__ == "__main__":  # pragma: no cover
    main()
