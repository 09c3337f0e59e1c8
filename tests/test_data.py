import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from conftest import random_images, write_pickle_batch
from PIL import Image

from hetpure_bench import data
from hetpure_bench.data import CLASSES, OFFICIAL_BATCHES, load_cifar10
from hetpure_bench.errors import DataNotFoundError, UserError
from hetpure_bench.models.download import file_digest


def _pickle_folder(folder, n_test=20, n_train=10):
    folder.mkdir(parents=True)
    images, labels = random_images(n_test, seed=1)
    write_pickle_batch(folder / "test_batch", images, labels)
    for i, name in enumerate(OFFICIAL_BATCHES["train"]):
        write_pickle_batch(folder / name, *random_images(n_train, seed=10 + i))
    return images, labels


def _png(array_hwc: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_hwc).save(out, format="PNG")  # lossless, so pixels round-trip exactly
    return out.getvalue()


def _image_entries(n, seed, prefix=""):
    images, labels = random_images(n, seed)
    return images, labels, {
        f"{prefix}{CLASSES[y]}/{i:04d}.png": _png(img.transpose(1, 2, 0)) for i, (img, y) in enumerate(zip(images, labels))
    }


def _expected_order(images, labels, names):
    # Loaders sort by (class, path): rebuild that order from the generated names.
    order = sorted(range(len(names)), key=lambda i: (labels[i], names[i]))
    return images[order], labels[order]


def test_pickle_folder(tmp_path):
    images, labels = _pickle_folder(tmp_path / "cifar")
    ds = load_cifar10(str(tmp_path / "cifar"), "test")
    assert ds.source == "cifar10-pickle"  # right format, but not the official files
    assert torch.equal(ds.images, torch.from_numpy(images)) and torch.equal(ds.labels, torch.from_numpy(labels))
    assert len(load_cifar10(str(tmp_path / "cifar"), "train")) == 50
    # A parent folder holding cifar-10-batches-py/ works too.
    (tmp_path / "parent").mkdir()
    (tmp_path / "cifar").rename(tmp_path / "parent" / "cifar-10-batches-py")
    assert len(load_cifar10(str(tmp_path / "parent"), "test")) == 20


def test_pickle_folder_is_official_when_md5s_match(tmp_path, monkeypatch):
    _pickle_folder(tmp_path / "cifar")
    fake = {split: {n: "md5:" + file_digest(tmp_path / "cifar" / n, "md5") for n in names} for split, names in OFFICIAL_BATCHES.items()}
    monkeypatch.setattr(data, "OFFICIAL_BATCHES", fake)
    assert load_cifar10(str(tmp_path / "cifar"), "test").source == "cifar10-official"


def test_image_folder_and_tar(tmp_path):
    images, labels, entries = _image_entries(30, seed=3)
    names = list(entries)
    for name, blob in entries.items():
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(blob)
    with tarfile.open(tmp_path / "set.tar", "w") as tar:
        for name, blob in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    exp_images, exp_labels = _expected_order(images, labels, names)
    for spec in (tmp_path / "folder", tmp_path / "set.tar"):
        ds = load_cifar10(str(spec), "test")
        assert ds.source == "imagefolder"
        assert torch.equal(ds.images, torch.from_numpy(exp_images))
        assert torch.equal(ds.labels, torch.from_numpy(exp_labels))


def test_tar_with_both_splits_is_filtered(tmp_path):
    _, _, test_entries = _image_entries(12, seed=4, prefix="test/")
    _, _, train_entries = _image_entries(7, seed=5, prefix="train/")
    with tarfile.open(tmp_path / "both.tar", "w") as tar:
        for name, blob in {**test_entries, **train_entries}.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert len(load_cifar10(str(tmp_path / "both.tar"), "test")) == 12
    assert len(load_cifar10(str(tmp_path / "both.tar"), "train")) == 7


def test_subset_is_randomstate_choice(tmp_path):
    _pickle_folder(tmp_path / "cifar")
    ds = load_cifar10(str(tmp_path / "cifar"), "test")
    sub = ds.subset(5, seed=0)
    chosen = np.random.RandomState(0).choice(20, 5, replace=False)
    assert sub.index.tolist() == chosen.tolist()
    assert torch.equal(sub.images, ds.images[chosen])
    assert sub.source == ds.source
    assert sub.as_float().max() <= 1 and sub.as_float().dtype == torch.float32
    with pytest.raises(UserError):
        ds.subset(21, seed=0)


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(str(tmp_path / "nope"))
    assert "--data" in str(info.value) and "\n" not in str(info.value)


def test_environment_variable_selects_data(tmp_path, monkeypatch):
    _pickle_folder(tmp_path / "cifar")
    monkeypatch.setenv("HETPURE_DATA", str(tmp_path / "cifar"))
    assert len(load_cifar10(None, "test")) == 20


def test_official_offline_says_how_to_point_at_a_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "OFFICIAL_URL", (tmp_path / "no-internet.tar.gz").as_uri())
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10("official")
    message = str(info.value)
    assert "HETPURE_DATA" in message and "--data" in message and "\n" not in message


def test_official_download_path_extracts_and_caches(tmp_path, monkeypatch):
    # The real download path, fed a generated archive in the official layout via a file:// URL.
    _pickle_folder(tmp_path / "build" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(data, "OFFICIAL_URL", archive.as_uri())
    monkeypatch.setattr(data, "OFFICIAL_ARCHIVE_CHECKSUM", "md5:" + file_digest(archive, "md5"))
    ds = load_cifar10("official", "test")
    assert len(ds) == 20 and ds.source == "cifar10-pickle"
    archive.unlink()  # second load comes from the cache, no download
    assert len(load_cifar10("official", "train")) == 50


class _RunsCode:
    """Unpickling this with plain pickle would call ``os.system``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path):
    _pickle_folder(tmp_path / "cifar")
    marker = tmp_path / "ran"
    entry = {"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 20, "x": _RunsCode(f"touch {marker}")}
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataNotFoundError, match=r"cannot read CIFAR-10 batch .*refusing to unpickle (posix|nt|os)\.system"):
        load_cifar10(str(tmp_path / "cifar"), "test")
    assert not marker.exists()
    pickle.loads((tmp_path / "cifar" / "test_batch").read_bytes())  # the same file, plainly: it does run
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_official_format_loads_at_every_protocol(tmp_path, protocol):
    """The official batches are protocol-2 pickles of a dict with bytes values and a uint8 array;
    numpy rebuilds an array through ``_reconstruct`` (protocol < 5) or ``_frombuffer`` (5)."""
    images, labels = random_images(20, seed=4)
    _pickle_folder(tmp_path / "cifar")
    entry = {"batch_label": b"testing batch 1 of 1", "labels": labels.tolist(),
             "data": images.reshape(20, -1), "filenames": [b"x.png"] * 20}
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps(entry, protocol=protocol))
    ds = load_cifar10(str(tmp_path / "cifar"), "test")
    assert torch.equal(ds.images, torch.from_numpy(images)) and torch.equal(ds.labels, torch.from_numpy(labels))


def test_md5s_are_checked_before_unpickling(tmp_path, monkeypatch):
    _pickle_folder(tmp_path / "cifar")
    order = []
    monkeypatch.setattr(data, "checksum_matches", lambda *a: order.append("md5") or False)
    real_load = data.BatchUnpickler.load
    monkeypatch.setattr(data.BatchUnpickler, "load", lambda self: order.append("load") or real_load(self))
    load_cifar10(str(tmp_path / "cifar"), "test")
    assert order == ["md5", "load"]


def test_corrupt_pickle_is_a_clear_error(tmp_path):
    _pickle_folder(tmp_path / "cifar")
    (tmp_path / "cifar" / "test_batch").write_bytes(b"<html>not a pickle</html>")
    with pytest.raises(DataNotFoundError, match="cannot read CIFAR-10 batch"):
        load_cifar10(str(tmp_path / "cifar"), "test")


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images"):
        load_cifar10(str(tmp_path / "empty"), "test")


def test_unknown_split():
    with pytest.raises(UserError):
        load_cifar10("official", "validation")


def test_shared_jpeg_copy(shared_jpeg):
    ds = load_cifar10(str(shared_jpeg), "test")
    assert ds.source == "cifar10-jpeg"
    assert ds.images.shape == (10000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.bincount().tolist() == [1000] * 10
    # The tar given directly is recognised as the JPEG copy too.
    assert load_cifar10(str(shared_jpeg / "test.tar"), "test").source == "cifar10-jpeg"
