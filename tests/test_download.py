import hashlib

import pytest

from hetpure_bench.errors import ChecksumError, DownloadError
from hetpure_bench.models.download import checksum_matches, download, file_digest, verify_checksum


def _source(tmp_path, content: bytes):
    src = tmp_path / "src.bin"
    src.write_bytes(content)
    return src, "sha256:" + hashlib.sha256(content).hexdigest()


def test_download_verifies_and_lands(tmp_path):
    src, checksum = _source(tmp_path, b"weights" * 1000)
    dest = download(src.as_uri(), tmp_path / "cache" / "w.bin", checksum)
    assert dest.read_bytes() == src.read_bytes()
    assert not (tmp_path / "cache" / "w.bin.part").exists()
    assert file_digest(dest, "md5") == hashlib.md5(src.read_bytes()).hexdigest()


def test_wrong_checksum_leaves_nothing(tmp_path):
    src, _ = _source(tmp_path, b"<html>Google Drive: quota exceeded</html>")
    dest = tmp_path / "cache" / "model.pt"
    with pytest.raises(ChecksumError, match="does not match its checksum"):
        download(src.as_uri(), dest, "sha256:" + "0" * 64)
    assert not dest.exists() and not dest.with_name("model.pt.part").exists()


def test_verified_copy_is_not_fetched_again(tmp_path):
    src, checksum = _source(tmp_path, b"abc")
    dest = download(src.as_uri(), tmp_path / "w.bin", checksum)
    src.unlink()  # a second download attempt would now fail
    assert download(src.as_uri(), dest, checksum) == dest


def test_corrupted_cached_copy_is_replaced(tmp_path):
    src, checksum = _source(tmp_path, b"good bytes")
    dest = tmp_path / "w.bin"
    dest.write_bytes(b"good by")  # truncated
    download(src.as_uri(), dest, checksum)
    assert dest.read_bytes() == b"good bytes"


def test_unreachable_url_is_a_download_error(tmp_path):
    with pytest.raises(DownloadError, match="could not download"):
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "w.bin", "md5:0")


def test_verify_checksum(tmp_path):
    src, checksum = _source(tmp_path, b"xyz")
    verify_checksum(src, checksum)
    assert checksum_matches(src, checksum.upper().replace("SHA256", "sha256"))
    with pytest.raises(ChecksumError):
        verify_checksum(src, "md5:" + "f" * 32)
