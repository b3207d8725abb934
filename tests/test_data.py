"""Datasets: seeded stratified splits, the idx reader, CIFAR batches and the error messages."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ajpq.data import (
    _MEAN_STD,
    DATASETS,
    DEBIAN_FASHION_MNIST,
    DataSplits,
    Split,
    TensorSplit,
    load_dataset,
    make_crop_flip,
    read_idx,
)
from ajpq.errors import ConfigError, DataError


def _indices(split: Split) -> set[int]:
    assert isinstance(split, TensorSplit) and split.indices is not None
    return set(split.indices.tolist())


def _row_hashes(split: TensorSplit) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x.flatten(1)}


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


def test_digits_sizes_and_shape(digits: DataSplits) -> None:
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert digits.describe() == "digits: train 1149 / val 288 / test 360, input 1x8x8, 10 classes"
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    for split in (digits.train, digits.val, digits.test):
        assert isinstance(split, TensorSplit)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8)
    assert isinstance(digits.train, TensorSplit)
    assert abs(digits.train.x.mean().item()) < 1e-3 and abs(digits.train.x.std().item() - 1) < 1e-2


def test_digits_splits_disjoint_and_stratified(digits: DataSplits) -> None:
    idx = [_indices(s) for s in (digits.train, digits.val, digits.test)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == 1797
    # load_digits has no exact duplicate images, so content hashes must not overlap either
    hashes = [_row_hashes(s) for s in (digits.train, digits.val, digits.test)]  # type: ignore[arg-type]
    assert not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])
    for split in (digits.train, digits.val, digits.test):
        assert isinstance(split, TensorSplit)
        assert set(split.y.tolist()) == set(range(10))


def test_digits_seed_reproduces_and_differs(digits: DataSplits) -> None:
    again = load_dataset("digits", split_seed=0)
    other = load_dataset("digits", split_seed=1)
    assert _indices(again.val) == _indices(digits.val) and _indices(again.test) == _indices(digits.test)
    assert isinstance(again.train, TensorSplit) and isinstance(digits.train, TensorSplit)
    assert torch.equal(again.train.x, digits.train.x)
    assert _indices(other.val) != _indices(digits.val) and _indices(other.test) != _indices(digits.test)


def test_digits_val_size_override() -> None:
    splits = load_dataset("digits", val_size=100)
    assert len(splits.val) == 100 and len(splits.test) == 360 and len(splits.train) == 1337
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("digits", val_size=5)


def test_batches_order_shuffle_and_device(digits: DataSplits) -> None:
    split = digits.val
    assert isinstance(split, TensorSplit)
    xs, ys = zip(*split.batches(64), strict=True)
    assert [len(y) for y in ys] == [64, 64, 64, 64, 32]
    assert torch.equal(torch.cat(xs), split.x) and torch.equal(torch.cat(ys), split.y)
    a = torch.cat([y for _, y in split.batches(50, shuffle=True, generator=torch.Generator().manual_seed(3))])
    b = torch.cat([y for _, y in split.batches(50, shuffle=True, generator=torch.Generator().manual_seed(3))])
    assert torch.equal(a, b) and not torch.equal(a, split.y)
    assert sorted(a.tolist()) == sorted(split.y.tolist())
    x, _ = next(split.batches(8, device="cpu"))
    assert x.device.type == "cpu"
    sub = split.subset(10)
    assert len(sub) == 10 and torch.equal(sub.x, split.x[:10])
    with pytest.raises(ConfigError, match="batch_size"):
        next(split.batches(0))


def test_unknown_dataset_suggests() -> None:
    with pytest.raises(DataError, match=r"did you mean 'fashion-mnist'") as info:
        load_dataset("fashon-mnist")
    for name in DATASETS:
        assert name in str(info.value)


# ------------------------------------------------------------------------------------------------- idx


def _write_idx(path: Path, arr: np.ndarray, *, magic: int | None = None) -> None:
    if magic is None:
        magic = 2051 if arr.ndim == 3 else 2049
    header = struct.pack(">i", magic) + struct.pack(">" + "i" * arr.ndim, *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _write_fake_mnist(folder: Path, *, gz: bool, n_train: int = 30, n_test: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    y_train = np.arange(n_train) % 10  # balanced, so a stratified split is possible
    _write_idx(folder / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / f"train-labels-idx1-ubyte{ext}", y_train)
    _write_idx(folder / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test) % 10)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_flat_folder(tmp_path: Path, gz: bool) -> None:
    _write_fake_mnist(tmp_path, gz=gz)
    splits = load_dataset("mnist", data_dir=tmp_path, val_size=10, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 10)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert isinstance(splits.val, TensorSplit)
    assert set(splits.val.y.tolist()) == set(range(10))
    assert not (_indices(splits.train) & _indices(splits.val))
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert raw.shape == (30, 28, 28) and raw.dtype == np.uint8


def test_idx_torchvision_layout(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    splits = load_dataset("fashion-mnist", data_dir=tmp_path, val_size=10, download=False)
    assert len(splits.test) == 10
    assert isinstance(splits.test, TensorSplit)
    expected = (read_idx(tmp_path / "FashionMNIST/raw/t10k-images-idx3-ubyte.gz") / 255.0 - 0.2860) / 0.3530
    assert torch.allclose(splits.test.x[:, 0], torch.from_numpy(expected).float(), atol=1e-5)


def test_idx_bad_magic(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=False)
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((30, 28, 28)), magic=1234)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: bad idx magic number 1234"):
        load_dataset("mnist", data_dir=tmp_path, val_size=10, download=False)


def test_idx_count_mismatch_and_truncation(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(29) % 10)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds 30 images but .* 29 labels"):
        load_dataset("mnist", data_dir=tmp_path, val_size=10, download=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_missing_data_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path / "nowhere", download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "--data-dir" in msg and str(tmp_path / "nowhere") in msg
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match=r"data_batch_1.*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match=r"train/.*val/"):
        load_dataset("imagefolder", data_dir=tmp_path)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist() -> None:
    splits = load_dataset("fashion-mnist", data_dir=DEBIAN_FASHION_MNIST, val_size=2000, split_seed=1)
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.test) == 10000
    assert len(splits.val) == 2000
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert isinstance(splits.val, TensorSplit)
    assert torch.bincount(splits.val.y).tolist() == [200] * 10  # stratified
    x, y = next(splits.train.batches(16))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


# ----------------------------------------------------------------------------------------------- CIFAR


def test_cifar_batches_and_augmentation(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f)
    splits = load_dataset("cifar10", data_dir=tmp_path, val_size=20, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 20)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    train = splits.train
    assert isinstance(train, TensorSplit)
    plain = torch.cat([x for x, _ in train.batches(32)])
    assert torch.equal(plain, train.x)
    aug1 = torch.cat([x for x, _ in train.batches(32, augment=True, generator=torch.Generator().manual_seed(0))])
    aug2 = torch.cat([x for x, _ in train.batches(32, augment=True, generator=torch.Generator().manual_seed(0))])
    assert aug1.shape == train.x.shape and torch.equal(aug1, aug2) and not torch.equal(aug1, train.x)


class _RunsCode:
    """Pickles as a call of ``pathlib.Path.touch``: what a hostile data file would do with ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_read_numpy_pickles_of_every_protocol(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    data = {name: rng.integers(0, 256, (20, 3072), dtype=np.uint8) for name in ("train", "test")}
    for name, images in data.items():
        labels = np.arange(20, dtype=np.int64) % 2 * 5
        with (folder / name).open("wb") as f:
            pickle.dump({"data": images, "fine_labels": labels, "batch_label": b"x"}, f, protocol=protocol)
    splits = load_dataset("cifar100", data_dir=tmp_path, val_size=10, download=False)
    test = splits.test
    assert isinstance(test, TensorSplit) and splits.num_classes == 100
    assert test.y.tolist() == [0, 5] * 10
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _MEAN_STD["cifar100"])
    expected = torch.from_numpy(data["test"]).view(-1, 3, 32, 32).float().div(255.0).sub(mean).div(std)
    assert torch.allclose(test.x, expected)


def test_a_cifar_batch_that_names_a_callable_is_refused_without_running_it(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "ran"
    good = {"data": np.zeros((20, 3072), dtype=np.uint8), "fine_labels": [0] * 20}
    with (folder / "train").open("wb") as f:
        pickle.dump(good, f)
    with (folder / "test").open("wb") as f:
        pickle.dump({**good, "extra": _RunsCode(marker)}, f)
    with pytest.raises(DataError, match=r"test: not a readable CIFAR python batch .*names pathlib.*touch"):
        load_dataset("cifar100", data_dir=tmp_path, val_size=10, download=False)
    assert not marker.exists()


def test_crop_flip_is_a_shifted_flipped_copy() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = make_crop_flip(0, [0.0])(x, torch.Generator().manual_seed(0))
    for i in range(2):  # no padding: each sample is itself or its mirror image
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    padded = make_crop_flip(2, [-9.0])(x, torch.Generator().manual_seed(1))
    assert padded.shape == x.shape
    assert set(padded.unique().tolist()) <= set(x.unique().tolist()) | {-9.0}


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    splits = load_dataset("imagefolder", data_dir=tmp_path, val_size=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 2, 4)
    assert splits.input_shape == (3, 224, 224) and splits.num_classes == 2
    x, y = next(splits.test.batches(4, augment=True))
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [0, 0, 1, 1]
