"""`qks-train` and `qks-eval`: bad input gives a one-line error and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click

from .config import RECIPES

LOSS_NAMES = ["asl", "asl-masked", "bce", "bce-masked", "ranking"]


@contextmanager
def _user_errors():
    """Expected failures (bad data, bad checkpoint, bad options) become click errors."""
    from .checkpoint import CheckpointError
    from .data import ManifestError
    from .evaluate import EvalError
    from .train import TrainError

    try:
        yield
    except (ManifestError, TrainError, EvalError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # an image that cannot be decoded mid-run, a full disk, ...
        raise click.ClickException(_last_line(str(e))) from None


def _last_line(message: str) -> str:
    """A DataLoader worker's error carries the worker's traceback; its last line is the error."""
    if "Original Traceback" in message:
        lines = [ln for ln in message.strip().splitlines() if ln.strip()]
        return lines[-1].split(": ", 1)[-1] if lines else message
    return message


_TRAIN_HELP = """Train the QKS head on the seen labels of a JSONL manifest (--data).

The paper's recipe by default: AdamW (lr 1e-5, weight decay 1e-4), batch 64, Cutout + flip +
RandAugment, ReduceLROnPlateau on the validation score, up to 60 epochs. The validation split is
carved from --data, and 10 % of the seen labels are held out of training (--val-concepts) and scored
on it like unseen labels; the score is mAP + the sum of F1@K on the trained labels plus the same on the
held-out ones. By default the backbone's own zero-shot scores are added to the head's (--zero-shot),
with a weight fitted on that score after every epoch. Writes best.pt, last.pt, metrics.jsonl and
run.json to --out; --resume RUNDIR continues a stopped run exactly (losing at most the epoch that was
running)."""


@click.command(help=_TRAIN_HELP)
@click.option("--data", type=click.Path(dir_okay=False), help="Training manifest (JSONL). Required unless --resume.")
@click.option("--seen", type=click.Path(dir_okay=False), help="Seen labels, one a line (trained on). Required unless --resume.")
@click.option("--unseen", type=click.Path(dir_okay=False), help="Unseen labels, one a line: allowed in the manifest, never trained on.")
@click.option("--backbone", default=None, help="Backbone spec, e.g. openclip:ViT-B-16:openai (default) or "
              "openclip:<config.json>:<checkpoint|none>.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="Head size and F1@K of the paper's recipe: nuswide (L=7, Nq=12, K=3,5; default) or "
              "openimages (L=8, Nq=22, K=10,20).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to create. Required unless --resume.")
@click.option("--layers", type=int, default=None, help="Head decoder layers L (default: the recipe's); 0 = the "
              "projection-only ablation (every image token projected, no queries).")
@click.option("--queries", type=int, default=None, help="Learnable query tokens Nq (default: the recipe's).")
@click.option("--width", type=int, default=None, help="Head width (default: the backbone's token width).")
@click.option("--heads", type=int, default=None, help="Attention heads; must divide the width (default 12).")
@click.option("--ffn", type=int, default=None, help="Feed-forward hidden size (default 3072).")
@click.option("--dropout", type=float, default=None, help="Dropout in the head (default 0.1).")
@click.option("--memory-norm/--no-memory-norm", default=None, help="LayerNorm on the image tokens before "
              "the decoder (default on; it matters for tokens not already LayerNormed, like the lite backbone's).")
@click.option("--zero-shot/--no-zero-shot", default=None, help="Add the backbone's own zero-shot scores to the "
              "head's, weighted by validation (default on: it keeps what the backbone knows of labels never "
              "trained; off: the paper's head alone).")
@click.option("--drop-cls", is_flag=True, default=None, help="The head reads the patch tokens only, not CLS.")
@click.option("--epochs", type=int, default=None, help="Epochs to train (default 60). With --resume: the new total.")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default 64).")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (default 1e-5).")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-4).")
@click.option("--loss", type=click.Choice(LOSS_NAMES), default=None,
              help="asl (default, the paper), bce, their -masked forms that ignore unknown labels, or ranking.")
@click.option("--plateau-patience", type=int, default=None, help="Epochs without a better validation "
              "score before the learning rate drops tenfold (default 2).")
@click.option("--device", default=None, help="auto (default: CUDA if present), cpu, cuda or cuda:N. "
              "Mixed precision (bf16) on CUDA.")
@click.option("--seed", type=int, default=None, help="Seed of the split, the head's init, shuffling and "
              "augmentation (default 0).")
@click.option("--cached-tokens", is_flag=True, default=None, help="Compute the backbone's image tokens once "
              "(eval transform, no augmentation) into RUNDIR/tokens.npy: practical CPU training.")
@click.option("--val-fraction", type=float, default=None, help="Share of --data held out for validation "
              "(default 0.05, at most 20,000 images; 0 = none: no schedule, best.pt is the last epoch).")
@click.option("--val-concepts", type=float, default=None, help="Share of the seen labels held out of training "
              "and validated like unseen labels (default 0.1; 0 = none: the score is the trained labels' only).")
@click.option("--prompts", default=None, help="Prompt pool: 'default' (80 CLIP templates + 5 scene ones) or "
              "a text file, one template with {} a line.")
@click.option("--label-cache", type=click.Path(file_okay=False), default=None, help="Label-embedding cache, "
              "shareable between runs (default: RUNDIR/label_cache).")
@click.option("--workers", type=int, default=None, help="Image-loading worker processes (default 4).")
@click.option("--threads", type=int, default=None, help="PyTorch CPU threads (default: 1 with --cached-tokens "
              "on a CPU, where the head's small matrices run fastest on one; else PyTorch's, one per core).")
@click.option("--skip-bad", is_flag=True, default=None, help="Drop bad manifest lines with a warning "
              "instead of stopping.")
@click.option("--no-amp", is_flag=True, default=None, help="Full fp32 on CUDA too.")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last.pt, with its saved options "
              "(only --epochs, --device, --workers, --threads and --label-cache may change).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_main(resume, quiet, **given):
    from .train import RESUME_OVERRIDABLE, TrainOptions, train

    given = {k: v for k, v in given.items() if v is not None}
    if "no_amp" in given:
        given["amp"] = not given.pop("no_amp")
    if resume:
        fixed = sorted(k for k in given if k not in RESUME_OVERRIDABLE)
        if fixed:
            raise click.UsageError("--resume uses the run's saved options; remove "
                                   + ", ".join("--" + k.replace("_", "-") for k in fixed))
        with _user_errors():
            summary = train(resume=resume, overrides=given, progress=not quiet, log=click.echo)
    else:
        missing = [f"--{k}" for k in ("data", "seen", "out") if k not in given]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or pass --resume RUNDIR)")
        with _user_errors():
            summary = train(TrainOptions(**given), progress=not quiet, log=click.echo)
    click.echo(f"done: {summary.get('epoch')} epoch(s), best validation score {summary['best_score']:.4f}")


_EVAL_HELP = """Evaluate a checkpoint on a test manifest (--data): ZSL (unseen labels, images with an
unseen positive) and GZSL (all labels, images with a positive) mAP and F1@K, as a table and JSON."""


class _ListOptionCommand(click.Command):
    """Lets `--topk 3 5` mean `--topk 3 --topk 5` (click options take one value each)."""

    list_options = ("--topk",)

    def parse_args(self, ctx, args):
        out, i = [], 0
        while i < len(args):
            if args[i] in self.list_options:
                j = i + 1
                while j < len(args) and args[j].lstrip("-").isdigit() and not args[j].startswith("--"):
                    out += [args[i], args[j]]
                    j += 1
                if j == i + 1:
                    out.append(args[i])  # no value: click reports it
                i = j
                continue
            out.append(args[i])
            i += 1
        return super().parse_args(ctx, out)


@click.command(cls=_ListOptionCommand, help=_EVAL_HELP)
@click.option("--ckpt", required=True, type=click.Path(), help="A checkpoint (RUNDIR/best.pt) or a run directory.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Test manifest (JSONL).")
@click.option("--seen", type=click.Path(dir_okay=False), help="Seen labels (default: the checkpoint's).")
@click.option("--unseen", type=click.Path(dir_okay=False), help="Unseen labels (default: the checkpoint's).")
@click.option("--topk", type=int, multiple=True, help="K of F1@K: --topk 3 5 (or --topk 3 --topk 5); "
              "default: the recipe's (3, 5 for nuswide, 10, 20 for openimages).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--predictions", type=click.Path(dir_okay=False), help="Write JSONL records "
              '{"image": <as in the manifest>, "scores": {label: probability}} for every image and label.')
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=4, show_default=True, help="Image-loading worker processes.")
@click.option("--threads", type=click.IntRange(1), default=None, help="PyTorch CPU threads (default: PyTorch's).")
@click.option("--label-cache", type=click.Path(file_okay=False), help="Label-embedding cache "
              "(default: label_cache/ beside the checkpoint).")
@click.option("--skip-bad", is_flag=True, help="Drop bad manifest lines with a warning instead of stopping.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_main(ckpt, data, seen, unseen, topk, out_path, predictions, batch_size, device, workers, threads,
              label_cache, skip_bad, quiet):
    from .evaluate import evaluate, format_table, write_predictions

    if batch_size < 1:
        raise click.UsageError("--batch-size must be >= 1")
    if threads:
        import torch

        torch.set_num_threads(threads)
    with _user_errors():
        result = evaluate(ckpt, data, seen=seen, unseen=unseen, topk=topk or None, batch_size=batch_size,
                          device=device, workers=workers, skip_bad=skip_bad, label_cache=label_cache,
                          progress=not quiet)
        if result.report["skipped_lines"]:
            click.echo(f"warning: skipped {result.report['skipped_lines']} bad line(s) of {data}", err=True)
        click.echo(format_table(result.report))
        if out_path:
            Path(out_path).write_text(json.dumps(result.report, indent=2) + "\n")
            click.echo(f"report: {out_path}")
        if predictions:
            write_predictions(predictions, result)
            click.echo(f"predictions: {predictions}")
