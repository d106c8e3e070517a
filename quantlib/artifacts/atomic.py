"""Atomic writes and result records: nothing half-written stays on disk after a crash."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from quantlib.artifacts.integrity import seal_dir, seal_file


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of an earlier attempt at `path` that was killed (SIGKILL, node failure) before its
    cleanup ran. One job writes one output, so any such sibling is dead."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: Path, directory: bool) -> None:
    """Give a temporary the mode a plainly created file or folder gets (mkstemp/mkdtemp make them owner-only),
    so colleagues on a shared filesystem can read the results."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(path: str | Path, seal: bool = False, into: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; rename it to `path` only if the block succeeds. With `seal`, an
    artifact: its files' checksums are written into it first (quantlib.artifacts.integrity). With `into`, that
    folder (on the same filesystem) is the temporary, created if absent and kept as it is when the block fails: a
    job's progress (`quantlib.stats.progress`), which a job started again goes on from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    if into is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        tmp = Path(into)
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        _as_created(tmp, directory=True)
        if seal:
            seal_dir(tmp)
        for inner in tmp.rglob("*"):  # some writers (safetensors) create owner-only files too
            _as_created(inner, directory=inner.is_dir())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if into is None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, seal: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it to `path` only if the block succeeds. With `seal`, an
    artifact: its checksum sidecar is written first (quantlib.artifacts.integrity)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _as_created(tmp, directory=False)
        if seal:
            seal_file(tmp, path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def versions() -> dict:
    """Versions recorded in every result, so a figure can be traced to the software that made it."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("quantlib", "torch", "transformers", "datasets", "lm_eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@functools.cache
def code_version() -> str:
    """A hash of quantlib's own source files (the package and the repository's `kernels/`, which it imports as
    `quantlib.kernels`): unlike the package's version, it changes with every edit of the code. Computed once per
    process."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for root in (package, package.parent / "kernels"):
        for path in sorted(root.rglob("*.py")) if root.is_dir() else ():
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
