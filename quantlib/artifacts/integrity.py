"""Checksums of artifacts: every artifact the workflow writes or fetches carries the SHA-256 and size of its files,
written with it (before the atomic rename), and whatever reads an artifact verifies it first. A figure in a table
can then never come from a damaged file: a mismatch stops the job naming the artifact and the remedy.

A folder artifact (model copy, quantized or packed checkpoint, statistics) holds `checksums.json`; a file artifact
(dataset, calibration or evaluation windows) has a sidecar `{file}.sha256.json`. An artifact without its record
(half-written by hand, or written by a version of quantlib older than checksums) is refused, never read unverified:
it is deleted and rebuilt, or adopted explicitly (`python -m quantlib adopt <artifact>`, which records its checksums
as they are now). Before any job, `scan_artifacts` checks every artifact of the workflow's layouts with `stat`
only (files missing or of another size, records missing), so a damaged artifact is not taken as done.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shlex
import string
import time
from dataclasses import dataclass
from pathlib import Path

from quantlib.catalog.names import PATHS
from quantlib.errors import DataError

CHECKSUMS = "checksums.json"
SIDECAR = ".sha256.json"
# The artifacts the workflow writes, by layout: folders hold CHECKSUMS, files have a SIDECAR.
FOLDER_LAYOUTS = (PATHS.models, PATHS.stats, PATHS.quantized, PATHS.packed)
FILE_LAYOUTS = (PATHS.datasets, PATHS.calibration, PATHS.evaldata)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record(path: Path) -> dict:
    return {"sha256": sha256(path), "size": path.stat().st_size}


def _write_atomic(path: Path, text: str) -> None:
    """Write `path` through a hidden temporary beside it: a crash leaves the old record or none, never half a one."""
    part = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    part.write_text(text)
    os.replace(part, path)


def _folder_record(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): _record(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS and not p.name.startswith(f".{CHECKSUMS}.tmp-")}


def seal_dir(folder: Path) -> None:
    """Write `checksums.json` for every file under `folder` (a temporary about to be renamed into place)."""
    folder = Path(folder)
    _write_atomic(folder / CHECKSUMS, json.dumps({"files": _folder_record(folder)}, indent=1))


def sidecar(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def seal_file(tmp: Path, final: Path) -> None:
    """Write the sidecar of `final` from its temporary `tmp` (before the rename: a crash between the two leaves a
    sidecar whose file is missing, which the next run rewrites)."""
    _write_atomic(sidecar(final), json.dumps({"file": Path(final).name, **_record(Path(tmp))}))


# ------------------------------------------------------------------------------------------------ artifact roots

def _layout_regex(template: str) -> tuple[re.Pattern, int]:
    """A template's parts after `{resources}` as one regex per path part (a placeholder never matches a leading
    dot: temporaries are `.{name}.tmp-*`), and how many parts it spans."""
    parts = template.split("/")
    if parts[0] == "{resources}":
        parts = parts[1:]
    regexes = []
    for part in parts:
        pieces = [re.escape(lit) + ("(?!\\.)[^/]+" if field is not None else "")
                  for lit, field, _, _ in string.Formatter().parse(part)]
        regexes.append("".join(pieces))
    return re.compile("/".join(regexes)), len(parts)


_LAYOUTS = [_layout_regex(t) for t in FOLDER_LAYOUTS + FILE_LAYOUTS]


def _layout_root(path: Path) -> Path | None:
    """The artifact of a known layout that `path` lies in (or is), matched on the path's parts."""
    parts = path.parts
    for end in range(1, len(parts) + 1):  # the outermost artifact holding the path
        for regex, width in _LAYOUTS:
            if end >= width and regex.fullmatch("/".join(parts[end - width:end])):
                return Path(*parts[:end])
    return None


def artifact_root(path) -> Path:
    """The artifact that `path` belongs to, as a remedy must name it: a file artifact itself (given its sidecar,
    the file); for a path inside a folder artifact, the nearest folder holding CHECKSUMS, else the folder of the
    workflow's layouts (`results/quantized/<name>`, `results/stats/<stat>/<calib>`, `results/packed/<fmt>/<name>`,
    `<resources>/models/<key>`) it lies in; otherwise the path itself."""
    path = Path(path)
    if path.name.endswith(SIDECAR):
        path = path.with_name(path.name[:-len(SIDECAR)])
    if sidecar(path).exists():
        return path
    for folder in (path, *path.parents):
        if (folder / CHECKSUMS).is_file():
            return folder
    return _layout_root(path) or path


def _rebuild(root: Path) -> str:
    return f"delete {root} and rebuild it: `rm -rf {shlex.quote(str(root))}`, then rerun the same snakemake command"


def rebuild_hint(path) -> str:
    """How to rebuild the artifact that `path` belongs to: delete the whole artifact (deleting one file of a folder
    makes Snakemake rebuild nothing) and rerun."""
    return _rebuild(artifact_root(path))


def adopt_hint(root) -> str:
    return (f"or, only if an older version of quantlib wrote it whole, keep it and record its checksums as they are "
            f"now: `python -m quantlib adopt {shlex.quote(str(root))}`")


def _unrecorded(root: Path, record: Path) -> DataError:
    return DataError(f"{root} has no checksum record ({record.name}): it is half-written, or was written by a version "
                     f"of quantlib older than checksums, and is not read unverified. Either {_rebuild(root)}; "
                     f"{adopt_hint(root)}")


def _damaged(path: Path, root: Path, what: str) -> DataError:
    return DataError(f"{path} is damaged ({what}); {_rebuild(root)}")


# ------------------------------------------------------------------------------------------------ verifying

def _load_record(record: Path, root: Path) -> dict:
    try:
        data = json.loads(record.read_text())
        return data["files"] if record.name == CHECKSUMS else data
    except (ValueError, KeyError, TypeError) as exc:
        raise _damaged(record, root, f"not a readable checksum record: {type(exc).__name__}") from None


def verify(path) -> float:
    """Check an artifact against its checksums; returns the seconds it took. Raises DataError naming the damaged
    file, the artifact and the remedy; an artifact without its record is refused the same way."""
    path = Path(path)
    t0 = time.perf_counter()
    if not path.exists():
        raise DataError(f"{path} does not exist; rerun the workflow to build it")
    if path.is_dir():
        record = path / CHECKSUMS
        if not record.exists():
            raise _unrecorded(path, record)
        expected = _load_record(record, path)
        for name in sorted(expected):
            if not (path / name).is_file():
                raise _damaged(path / name, path, "the file is missing")
        for name, want in expected.items():
            _check(path / name, want, path)
    else:
        side = sidecar(path)
        if not side.exists():
            raise _unrecorded(path, side)
        _check(path, _load_record(side, path), path)
    return time.perf_counter() - t0


def _resized(size: int, want: int) -> str:
    return f"{size:,} bytes where {want:,} were written: truncated or replaced"


def _check(path: Path, want: dict, root: Path) -> None:
    size = path.stat().st_size
    if size != want["size"]:
        raise _damaged(path, root, _resized(size, want["size"]))
    if sha256(path) != want["sha256"]:
        raise _damaged(path, root, "its SHA-256 differs from the one recorded when it was written")


# ------------------------------------------------------------------------------------------------ adopting

def adoption(path) -> tuple[Path, int, int]:
    """What `adopt(path)` would record: (the artifact, its number of files, their bytes). Refuses an artifact that
    does not exist or already has its record (adopting over a record would hide the damage it reports)."""
    root = artifact_root(path)
    if not root.exists():
        raise DataError(f"{root} does not exist: nothing to adopt")
    record = root / CHECKSUMS if root.is_dir() else sidecar(root)
    if record.exists():
        raise DataError(f"{root} already has its checksum record ({record.name}): nothing to adopt. If it is "
                        f"damaged, {_rebuild(root)}")
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    return root, len(files), sum(p.stat().st_size for p in files)


def adopt(path) -> Path:
    """Record the checksums of an artifact that has none, as its files are now (written atomically, as `seal_dir`
    and `seal_file` write them); returns the artifact. Only for artifacts known to be whole: those written by a
    version of quantlib older than checksums."""
    root, _, _ = adoption(path)
    if root.is_dir():
        seal_dir(root)
    else:
        seal_file(root, root)
    return root


# ------------------------------------------------------------------------------------------------ scanning

@dataclass(frozen=True)
class Problem:
    """An artifact that must not be taken as done: `artifact` (the folder or file to delete) and what is wrong."""

    artifact: Path
    what: str
    recorded: bool  # False: no checksum record at all (adoptable)

    def __str__(self) -> str:
        return self.what


def artifact_paths(resources: str | Path = "resources") -> list[tuple[Path, bool]]:
    """(path, is a folder artifact) of every existing artifact of the workflow's layouts, relative to the working
    directory as the workflow names them. Hidden names (the temporaries of running jobs) are not matched."""
    found = []
    for templates, folder in ((FOLDER_LAYOUTS, True), (FILE_LAYOUTS, False)):
        for template in templates:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            pattern = template.format(**{f: glob.escape(str(resources)) if f == "resources" else "*" for f in fields})
            for hit in sorted(glob.glob(pattern)):  # glob's `*` skips hidden names
                p = Path(hit)
                if p.is_dir() == folder:
                    found.append((p, folder))
    return found


def _problem(path: Path, folder: bool) -> Problem | None:
    """The stat-only check of one artifact: its record exists and is readable, every recorded file exists with its
    recorded size. No file is read but the record."""
    record = path / CHECKSUMS if folder else sidecar(path)
    if not record.exists():
        return Problem(path, f"{path} has no checksum record ({record.name}): half-written, or written by a version "
                             "of quantlib older than checksums", recorded=False)
    try:
        data = json.loads(record.read_text())
        expected = data["files"] if folder else {path.name: data}
        sizes = {name: want["size"] for name, want in expected.items()}
    except (ValueError, KeyError, TypeError):
        return Problem(path, f"{record} is damaged (not a readable checksum record)", recorded=True)
    base = str(path if folder else path.parent)
    for name, want in sorted(sizes.items()):
        file = os.path.join(base, name)  # strings, not Paths: half the scan's time went into building Paths
        try:
            size = os.stat(file).st_size
        except (FileNotFoundError, NotADirectoryError):
            return Problem(path, f"{file} is damaged (the file is missing)", recorded=True)
        if size != want:
            return Problem(path, f"{file} is damaged ({_resized(size, want)})", recorded=True)
    return None


def scan_artifacts(resources: str | Path = "resources") -> list[Problem]:
    """Every existing artifact of the workflow (under `results/` and `resources`) whose recorded files are missing
    or of another size, or that has no record: cheap `stat` checks, no hashing (the job that reads an artifact
    hashes it)."""
    return [p for p in (_problem(path, folder) for path, folder in artifact_paths(resources)) if p]


def describe_problems(problems: list[Problem]) -> str:
    """One message for the artifacts `scan_artifacts` found: each, and the commands that rebuild them."""
    head = (f"{len(problems)} artifact(s) are damaged or unfinished, and Snakemake would take them as done (found "
            "before any job; nothing was run):")
    lines = [head]
    lines += [f"  {p}" for p in problems]
    lines.append("Delete them and rerun the same snakemake command to rebuild them:")
    lines.append("  rm -rf " + " ".join(shlex.quote(str(p.artifact)) for p in problems))
    unrecorded = [p for p in problems if not p.recorded]
    if unrecorded:
        lines.append("An artifact without a record that an older version of quantlib wrote whole can be kept "
                     "instead, its checksums recorded as they are now:")
        lines += [f"  python -m quantlib adopt {shlex.quote(str(p.artifact))}" for p in unrecorded]
    return "\n".join(lines)
