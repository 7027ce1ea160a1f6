"""`qks-prepare`: the public NUS-WIDE and Open Images V4 releases -> qks manifests and label lists.

Both commands write to `--out`: `train.jsonl`, `test.jsonl`, `seen.txt`, `unseen.txt` and
`prepare.json` (counts). Image paths are written relative to `--out` when the images lie under it,
absolute otherwise. Images listed by the release but missing on disk (both sets are crawled from
Flickr, and many links are dead) are left out and counted.

NUS-WIDE (the layout of the official release, as the QKS reference code reads it):

    ROOT/Concepts81.txt (or ConceptsList/Concepts81.txt)  the 81 concepts (unseen labels)
    ROOT/NUS_WID_Tags/TagList1k.txt                       the 1,000 tags
    ROOT/NUS_WID_Tags/Train_Tags1k.dat, Test_Tags1k.dat   0/1 matrices, a row per image
    ROOT/ImageList/TrainImagelist.txt, TestImagelist.txt  image paths (Windows separators)
    ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt   0/1 per test image
    ROOT/Flickr/<category>/<file>.jpg                     the images

Seen labels: the 1,000 tags minus those naming one of the 81 concepts (925); unseen: the 81
concepts. Training lines: the seen tags of training images with at least one. Test lines: seen tags
plus the concept ground truth. NUS-WIDE is fully annotated: unlisted labels are negative.

Open Images V4 (the 2018_04 release, laid out as the LESA / BiAM / QKS reference code reads it):

    ROOT/2018_04/class-descriptions.csv                   MID,display name (no header)
    ROOT/2018_04/classes-trainable.txt                    the 7,186 trainable MIDs (seen labels)
    ROOT/2018_04/train/train-annotations-human-imagelabels.csv   ImageID,Source,LabelName,Confidence
    ROOT/2018_04/test/test-annotations-human-imagelabels.csv
    ROOT/2018_04/unseen_labels.pkl + top_400_unseen.csv   the 400 unseen labels of the LESA split
                                                          (or --unseen-list FILE: MIDs or names)
    ROOT/train/**/<ImageID>.jpg, ROOT/test/**/<ImageID>.jpg

Labels are display names (a name shared by two MIDs gets its MID appended). Human-verified image
labels: confidence 1 is positive, 0 negative, absent unknown (`"unlisted": "unknown"`). A label
verified both ways for one image (two sources disagree) is left unknown. Training lines carry seen
labels only; test lines seen and unseen.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from collections import defaultdict
from pathlib import Path

import click

NUSWIDE_SEEN, NUSWIDE_UNSEEN = 925, 81
OPENIMAGES_SEEN, OPENIMAGES_UNSEEN = 7186, 400


class PrepareError(Exception):
    """A release that is not laid out as expected; the message says what is missing."""


def _need(path: Path) -> Path:
    if not path.is_file():
        raise PrepareError(f"missing release file: {path}")
    return path


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in _need(path).read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def _image_ref(path: Path, out: Path) -> str:
    """Relative to the manifest's folder when the image lies under it, else absolute."""
    path, out = Path(os.path.abspath(path)), Path(os.path.abspath(out))
    try:
        return path.relative_to(out).as_posix()
    except ValueError:
        return str(path)


def _write_jsonl(path: Path, records) -> int:
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def _write_list(path: Path, labels: list[str]) -> None:
    path.write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")


def _progress(it, desc: str, quiet: bool, total: int | None = None):
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, unit="line", disable=quiet, leave=False)


# ---- NUS-WIDE ----------------------------------------------------------------------------------

def _nuswide_image_path(entry: str) -> str:
    """`actor\\0001_2124494179.jpg` or `C:\\ImageData\\Flickr\\actor\\...` -> `actor/0001_....jpg`."""
    p = entry.strip().replace("\\", "/")
    if "Flickr/" in p:
        p = p.rsplit("Flickr/", 1)[1]
    return p


def _matrix_rows(path: Path, width: int, quiet: bool):
    with _need(path).open(encoding="utf-8") as f:
        for i, line in enumerate(_progress(f, path.name, quiet), 1):
            row = line.split()
            if not row:
                continue
            if len(row) != width:
                raise PrepareError(f"{path}:{i}: {len(row)} columns, expected {width}")
            yield [int(v) for v in row]


def prepare_nuswide(root: str | Path, out: str | Path, quiet: bool = True) -> dict:
    root, out = Path(root), Path(out)
    # The release ships it in ConceptsList/; the reference code expects it at the root: take either.
    concepts_file = root / "Concepts81.txt"
    if not concepts_file.is_file() and (root / "ConceptsList" / "Concepts81.txt").is_file():
        concepts_file = root / "ConceptsList" / "Concepts81.txt"
    concepts = _lines(concepts_file)
    tags = _lines(root / "NUS_WID_Tags" / "TagList1k.txt")
    concept_set = set(concepts)
    seen = [t for t in tags if t not in concept_set]
    seen_cols = [j for j, t in enumerate(tags) if t not in concept_set]
    unseen = concepts
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"dataset": "nuswide", "seen": len(seen), "unseen": len(unseen)}

    def records(split: str):
        names = _lines(root / "ImageList" / f"{split.capitalize()}Imagelist.txt")
        rows = _matrix_rows(root / "NUS_WID_Tags" / f"{split.capitalize()}_Tags1k.dat", len(tags), quiet)
        truth = None
        if split == "test":
            truth = []
            for c in concepts:
                col = [int(v) for v in _lines(root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_Test.txt")]
                if len(col) != len(names):
                    raise PrepareError(f"Labels_{c}_Test.txt has {len(col)} lines for {len(names)} test images")
                truth.append(col)
        missing = empty = n_rows = 0
        for i, row in enumerate(rows):
            n_rows += 1
            if i >= len(names):
                break  # reported below
            name = names[i]
            labels = [seen[k] for k, j in enumerate(seen_cols) if row[j] == 1]
            if truth is not None:
                labels += [c for c, col in zip(concepts, truth, strict=True) if col[i] == 1]
            if not labels:
                empty += 1
                continue
            path = root / "Flickr" / _nuswide_image_path(name)
            if not path.is_file():
                missing += 1
                continue
            yield {"image": _image_ref(path, out), "labels": labels, "unlisted": "negative"}
        if n_rows != len(names):
            raise PrepareError(f"{split}: {len(names)} images listed but {n_rows} rows of tags")
        stats[split] = {"listed": len(names), "missing_images": missing, "no_positive": empty}

    for split in ("train", "test"):
        stats[split + "_images"] = _write_jsonl(out / f"{split}.jsonl", records(split))
    _write_list(out / "seen.txt", seen)
    _write_list(out / "unseen.txt", unseen)
    _finish(out, stats, NUSWIDE_SEEN, NUSWIDE_UNSEEN)
    return stats


# ---- Open Images V4 ------------------------------------------------------------------------------

class _StringsOnly(pickle.Unpickler):
    """Unpickles plain containers of strings and numpy string arrays, nothing that runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _lesa_unseen(release: Path) -> list[str]:
    """The LESA split's 400 unseen MIDs: rows of top_400_unseen.csv index unseen_labels.pkl."""
    pkl, top = _need(release / "unseen_labels.pkl"), _need(release / "top_400_unseen.csv")
    try:
        with pkl.open("rb") as f:
            all_unseen = [str(x) for x in _StringsOnly(f).load()]
    except Exception as e:
        raise PrepareError(f"{pkl}: not a list of label ids ({e})") from None
    idx = [int(row[0]) for row in csv.reader(top.open(encoding="utf-8")) if row and row[0].strip()]
    if any(i < 0 or i >= len(all_unseen) for i in idx):
        raise PrepareError(f"{top}: an index is out of range for {len(all_unseen)} labels in {pkl.name}")
    return [all_unseen[i] for i in idx]


def _read_descriptions(path: Path) -> dict[str, str]:
    names = {}
    with _need(path).open(encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) >= 2:
                names[row[0].strip()] = row[1].strip()
    return names


def _index_images(folder: Path, quiet: bool) -> dict[str, Path]:
    """ImageID -> file, over every sub-folder (the release shards train/ into folders)."""
    index = {}
    if not folder.is_dir():
        raise PrepareError(f"missing image folder: {folder}")
    for dirpath, _, files in _progress(os.walk(folder), f"indexing {folder.name}/", quiet):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in (".jpg", ".jpeg", ".png"):
                index[stem] = Path(dirpath) / name
    return index


def _read_image_labels(path: Path, wanted: dict[str, int], quiet: bool) -> dict[str, dict[int, set]]:
    """ImageID -> {1: positive label indices, 0: negative ones} over the `wanted` MIDs."""
    per_image: dict[str, dict[int, set]] = defaultdict(lambda: {1: set(), 0: set()})
    with _need(path).open(encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = {"ImageID", "LabelName", "Confidence"}
        if not cols <= set(reader.fieldnames or ()):
            raise PrepareError(f"{path}: expected the columns {', '.join(sorted(cols))}")
        for row in _progress(reader, path.name, quiet):
            j = wanted.get(row["LabelName"])
            if j is None:
                continue
            conf = float(row["Confidence"])
            per_image[row["ImageID"]][1 if conf >= 1 else 0].add(j)
    return per_image


def _unique_names(mids: list[str], names: dict[str, str]) -> list[str]:
    """Display names, with the MID appended where two MIDs share one."""
    raw = [names.get(m, m) for m in mids]
    count = defaultdict(int)
    for n in raw:
        count[n] += 1
    return [f"{n} ({m})" if count[n] > 1 else n for n, m in zip(raw, mids, strict=True)]


def prepare_openimages(root: str | Path, out: str | Path, unseen_list: str | Path | None = None,
                       quiet: bool = True) -> dict:
    root, out = Path(root), Path(out)
    release = root / "2018_04"
    names = _read_descriptions(release / "class-descriptions.csv")
    seen_mids = _lines(release / "classes-trainable.txt")
    if unseen_list:
        entries = _lines(Path(unseen_list))
        by_name = {n: m for m, n in names.items()}
        unseen_mids = [e if e in names else by_name.get(e, "") for e in entries]
        unknown = [e for e, m in zip(entries, unseen_mids, strict=True) if not m]
        if unknown:
            raise PrepareError(f"{unseen_list}: {unknown[0]!r} is neither a MID nor a display name of "
                               "class-descriptions.csv")
    else:
        unseen_mids = _lesa_unseen(release)
    clash = set(seen_mids) & set(unseen_mids)
    if clash:
        raise PrepareError(f"{len(clash)} unseen label(s) are also trainable, e.g. {sorted(clash)[0]}")
    # Sorted by display name, as the reference code orders them.
    all_mids = sorted(seen_mids, key=lambda m: names.get(m, m)) + sorted(unseen_mids, key=lambda m: names.get(m, m))
    all_names = _unique_names(all_mids, names)
    seen, unseen = all_names[:len(seen_mids)], all_names[len(seen_mids):]
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"dataset": "openimages", "seen": len(seen), "unseen": len(unseen),
                   "renamed_duplicates": sum(1 for n, m in zip(all_names, all_mids, strict=True)
                                             if n != names.get(m, m))}

    def records(split: str, n_labels: int):
        wanted = {m: j for j, m in enumerate(all_mids[:n_labels])}
        per_image = _read_image_labels(release / split / f"{split}-annotations-human-imagelabels.csv", wanted, quiet)
        images = _index_images(root / split, quiet)
        missing = conflicts = 0
        for image_id in sorted(per_image):
            labels = per_image[image_id]
            path = images.get(image_id)
            if path is None:
                missing += 1
                continue
            both = labels[1] & labels[0]
            conflicts += len(both)
            pos, neg = sorted(labels[1] - both), sorted(labels[0] - both)
            if not pos and not neg:
                continue
            yield {"image": _image_ref(path, out), "labels": [all_names[j] for j in pos],
                   "negatives": [all_names[j] for j in neg], "unlisted": "unknown"}
        stats[split] = {"annotated": len(per_image), "missing_images": missing, "conflicting_labels": conflicts}

    stats["train_images"] = _write_jsonl(out / "train.jsonl", records("train", len(seen)))
    stats["test_images"] = _write_jsonl(out / "test.jsonl", records("test", len(all_mids)))
    _write_list(out / "seen.txt", seen)
    _write_list(out / "unseen.txt", unseen)
    _finish(out, stats, OPENIMAGES_SEEN, OPENIMAGES_UNSEEN)
    return stats


def _finish(out: Path, stats: dict, n_seen: int, n_unseen: int) -> None:
    if (stats["seen"], stats["unseen"]) != (n_seen, n_unseen):
        stats["warning"] = (f"{stats['seen']} seen / {stats['unseen']} unseen labels, not the paper's "
                            f"{n_seen} / {n_unseen}: is this the full release?")
    (out / "prepare.json").write_text(json.dumps(stats, indent=2) + "\n")


# ---- CLI ---------------------------------------------------------------------------------------

def _report(stats: dict, out: Path) -> None:
    click.echo(f"{stats['dataset']}: {stats['seen']} seen / {stats['unseen']} unseen labels; "
               f"{stats['train_images']} training and {stats['test_images']} test images -> {out}")
    for split in ("train", "test"):
        if stats[split]["missing_images"]:
            click.echo(f"  {split}: {stats[split]['missing_images']} listed image(s) not on disk, left out")
    if "warning" in stats:
        click.echo(f"warning: {stats['warning']}", err=True)


@click.group(help="Turn a public dataset release into qks manifests (train.jsonl, test.jsonl) and label "
             "lists (seen.txt, unseen.txt), ready for qks-train and qks-eval.")
def main():
    pass


_root = click.option("--root", required=True, type=click.Path(exists=True, file_okay=False),
                     help="The unpacked release (its expected layout is above).")
_out = click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
_quiet = click.option("--quiet", is_flag=True, help="No progress bars.")


_NUSWIDE_HELP = """NUS-WIDE: 925 seen tags / 81 unseen concepts; unlisted labels are negative.

\b
Expects under --root (the official release):
  Concepts81.txt (or ConceptsList/Concepts81.txt)
  NUS_WID_Tags/TagList1k.txt, Train_Tags1k.dat, Test_Tags1k.dat
  ImageList/TrainImagelist.txt, TestImagelist.txt
  Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt
  Flickr/<category>/<image>.jpg
"""

_OPENIMAGES_HELP = """Open Images V4: 7,186 trainable seen / 400 unseen labels; human-verified image
labels (confidence 1 positive, 0 negative), the rest unknown.

\b
Expects under --root (the 2018_04 release, as the LESA/BiAM code lays it out):
  2018_04/class-descriptions.csv, 2018_04/classes-trainable.txt
  2018_04/train/train-annotations-human-imagelabels.csv
  2018_04/test/test-annotations-human-imagelabels.csv
  2018_04/unseen_labels.pkl + top_400_unseen.csv (or --unseen-list)
  train/**/<ImageID>.jpg, test/**/<ImageID>.jpg
"""


@main.command(help=_NUSWIDE_HELP)
@_root
@_out
@_quiet
def nuswide(root, out, quiet):
    try:
        _report(prepare_nuswide(root, out, quiet=quiet), Path(out))
    except (PrepareError, OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command(help=_OPENIMAGES_HELP)
@_root
@_out
@click.option("--unseen-list", type=click.Path(exists=True, dir_okay=False),
              help="Unseen labels, one MID or display name a line (default: the LESA split's "
              "2018_04/unseen_labels.pkl + top_400_unseen.csv).")
@_quiet
def openimages(root, out, unseen_list, quiet):
    try:
        _report(prepare_openimages(root, out, unseen_list=unseen_list, quiet=quiet), Path(out))
    except (PrepareError, OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
