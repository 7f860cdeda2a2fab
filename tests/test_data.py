"""Data: the real MNIST splits, the checks that guard them (hashes, pickle, IDX), the cache and the loaders."""

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from lowrank.engine import data

SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding `array`."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_as_idx(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The four original MNIST IDX files rebuilt from the splits (training = train then val)."""
    def images(*splits):
        return idx_bytes(np.rint(np.concatenate([arrays[f"{s}_x"] for s in splits]) * 255).reshape(-1, 28, 28))

    def labels(*splits):
        return idx_bytes(np.concatenate([arrays[f"{s}_y"] for s in splits]))

    return {"train-images-idx3-ubyte": images("train", "val"), "train-labels-idx1-ubyte": labels("train", "val"),
            "t10k-images-idx3-ubyte": images("test"), "t10k-labels-idx1-ubyte": labels("test")}


def full_size_zeros(workdir) -> dict[str, np.ndarray]:
    """A stand-in source: three splits of the right sizes, all zeros."""
    arrays = {}
    for split, size in SIZES.items():
        arrays[f"{split}_x"] = np.zeros((size, 784), np.uint8)
        arrays[f"{split}_y"] = np.zeros(size, np.uint8)
    return arrays


def failing(message: str, error: type[Exception] = data.DataUnavailableError):
    def source(workdir):
        raise error(message)
    return source


# --------------------------------------------------------------------------------------------------
# The real MNIST


def test_mnist_has_classic_split_sizes_shapes_and_dtypes(mnist_arrays):
    for split, size in SIZES.items():
        assert mnist_arrays[f"{split}_x"].shape == (size, 784)
        assert mnist_arrays[f"{split}_x"].dtype == np.float32
        assert mnist_arrays[f"{split}_y"].shape == (size,)
        assert mnist_arrays[f"{split}_y"].dtype == np.int64


def test_mnist_pixels_are_bytes_over_255_in_unit_interval(mnist_arrays):
    x = mnist_arrays["train_x"]
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.abs(x * 255 - np.rint(x * 255)).max() < 1e-4
    assert np.all(np.isin(mnist_arrays["test_y"], np.arange(10)))


def test_mnist_train_labels_are_balanced(mnist_arrays):
    shares = np.bincount(mnist_arrays["train_y"], minlength=10) / SIZES["train"]
    assert shares.min() > 0.08 and shares.max() < 0.12


def test_cached_mnist_is_byte_for_byte_the_original_idx_data(mnist_arrays):
    """The pickle's byte / 256 became byte / 255 without loss, and val is the last 10,000 training images."""
    for name, content in mnist_as_idx(mnist_arrays).items():
        assert hashlib.sha256(content).hexdigest() == data.IDX_SHA256["mnist"][name], name


def test_load_arrays_is_cached_in_memory_and_read_only(mnist_arrays):
    again = data.load_arrays("mnist")
    assert again["train_x"] is mnist_arrays["train_x"]
    with pytest.raises(ValueError, match="read-only"):
        again["train_x"][0, 0] = 0.5


def test_prepare_is_idempotent():
    first = data.prepare("mnist")
    modified = first.stat().st_mtime_ns
    assert data.prepare("mnist") == first
    assert first.stat().st_mtime_ns == modified


# --------------------------------------------------------------------------------------------------
# IDX files


@pytest.fixture(scope="module")
def mnist_idx_root(tmp_path_factory, mnist_arrays):
    """MNIST as IDX files in torchvision's layout root/MNIST/raw, labels gzipped, images plain."""
    root = tmp_path_factory.mktemp("idx")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, content in mnist_as_idx(mnist_arrays).items():
        if "labels" in name:
            (raw / f"{name}.gz").write_bytes(gzip.compress(content, compresslevel=1))
        else:
            (raw / name).write_bytes(content)
    return root


def test_idx_folder_in_torchvision_layout_gives_the_same_arrays(mnist_idx_root, mnist_arrays):
    arrays = data.load_arrays("mnist", root=mnist_idx_root)
    assert arrays.keys() == mnist_arrays.keys()
    for key, array in arrays.items():
        np.testing.assert_array_equal(array, mnist_arrays[key], err_msg=key)
        assert array.dtype == mnist_arrays[key].dtype


def test_loaders_read_an_idx_root(mnist_idx_root):
    assert str(data.loaders("mnist", root=str(mnist_idx_root))) == \
        "Splits(train=50000, val=10000, test=10000, batch_size=232)"


def test_read_idx_reads_plain_and_gzipped_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / "images").write_bytes(idx_bytes(images))
    (tmp_path / "images.gz").write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "images", 3), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "images.gz", 3), images)


def test_read_idx_rejects_a_bad_magic_number_naming_the_file(tmp_path):
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.arange(10)))
    with pytest.raises(data.DataIntegrityError, match=r"train-labels-idx1-ubyte: magic number 0x00000801.*0x00000803"):
        data.read_idx(labels, 3)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not an IDX file")
    with pytest.raises(data.DataIntegrityError, match="notes.txt: magic number"):
        data.read_idx(text, 1)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(data.DataIntegrityError, match="empty: no magic number"):
        data.read_idx(tmp_path / "empty", 1)


def test_read_idx_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28)))[:-1])
    with pytest.raises(data.DataIntegrityError, match=r"t10k-images-idx3-ubyte: header says shape \(2, 28, 28\)"):
        data.read_idx(path, 3)
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28)))[:10])
    with pytest.raises(data.DataIntegrityError, match="shorter than its 16-byte IDX header"):
        data.read_idx(path, 3)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    compressed = gzip.compress(idx_bytes(np.zeros((2, 28, 28))))
    gz.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(data.DataIntegrityError, match="t10k-images-idx3-ubyte.gz: not a complete gzip file"):
        data.read_idx(gz, 3)


def test_idx_folder_with_wrong_sizes_names_the_file(tmp_path):
    for part, count in (("train", 3), ("t10k", 2)):
        (tmp_path / f"{part}-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((count, 28, 28))))
        (tmp_path / f"{part}-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(count)))
    with pytest.raises(data.DataIntegrityError,
                       match=r"train-images-idx3-ubyte: holds an array of shape \(3, 28, 28\), expected \(60000, 28, 28\)"):
        data.load_arrays("mnist", root=tmp_path)


def test_missing_idx_files_name_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*FashionMNIST/raw"):
        data.load_arrays("fashion-mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# Hashes and the restricted unpickler


def test_verify_sha256_names_the_file_and_both_hashes(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"tampered")
    actual = hashlib.sha256(b"tampered").hexdigest()
    data.verify_sha256(path, actual)
    with pytest.raises(data.DataIntegrityError) as error:
        data.verify_sha256(path, "0" * 64)
    assert str(path) in str(error.value) and actual in str(error.value) and "0" * 64 in str(error.value)


def mkdir_payload(marker) -> bytes:
    """A pickle that, loaded by `pickle.loads`, creates the folder `marker`."""
    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    return pickle.dumps(Payload(), protocol=3)


def eval_payload(marker) -> bytes:
    class Payload:
        def __reduce__(self):
            return eval, (f"__import__('os').mkdir({str(marker)!r})",)
    return pickle.dumps(Payload(), protocol=3)


@pytest.mark.parametrize("payload, name", [(mkdir_payload, f"{os.mkdir.__module__}.mkdir"),
                                           (eval_payload, "builtins.eval")], ids=["os.mkdir", "eval"])
def test_restricted_unpickler_refuses_other_globals_without_running_them(tmp_path, payload, name):
    marker = tmp_path / "marker"
    with pytest.raises(data.ForbiddenGlobalError, match=f"global {name} "):
        data.RestrictedUnpickler(io.BytesIO(payload(marker))).load()
    assert not marker.exists()
    assert issubclass(data.ForbiddenGlobalError, pickle.UnpicklingError)


def test_restricted_unpickler_loads_numpy_arrays():
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5, dtype=np.int64))
    loaded = data.RestrictedUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=3))).load()
    for got, want in zip(loaded, arrays):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


def test_tampered_wheel_is_rejected_before_its_pickle_is_loaded(tmp_path, monkeypatch):
    """Each layer stops a malicious wheel: its hash, its member's hash, then the unpickler."""
    marker = tmp_path / "marker"
    wheel = tmp_path / data.MNIST_WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(data.MNIST_MEMBER, gzip.compress(mkdir_payload(marker)))
    workdir = tmp_path / "work"
    workdir.mkdir()

    with pytest.raises(data.DataIntegrityError, match=f"{wheel}: sha256 {data.sha256_file(wheel)} .* {data.MNIST_WHEEL_SHA256}"):
        data.read_mnist_wheel(wheel, workdir)
    assert list(workdir.iterdir()) == []

    monkeypatch.setattr(data, "MNIST_WHEEL_SHA256", data.sha256_file(wheel))
    with pytest.raises(data.DataIntegrityError, match=f"mnist.pkl.gz: sha256 .* {data.MNIST_MEMBER_SHA256}"):
        data.read_mnist_wheel(wheel, workdir)

    monkeypatch.setattr(data, "MNIST_MEMBER_SHA256", data.sha256_file(workdir / data.MNIST_MEMBER))
    with pytest.raises(data.ForbiddenGlobalError, match="mkdir"):
        data.read_mnist_wheel(wheel, workdir)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# The cache: where it is, atomic writes, sources


def test_cache_dir_is_lowrank_data_or_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("LOWRANK_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "lowrank"


def test_interrupted_prepare_leaves_no_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setitem(data._SOURCES, "mnist", (("zeros", full_size_zeros),))

    def interrupted_save(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        data.prepare("mnist")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setitem(data._SOURCES, "mnist", (("zeros", full_size_zeros),))
    assert data.prepare("mnist") == tmp_path / "mnist.npz"
    assert list(tmp_path.iterdir()) == [tmp_path / "mnist.npz"]
    assert data.load_arrays("mnist")["val_x"].max() == 0.0


def test_prepare_reports_every_failed_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setitem(data._SOURCES, "mnist", (("pip", failing("no index")), ("torchvision", failing("offline"))))
    with pytest.raises(data.DataUnavailableError, match=r"pip: no index \| torchvision: offline \| .*root="):
        data.prepare("mnist")
    assert list(tmp_path.iterdir()) == []


def test_hash_mismatch_is_not_hidden_by_a_fallback_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setitem(data._SOURCES, "mnist", (("pip", failing("bad hash", data.DataIntegrityError)),
                                                 ("zeros", full_size_zeros)))
    with pytest.raises(data.DataIntegrityError, match="bad hash"):
        data.prepare("mnist")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_cache_file_says_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    (tmp_path / "mnist.npz").write_bytes(b"garbage")
    with pytest.raises(data.DataIntegrityError, match="mnist.npz: unreadable cache .*delete it"):
        data.load_arrays("mnist")


@pytest.mark.parametrize("call", [data.load_arrays, data.loaders, data.prepare])
def test_unknown_dataset_names_the_allowed_ones(call):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; allowed: mnist, fashion-mnist"):
        call("cifar")


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="needs Debian's apt-get and dpkg-deb")
def test_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    """The real Debian source (about 5 s: a 31 MB download); skipped when the archive is unreachable."""
    monkeypatch.setenv("LOWRANK_DATA", str(tmp_path))
    monkeypatch.setitem(data._SOURCES, "fashion-mnist", data._SOURCES["fashion-mnist"][:1])
    try:
        path = data.prepare("fashion-mnist")
    except data.DataUnavailableError as error:
        pytest.skip(f"Debian archive unreachable: {error}")
    assert path == tmp_path / "fashion-mnist.npz"
    arrays = data.load_arrays("fashion-mnist")
    assert {key: len(array) for key, array in arrays.items()} == {
        "train_x": 50_000, "train_y": 50_000, "val_x": 10_000, "val_y": 10_000, "test_x": 10_000, "test_y": 10_000}
    assert arrays["train_x"].shape[1] == 784 and arrays["train_x"].max() == 1.0
    np.testing.assert_array_equal(np.bincount(arrays["test_y"]), np.full(10, 1000))


# --------------------------------------------------------------------------------------------------
# Loaders


def test_splits_show_their_sizes():
    assert str(data.mnist()) == "Splits(train=50000, val=10000, test=10000, batch_size=232)"
    assert repr(data.mnist(subset=1000, batch_size=100)) == "Splits(train=1000, val=10000, test=10000, batch_size=100)"


def test_an_epoch_is_whole_batches_covering_the_split_once(mnist_arrays):
    splits = data.mnist(batch_size=232)
    batches = list(splits.train)
    assert len(batches) == len(splits.train) == math.ceil(50_000 / 232)
    assert [len(y) for _, y in batches[:-1]] == [232] * (len(batches) - 1) and len(batches[-1][1]) == 50_000 % 232
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(np.bincount(y.numpy()), np.bincount(mnist_arrays["train_y"]))
    np.testing.assert_allclose(torch.sort(x.sum(1)).values.numpy(), np.sort(mnist_arrays["train_x"].sum(1)), rtol=1e-6)
    assert not torch.equal(y[:1000], torch.tensor(mnist_arrays["train_y"][:1000]))  # shuffled


def test_validation_and_test_batches_come_in_stored_order(mnist_arrays):
    splits = data.mnist(batch_size=3000)
    for split, loader in (("val", splits.val), ("test", splits.test)):
        np.testing.assert_array_equal(torch.cat([x for x, _ in loader]).numpy(), mnist_arrays[f"{split}_x"])
        np.testing.assert_array_equal(torch.cat([y for _, y in loader]).numpy(), mnist_arrays[f"{split}_y"])


def first_labels(loader, epochs: int = 2) -> list[torch.Tensor]:
    return [next(iter(loader))[1] for _ in range(epochs)]


def test_training_order_depends_on_the_seed_only():
    first, again, other = (first_labels(data.mnist(seed=seed).train) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # reshuffled every epoch


def test_reseeding_the_loader_generator_repeats_an_epoch():
    loader = data.mnist().train
    loader.generator.manual_seed(7)
    epoch = next(iter(loader))[1]
    next(iter(loader))
    loader.generator.manual_seed(7)
    assert torch.equal(next(iter(loader))[1], epoch)


def test_iterating_loaders_leaves_the_global_rng_alone():
    splits = data.mnist(subset=1000)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for loader in splits:
        next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


def test_seeded_subset_takes_the_same_images_for_the_same_seed(mnist_arrays):
    def images(seed):
        return data.mnist(subset=500, seed=seed).train.dataset.tensors[0]

    first = images(0)
    assert first.shape == (500, 784)
    assert torch.equal(first, images(0))
    assert not torch.equal(first, images(1))
    rows = {row.tobytes() for row in mnist_arrays["train_x"]}
    assert all(row.tobytes() in rows for row in first.numpy())
    splits = data.mnist(subset=500)
    assert (len(splits.val.dataset), len(splits.test.dataset)) == (10_000, 10_000)


@pytest.mark.parametrize("subset", [0, 50_001])
def test_subset_out_of_range_is_refused(subset):
    with pytest.raises(ValueError, match=f"subset must be between 1 and 50000, got {subset}"):
        data.mnist(subset=subset)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loaders_hold_the_splits_on_the_device():
    splits = data.mnist(device="cuda", subset=1000)
    x, y = next(iter(splits.train))
    assert x.device.type == "cuda" and y.device.type == "cuda"
