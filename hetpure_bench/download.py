"""Checksum-verified downloads that land atomically (a partial or wrong file never takes the name)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ChecksumError, DownloadError

_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file ("md5" or "sha256"), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_matches(path: Path, checksum: str) -> bool:
    """Whether ``path`` has ``checksum``, written "algorithm:hexdigest" (e.g. "md5:c58f...")."""
    algorithm, _, expected = checksum.partition(":")
    return file_digest(path, algorithm) == expected.lower()


def verify_checksum(path: Path, checksum: str) -> None:
    """Raise ChecksumError unless ``path`` has ``checksum``."""
    if not checksum_matches(path, checksum):
        raise ChecksumError(
            f"{path} does not match its checksum {checksum} (corrupt, truncated or not the right "
            "file): delete it and try again"
        )


def download(url: str, dest: Path, checksum: str, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return ``dest``.

    The bytes go to ``dest.part`` with a progress bar, are verified, then renamed into place, so
    an interrupted or corrupted download never leaves a file at ``dest``.
    """
    dest = Path(dest)
    if dest.exists() and checksum_matches(dest, checksum):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"could not download {url}: {reason}") from None
    try:
        verify_checksum(part, checksum)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"download of {url} does not match its checksum {checksum} (truncated, or an error "
            "page instead of the file); nothing was saved"
        ) from None
    os.replace(part, dest)
    return dest
