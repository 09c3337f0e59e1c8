"""CIFAR-10 from the official download, a local pickle folder, or an image folder / ``.tar``.

Every loaded set carries a ``source`` label so that results can say which data they came from:
- "cifar10-official": the official pickle batches, verified by their published md5 sums;
- "cifar10-pickle": pickle batches in the official format that are not the official files;
- "cifar10-jpeg": the public JPEG re-encoding (recognised by the sha256 of its tar files);
- "imagefolder": any other folder or tar of class sub-folders.
The data spec comes from ``--data``, else ``$HETPURE_DATA``, else "official".
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from .errors import DataNotFoundError, DownloadError, UserError
from .models.cache import hetpure_home
from .models.download import checksum_matches, download

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_ARCHIVE_CHECKSUM = "md5:c58f30108f718f92721af3b95e74349a"
OFFICIAL_FOLDER = "cifar-10-batches-py"
OFFICIAL_BATCHES = {
    "train": {
        "data_batch_1": "md5:c99cafc152244af753f735de768cd75f",
        "data_batch_2": "md5:d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "md5:54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "md5:634d18415352ddfa80567beed471001a",
        "data_batch_5": "md5:482c414d41f54cd18b22e5b47cb7c3cb",
    },
    "test": {"test_batch": "md5:40351d587109b95175f43aff81a1287e"},
}
# sha256 of the public JPEG copy's tars (its SHA256SUMS file).
JPEG_COPY_CHECKSUMS = {
    "test": "sha256:3be1ed23d6a02446f19ca7c80d4fd40400dbe006aad34821213a2159d5853af1",
    "train": "sha256:41fedaf2c5f0c914c8e5037a15f310f0a72dc74b71895e7be7d156d76e1945db",
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_HOW_TO_POINT = (
    "point --data or HETPURE_DATA at a local copy: a folder of the official pickle batches, "
    "an image folder or a .tar of one (e.g. ../shared/data/cifar10-jpeg)"
)


@dataclass(frozen=True)
class LabelledImages:
    """Images with labels and their provenance.

    ``images`` are uint8 (N, 3, 32, 32); ``index`` holds each image's position in the full split,
    so a subset still knows which images it holds.
    """

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    source: str
    split: str
    location: str

    def __len__(self) -> int:
        return len(self.labels)

    def as_float(self) -> torch.Tensor:
        """The images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)

    def subset(self, n: int, seed: int) -> "LabelledImages":
        """``n`` images drawn by ``numpy.random.RandomState(seed).choice(N, n, replace=False)``."""
        if not 1 <= n <= len(self):
            raise UserError(f"cannot draw {n} images from a {self.split} split of {len(self)}")
        chosen = torch.from_numpy(np.random.RandomState(seed).choice(len(self), n, replace=False))
        return LabelledImages(
            self.images[chosen], self.labels[chosen], self.index[chosen],
            self.source, self.split, self.location,
        )


def resolve_data_spec(spec: str | None) -> str:
    """``--data`` if given, else ``$HETPURE_DATA``, else "official"."""
    return spec or os.environ.get("HETPURE_DATA") or "official"


def load_cifar10(spec: str | None = None, split: str = "test") -> LabelledImages:
    """Load a CIFAR-10 split from ``spec``: "official" or a path (see the module docstring)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    spec = resolve_data_spec(spec)
    if spec == "official":
        return _load_pickle_folder(_official_folder(), split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"data path {path} does not exist; {_HOW_TO_POINT}")
    if path.is_file():
        if path.name.endswith(".tar.gz") or path.name.endswith(".tgz"):
            return _load_pickle_folder(_extract_official_archive(path), split)
        return _load_image_tar(path, split)
    for folder in (path, path / OFFICIAL_FOLDER):
        if any((folder / name).exists() for name in OFFICIAL_BATCHES[split]):
            return _load_pickle_folder(folder, split)
    if (path / f"{split}.tar").is_file():
        return _load_image_tar(path / f"{split}.tar", split)
    if (path / split).is_dir():
        return _load_image_folder(path / split, split)
    return _load_image_folder(path, split)


def _official_folder() -> Path:
    """The cached official pickle folder, downloading and extracting the archive if needed."""
    root = hetpure_home() / "cifar10"
    folder = root / OFFICIAL_FOLDER
    if all((folder / name).exists() for names in OFFICIAL_BATCHES.values() for name in names):
        return folder
    try:
        archive = download(OFFICIAL_URL, root / "cifar-10-python.tar.gz", OFFICIAL_ARCHIVE_CHECKSUM)
    except DownloadError as exc:
        raise DataNotFoundError(f"official CIFAR-10 is not cached and {exc}; {_HOW_TO_POINT}") from None
    return _extract_official_archive(archive)


def _extract_official_archive(archive: Path) -> Path:
    """Extract the official ``cifar-10-python.tar.gz`` next to itself; return the batch folder."""
    target = archive.parent
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(target, filter="data")  # "data" refuses absolute paths and links out
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataNotFoundError(f"cannot read CIFAR-10 archive {archive}: {exc}") from None
    return target / OFFICIAL_FOLDER


class BatchUnpickler(pickle.Unpickler):
    """Unpickles what the official CIFAR-10 batches hold and nothing else.

    A batch is a dict of str/bytes keys, a numpy uint8 array and lists of ints and bytes. Builtin
    containers and scalars need no global; the only globals allowed are the numpy functions that
    rebuild an array and its dtype, and ``_codecs.encode`` (how Python 3 writes bytes at protocol 2). Any other global (``os.system``, ``builtins.eval``, a class of
    the user's) is refused before it is looked up, so a crafted file cannot run code.
    """

    _ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct",)
    } | {
        (module, name)
        for module in ("numpy.core.numeric", "numpy._core.numeric")
        for name in ("_frombuffer",)
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # bytes at protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only numpy arrays "
                "and builtin containers"
            )
        return super().find_class(module, name)


def _load_pickle_folder(folder: Path, split: str) -> LabelledImages:
    batches = OFFICIAL_BATCHES[split]
    missing = [name for name in batches if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(f"{folder} lacks {', '.join(missing)}; {_HOW_TO_POINT}")
    # The md5s are checked before anything is unpickled: a file that matches is the official one.
    official = all(checksum_matches(folder / name, checksum) for name, checksum in batches.items())
    images, labels = [], []
    for name in batches:
        try:
            with open(folder / name, "rb") as handle:
                # The batches exist only as numpy pickles; the restricted unpickler makes them safe.
                entry = BatchUnpickler(handle, encoding="latin1").load()
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataNotFoundError(f"cannot read CIFAR-10 batch {folder / name}: {exc}") from None
    return _labelled(
        np.concatenate(images), np.concatenate(labels),
        "cifar10-official" if official else "cifar10-pickle", split, folder,
    )


def _class_of(path: PurePosixPath) -> int | None:
    """The label of an image at ``.../<class>/<file>``, or None when it is not a CIFAR-10 image."""
    if path.suffix.lower() not in _IMAGE_SUFFIXES or len(path.parts) < 2:
        return None
    name = path.parts[-2]
    if name in CLASSES:
        return CLASSES.index(name)
    return int(name) if name.isdigit() and int(name) < len(CLASSES) else None


def _decode(blobs: list[tuple[PurePosixPath, bytes]], split: str, source: str, location: Path) -> LabelledImages:
    """Decode (path, bytes) pairs in sorted path order (deterministic) into a LabelledImages."""
    blobs.sort(key=lambda item: (_class_of(item[0]), str(item[0])))
    if not blobs:
        raise DataNotFoundError(
            f"no images in class folders ({', '.join(CLASSES)}) found in {location}; {_HOW_TO_POINT}"
        )
    images = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
    for i, (path, blob) in enumerate(blobs):
        try:
            image = Image.open(io.BytesIO(blob)).convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataNotFoundError(f"cannot decode image {path} in {location}: {exc}") from None
        if image.size != (32, 32):
            raise DataNotFoundError(f"image {path} in {location} is {image.size}, not 32x32")
        images[i] = np.asarray(image)
    labels = np.array([_class_of(path) for path, _ in blobs], dtype=np.int64)
    return _labelled(images.transpose(0, 3, 1, 2), labels, source, split, location)


def _load_image_tar(path: Path, split: str) -> LabelledImages:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            paths = [PurePosixPath(m.name) for m in members]
            # A tar holding both splits (split/<class>/<file>) is filtered to the one asked for.
            has_splits = any(p.parts[0] in SPLITS for p in paths if len(p.parts) >= 3)
            blobs = [
                (p, tar.extractfile(m).read())
                for m, p in zip(members, paths)
                if _class_of(p) is not None and (not has_splits or p.parts[0] == split)
            ]
    except tarfile.ReadError:
        raise DataNotFoundError(f"cannot read image tar {path}: not a tar archive, or truncated") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataNotFoundError(f"cannot read image tar {path}: {exc}") from None
    copy_checksum = JPEG_COPY_CHECKSUMS.get(path.stem)
    is_jpeg_copy = path.stem == split and copy_checksum and checksum_matches(path, copy_checksum)
    return _decode(blobs, split, "cifar10-jpeg" if is_jpeg_copy else "imagefolder", path)


def _load_image_folder(folder: Path, split: str) -> LabelledImages:
    blobs = []
    for file in folder.rglob("*"):
        relative = PurePosixPath(file.relative_to(folder).as_posix())
        if file.is_file() and _class_of(relative) is not None:
            blobs.append((relative, file.read_bytes()))
    return _decode(blobs, split, "imagefolder", folder)


def _labelled(images: np.ndarray, labels: np.ndarray, source: str, split: str, location: Path) -> LabelledImages:
    if len(images) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(CLASSES):
        raise DataNotFoundError(f"{location} does not hold CIFAR-10 images with labels 0..9")
    return LabelledImages(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels),
        torch.arange(len(labels)),
        source, split, str(location),
    )
