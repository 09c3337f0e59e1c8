import hashlib
import json

import pytest

from hetpure_bench.errors import ChecksumError
from hetpure_bench.models import artifacts
from hetpure_bench.models.artifacts import Artifact, artifact_index, fetch, missing_message, verify


def test_index_entries_are_complete():
    index = artifact_index()
    assert {"score-sde-ddpmpp-deep-continuous", "google-ddpm-cifar10-32-weights", "robustbench-cifar10-linf-standard"} <= set(index)
    for entry in index.values():
        assert entry.url.startswith("https://") and entry.licence and entry.size and entry.path


def _fake(monkeypatch, tmp_path, **fields):
    source = tmp_path / "source.bin"
    source.write_bytes(fields.pop("content", b"PK\x03\x04 weights"))
    entry = Artifact(name="fake", path="sub/fake.pt", url=source.as_uri(), size="1 kB", licence="test", **{"sha256": None, **fields})
    monkeypatch.setattr(artifacts, "artifact_index", lambda: {"fake": entry})
    return entry, source


def test_fetch_downloads_verifies_and_pins_on_first_use(monkeypatch, tmp_path):
    entry, source = _fake(monkeypatch, tmp_path)
    path = fetch("fake")
    assert path == entry.local_path and path.read_bytes() == source.read_bytes()
    pins = json.loads((path.parents[1] / "pins.json").read_text())
    assert pins["fake"] == hashlib.sha256(source.read_bytes()).hexdigest()
    path.write_bytes(b"PK\x03\x04 swapped")  # later corruption or a swapped file
    with pytest.raises(ChecksumError, match="changed since it was first verified"):
        fetch("fake")


def test_html_error_pages_never_land(monkeypatch, tmp_path):
    entry, _ = _fake(monkeypatch, tmp_path, content=b"<!DOCTYPE html><html>Google Drive - quota exceeded</html>")
    with pytest.raises(ChecksumError, match="error page"):
        fetch("fake")
    assert not entry.local_path.exists()


def test_published_checksum_is_enforced(monkeypatch, tmp_path):
    entry, source = _fake(monkeypatch, tmp_path, sha256="0" * 64)
    with pytest.raises(ChecksumError):
        fetch("fake")
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    entry2 = Artifact(**{**entry.__dict__, "sha256": good})
    monkeypatch.setattr(artifacts, "artifact_index", lambda: {"fake": entry2})
    assert fetch("fake").read_bytes() == source.read_bytes()


def test_missing_manual_artifact_is_one_line_naming_file_url_and_place(monkeypatch, tmp_path):
    entry, _ = _fake(monkeypatch, tmp_path, manual=True)
    with pytest.raises(artifacts.MissingArtifactError) as info:
        fetch("fake")
    message = str(info.value)
    assert "\n" not in message and entry.url in message and str(entry.local_path) in message


def test_offline_download_failure_says_where_to_put_the_file(monkeypatch, tmp_path):
    entry = Artifact(name="fake", path="x/y.pt", url="http://127.0.0.1:9/nothing", size="1", sha256=None, licence="t")
    monkeypatch.setattr(artifacts, "artifact_index", lambda: {"fake": entry})
    with pytest.raises(artifacts.MissingArtifactError, match="could not be downloaded from http://127.0.0.1:9/nothing"):
        fetch("fake")
    assert missing_message(entry).endswith(str(entry.local_path))


def test_verify_refuses_an_empty_file(tmp_path):
    empty = tmp_path / "e.pt"
    empty.write_bytes(b"")
    with pytest.raises(ChecksumError, match="empty"):
        verify(Artifact("e", "e.pt", "https://x", "0", None, "t"), empty)
