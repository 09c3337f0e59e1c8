"""The artifact index (``artifacts.yaml``) and how an artifact gets into the cache.

``fetch(name)`` returns the verified local file under ``$HETPURE_HOME``: downloaded with a
progress bar, checked (published sha256, else format check + sha256 pinned on first use),
renamed into place atomically. Offline or for hand-downloaded files: one line naming the file,
its URL and where to put it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from ..atomic import write_text_atomic
from ..errors import ChecksumError, DownloadError, UserError
from .cache import hetpure_home
from .download import download, file_digest

PINS_FILE = "pins.json"


class MissingArtifactError(UserError):
    """An artifact is not in the cache and cannot be downloaded here."""


@dataclass(frozen=True)
class Artifact:
    name: str
    path: str  # relative to $HETPURE_HOME
    url: str
    size: str
    sha256: str | None
    licence: str
    manual: bool = False
    note: str = ""

    @property
    def local_path(self) -> Path:
        return hetpure_home() / self.path


@lru_cache(maxsize=None)
def artifact_index() -> dict[str, Artifact]:
    text = (resources.files("hetpure_bench.models") / "artifacts.yaml").read_text()
    return {name: Artifact(name=name, **fields) for name, fields in yaml.safe_load(text).items()}


def get_artifact(name: str) -> Artifact:
    try:
        return artifact_index()[name]
    except KeyError:
        raise UserError(f"unknown artifact {name!r}") from None


def check_format(path: Path) -> None:
    """Refuse what is obviously not a weights file: empty, or an HTML/text error page."""
    head = Path(path).read_bytes()[:512].lstrip().lower()
    if not head:
        raise ChecksumError(f"{path} is empty")
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"{\"error")):
        raise ChecksumError(f"{path} is an HTML/error page, not a weights file: delete it and download it again")


def verify(artifact: Artifact, path: Path) -> None:
    """Published sha256, or the format check and the sha256 pinned on first use."""
    if artifact.sha256:
        if file_digest(path, "sha256") != artifact.sha256:
            raise ChecksumError(f"{path} does not match the sha256 of {artifact.name}: delete it and download it again")
        return
    if path.suffix != ".json":
        check_format(path)
    pins_path = hetpure_home() / PINS_FILE
    pins = json.loads(pins_path.read_text()) if pins_path.exists() else {}
    digest = file_digest(path, "sha256")
    pinned = pins.get(artifact.name)
    if pinned is None:
        pins[artifact.name] = digest
        write_text_atomic(pins_path, json.dumps(pins, indent=2, sort_keys=True) + "\n")
    elif pinned != digest:
        raise ChecksumError(
            f"{path} changed since it was first verified (sha256 {digest[:12]}..., pinned {pinned[:12]}...): "
            f"delete it (and its entry in {pins_path}) and download it again"
        )


def missing_message(artifact: Artifact) -> str:
    how = "download it by hand from" if artifact.manual else "it could not be downloaded from"
    where = f" ({artifact.note})" if artifact.note else ""
    return f"{artifact.name} is missing: {how} {artifact.url}{where} and put it at {artifact.local_path}"


def fetch(name: str) -> Path:
    """The verified local file of an artifact, downloading it first when possible."""
    artifact = get_artifact(name)
    path = artifact.local_path
    if not path.exists():
        if artifact.manual:
            raise MissingArtifactError(missing_message(artifact))
        checksum = f"sha256:{artifact.sha256}" if artifact.sha256 else None
        validate = None if path.suffix == ".json" else check_format
        try:
            download(artifact.url, path, checksum, validate=validate)
        except DownloadError:
            raise MissingArtifactError(missing_message(artifact)) from None
    verify(artifact, path)
    return path
