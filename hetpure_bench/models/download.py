"""Checksum-verified downloads that land atomically (a partial or wrong file never takes the name)."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..errors import ChecksumError, DownloadError, UserError

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


def download(
    url: str,
    dest: Path,
    checksum: str | None,
    timeout: float = 30.0,
    validate: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return ``dest``.

    The bytes go to ``dest.part`` with a progress bar, are verified (``checksum``, and
    ``validate`` which raises UserError on a bad file, e.g. an HTML page), then renamed into
    place, so an interrupted or corrupted download never leaves a file at ``dest``. A None
    checksum is only for files whose checksum is not published (see artifacts.py).
    """
    dest = Path(dest)
    if dest.exists() and (checksum is None or checksum_matches(dest, checksum)):
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
        if checksum is not None:
            verify_checksum(part, checksum)
        if validate is not None:
            validate(part)
    except UserError as exc:
        part.unlink(missing_ok=True)
        why = f"does not match its checksum {checksum}" if isinstance(exc, ChecksumError) else f"is not usable ({exc})"
        raise ChecksumError(
            f"download of {url} {why} (truncated, or an error page instead of the file); nothing was saved"
        ) from None
    os.replace(part, dest)
    return dest
