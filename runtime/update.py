"""What an incremental `qks-infer --update` needs: which files changed since OUT was written, the
records OUT already holds, and `--exclude` patterns.

- `OUT.state.json` (written by every complete qks-infer run with --out) holds, per image, the size and
  the modification time in nanoseconds seen when that run listed the folder, and with --checksum the
  sha256 of its bytes. An image is unchanged when its state equals the stored one: size and mtime, or
  with --checksum the sha256 alone (a copy that reset mtimes is not tagged again).
- An update replaces OUT only once the whole new output is written (a temp file and `os.replace`), and
  the state last: a killed update leaves OUT as it was, and a state older than OUT only makes the next
  update tag a few images again.
- `--exclude GLOB` drops an image when the pattern matches its path relative to the folder
  (`fnmatch`, where `*` also crosses `/`), its file name, or the name or relative path of any folder
  above it (`--exclude .thumbnails` skips every such folder).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

STATE_SUFFIX = ".state.json"
STATE_SCHEMA = 1


class UpdateError(RuntimeError):
    """OUT or its state cannot be updated; one line."""


# -- --exclude ---------------------------------------------------------------------------------------

def excluded(rel: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a relative POSIX path (a file, or a folder) matches one of the --exclude patterns."""
    if not patterns:
        return False
    path = PurePosixPath(rel)
    candidates = {rel, path.name}
    for parent in list(path.parents)[:-1]:  # the folders above, without "."
        candidates.update((parent.as_posix(), parent.name))
    return any(fnmatchcase(c, p) for p in patterns for c in candidates)


# -- file state --------------------------------------------------------------------------------------

def _sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def file_states(root: Path, names: list[str], checksum: bool = False) -> dict[str, dict]:
    """{name: {"size", "mtime_ns"[, "sha256"]}} of the images now; an image that cannot be stat'ed
    (a broken link) gets an empty state, so it never counts as unchanged."""
    states = {}
    for name in names:
        path = root / name
        try:
            st = os.stat(path)
        except OSError:
            states[name] = {}
            continue
        state = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if checksum:
            state["sha256"] = _sha256(path)
        states[name] = state
    return states


def unchanged(old: dict | None, new: dict, checksum: bool) -> bool:
    if not old or not new:
        return False
    if checksum:
        return old.get("sha256") is not None and old.get("sha256") == new.get("sha256")
    return old.get("size") == new.get("size") and old.get("mtime_ns") == new.get("mtime_ns")


def state_path(out: Path) -> Path:
    return out.with_name(out.name + STATE_SUFFIX)


def read_states(out: Path) -> dict[str, dict] | None:
    """The stored states beside OUT, or None when there are none (OUT from an older qks, or no run
    finished into it)."""
    path = state_path(out)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != STATE_SCHEMA or not isinstance(data.get("files"), dict):
            raise ValueError("unknown schema")
        return data["files"]
    except (OSError, ValueError, AttributeError) as e:
        raise UpdateError(f"{path}: not a qks-infer state file ({e}); remove it to tag everything again") from None


def write_states(out: Path, states: dict[str, dict]) -> None:
    path = state_path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"schema": STATE_SCHEMA, "files": states}, ensure_ascii=False) + "\n",
                   encoding="utf-8", errors="surrogateescape")
    os.replace(tmp, path)


# -- the records OUT holds ---------------------------------------------------------------------------

def read_chunks(out: Path, fmt: str, header: list[str], doing: str = "updating") -> tuple[dict[str, str], set[str]]:
    """OUT's records as text, {image: its line(s) as written}, and the images whose record is an error
    (an update tags those again). A partial last line (an interrupted run) is left out; `doing` names
    the refused action in errors."""
    try:
        data = out.read_bytes()
        text = data[:data.rfind(b"\n") + 1].decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UpdateError(f"{out}: cannot read it as UTF-8 records ({type(e).__name__}); not {doing} it") from None
    chunks: dict[str, list[str]] = {}
    errors = set()
    if fmt == "jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name = rec["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UpdateError(f"{out}: line {i} is not a qks-infer record; not {doing} it") from None
            chunks[name] = [line + "\n"]
            if "error" in rec:
                errors.add(name)
        return {k: "".join(v) for k, v in chunks.items()}, errors
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise UpdateError(f"{out}: not a valid CSV ({e}); not {doing} it") from None
    if rows and rows[0] != header:
        raise UpdateError(f"{out}: its CSV columns differ from this run's (other labels or --all-scores?); "
                          f"not {doing} it")
    for row in rows[1:]:
        if not row:
            continue
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        chunks.setdefault(row[0], []).append(buf.getvalue())
        if row[-1]:
            errors.add(row[0])
    return {k: "".join(v) for k, v in chunks.items()}, errors


__all__ = ["STATE_SUFFIX", "UpdateError", "excluded", "file_states", "read_chunks", "read_states", "state_path",
           "unchanged", "write_states"]
