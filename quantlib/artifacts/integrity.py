"""Checksums of artifacts: every artifact the workflow writes or fetches carries the SHA-256 and size of its files,
written with it (before the atomic rename), and whatever reads an artifact verifies it first. A figure in a table
can then never come from a damaged file: a mismatch stops the job naming the file and the remedy.

A folder artifact (model copy, quantized checkpoint, statistics) holds `checksums.json`; a file artifact (dataset,
calibration or evaluation windows) has a sidecar `{file}.sha256.json`. An artifact written before checksums existed
has neither: it is read with a logged warning rather than refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from quantlib.errors import DataError

log = logging.getLogger("quantlib")

CHECKSUMS = "checksums.json"
SIDECAR = ".sha256.json"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _record(path: Path) -> dict:
    return {"sha256": sha256(path), "size": path.stat().st_size}


def seal_dir(folder: Path) -> None:
    """Write `checksums.json` for every file under `folder` (a temporary about to be renamed into place)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _record(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1))


def sidecar(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def seal_file(tmp: Path, final: Path) -> None:
    """Write the sidecar of `final` from its temporary `tmp` (before the rename: a crash between the two leaves a
    sidecar whose file is missing, which the next run rewrites)."""
    side = sidecar(final)
    part = side.with_name(side.name + f".tmp-{os.getpid()}")
    part.write_text(json.dumps({"file": Path(final).name, **_record(Path(tmp))}))
    os.replace(part, side)


def _mismatch(path: Path, what: str) -> DataError:
    return DataError(f"{path} is damaged ({what}); delete it and rerun the workflow to rebuild it")


def verify(path) -> float:
    """Check an artifact against its checksums; returns the seconds it took. Raises DataError naming the damaged
    file and the remedy."""
    path = Path(path)
    t0 = time.perf_counter()
    if not path.exists():
        raise DataError(f"{path} does not exist; rerun the workflow to build it")
    if path.is_dir():
        record = path / CHECKSUMS
        if not record.exists():
            log.warning("%s has no %s (written before checksums): not verified", path, CHECKSUMS)
            return 0.0
        expected = json.loads(record.read_text())["files"]
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS}
        for name in sorted(set(expected) - present):
            raise _mismatch(path / name, "the file is missing")
        for name, want in expected.items():
            _check(path / name, want)
    else:
        side = sidecar(path)
        if not side.exists():
            log.warning("%s has no %s (written before checksums): not verified", path, side.name)
            return 0.0
        _check(path, json.loads(side.read_text()))
    return time.perf_counter() - t0


def _check(path: Path, want: dict) -> None:
    size = path.stat().st_size
    if size != want["size"]:
        raise _mismatch(path, f"{size:,} bytes where {want['size']:,} were written: truncated or replaced")
    if sha256(path) != want["sha256"]:
        raise _mismatch(path, "its SHA-256 differs from the one recorded when it was written")
