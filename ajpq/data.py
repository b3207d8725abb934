"""Real datasets with fixed, seeded train/validation/test splits.

Small datasets (digits, MNIST, Fashion-MNIST, CIFAR) are held in memory as normalized float tensors, so a
search episode can evaluate a candidate policy without any data-loading overhead; ImageNet-style folders are
streamed through a ``DataLoader``. The validation split is always carved out of the training data (the
search reward must never see the test set).
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import itertools
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ajpq.errors import AJPQError, ConfigError, DataError

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "image-folder": "imagefolder",
    "image_folder": "imagefolder",
}

#: Where Debian's ``dataset-fashion-mnist`` package installs the idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@runtime_checkable
class Split(Protocol):
    """One split of a dataset that can be iterated in mini-batches."""

    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool = False,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches on ``device``; in order unless ``shuffle``."""
        ...


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, but got {batch_size!r}")


@dataclass
class TensorSplit:
    """An in-memory split: ``x`` float32 normalized ``(N, C, H, W)``, ``y`` int64 ``(N,)``.

    Attributes:
        x: Normalized inputs.
        y: Class labels.
        augment_fn: Training augmentation ``(batch, generator) -> batch``, applied only when asked.
        indices: Position of each sample in the source data it was split from (training file for
            MNIST/CIFAR, the whole dataset for digits); lets callers check that splits are disjoint.
    """

    x: Tensor
    y: Tensor
    augment_fn: Callable[[Tensor, torch.Generator | None], Tensor] | None = None
    indices: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"expected x of shape (N, C, H, W) and y of shape (N,), but got {tuple(self.x.shape)} "
                f"and {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int) -> TensorSplit:
        """The first ``n`` samples (a cheap calibration or smoke-test set)."""
        if n < 1:
            raise ConfigError(f"subset size must be >= 1, but got {n}")
        idx = None if self.indices is None else self.indices[:n]
        return TensorSplit(self.x[:n], self.y[:n], self.augment_fn, idx)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool = False,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches on ``device``; shuffling and augmentation draw from ``generator``."""
        _check_batch_size(batch_size)
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                xb, yb = self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                sel = order[start : start + batch_size]
                xb, yb = self.x[sel], self.y[sel]
            if augment and self.augment_fn is not None:
                xb = self.augment_fn(xb, generator)
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def make_crop_flip(pad: int, fill: Sequence[float]) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """Random crop with ``pad`` pixels of padding plus horizontal flip, on a batch of normalized tensors.

    ``fill`` is the per-channel padding value in normalized space (black pixels, as torchvision pads the raw
    image with zeros before normalizing).
    """
    fill_t = torch.tensor(list(fill), dtype=torch.float32).view(1, -1, 1, 1)

    def augment(x: Tensor, generator: torch.Generator | None) -> Tensor:
        b, c, h, w = x.shape
        padded = fill_t.to(x.dtype).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = x
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        rows = oy[:, None] + torch.arange(h)
        cols = ox[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b)[:, None, None, None]
        ci = torch.arange(c)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]

    return augment


class DatasetSplit:
    """A split streamed from a map-style ``torch.utils.data.Dataset`` through a ``DataLoader`` (never held in
    memory): a user's own data, or an image folder.

    Items are ``(input, target)`` pairs; ``collate_fn`` and ``num_workers`` are those of the ``DataLoader`` the data
    came in, if any. The dataset applies its own transforms, so ``augment`` selects ``augmented`` (when given) and is
    otherwise ignored.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        augmented: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.augmented = augmented
        self.collate_fn = collate_fn
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool = False,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` batches on ``device``; the order is drawn from ``generator`` when shuffling."""
        _check_batch_size(batch_size)
        dataset = self.augmented if augment and self.augmented is not None else self.dataset
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=torch.device(device).type == "cuda",
            persistent_workers=False,
        )
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as exc:
                raise _from_worker(exc) from None
            if not isinstance(batch, list | tuple) or len(batch) < 2:
                raise DataError(
                    f"a batch of {type(self.dataset).__name__} must be (inputs, targets), but got "
                    f"{type(batch).__name__}"
                )
            xb, yb = batch[0], batch[1]
            yield xb.to(device, non_blocking=True), torch.as_tensor(yb).to(device, non_blocking=True)


class _SampleList(torch.utils.data.Dataset):
    """Images listed as ``(path, class)`` pairs, decoded with one transform (train or eval)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Any], Tensor]) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, target = self.samples[i]
        try:
            image = default_loader(path)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise DataError(_unreadable(path, exc)) from None
        return self.transform(image), target


def _unreadable(path: str, exc: BaseException) -> str:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return f"{path}: not a readable image ({type(exc).__name__}: {reason}); remove or replace the file"


EARLY_IMAGE_CHECK = 50_000
"""An image folder of up to this many files has every file's header read when it is opened (PIL identifies an
image from its first bytes), so that a file that is not an image is named before any work; larger folders name it
when a batch reaches it."""


def _check_images(samples: Sequence[tuple[str, int]]) -> None:
    """Refuse, naming the file, the first sample PIL cannot identify as an image (see :data:`EARLY_IMAGE_CHECK`)."""
    if len(samples) > EARLY_IMAGE_CHECK:
        return
    from PIL import Image

    for path, _ in samples:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 (identifying the format and size is all open() does)
        except Exception as exc:
            raise DataError(_unreadable(path, exc)) from None


def _from_worker(exc: DataError) -> DataError:
    """A :class:`DataError` raised in a ``DataLoader`` worker arrives wrapped in the worker's traceback text; keep
    its own one line."""
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    marker = "DataError: "
    return DataError(last.split(marker, 1)[1]) if marker in last else exc


IMAGENET_SIZE = 224
"""An image folder's default input side (ImageNet's crop)."""
SMALL_IMAGE = 64
"""Image folders at this side or below are resized to the side exactly (no 256/224 margin, no random-resized crop:
a 28x28 image cropped to 87% loses its strokes) and augmented with a padded random crop and a flip."""


def folder_normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std an image folder is normalized with: ImageNet's, or their luminance mean for grey images."""
    mean, std = _MEAN_STD["imagefolder"]
    if channels == 1:
        return (0.449,), (0.226,)
    return mean, std


class FolderSplit(DatasetSplit):
    """A split of an ImageNet-style folder, decoded on the fly by ``DataLoader`` workers (not in memory)."""

    def __init__(
        self, samples: Sequence[tuple[str, int]], *, image_size: int = IMAGENET_SIZE, channels: int = 3
    ) -> None:
        """Keep the sample list and build the train and eval transforms.

        Args:
            samples: ``(path, class index)`` pairs, as in ``torchvision.datasets.ImageFolder.samples``.
            image_size: Side of the square input fed to the model.
            channels: 3 (RGB) or 1 (grey: images are converted to luminance).
        """
        from torchvision import transforms

        self.samples = list(samples)
        mean, std = folder_normalization(channels)
        colour = [transforms.Grayscale(1)] if channels == 1 else [transforms.Lambda(_rgb)]
        norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        if image_size <= SMALL_IMAGE:
            fit = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
            train = [*fit, transforms.RandomCrop(image_size, padding=max(1, image_size // 8))]
            evaluate = fit
        else:
            train = [transforms.RandomResizedCrop(image_size)]
            evaluate = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
        train_transform = transforms.Compose([*colour, *train, transforms.RandomHorizontalFlip(), *norm])
        eval_transform = transforms.Compose([*colour, *evaluate, *norm])
        super().__init__(
            _SampleList(self.samples, eval_transform),
            augmented=_SampleList(self.samples, train_transform),
            num_workers=min(4, os.cpu_count() or 1),
        )


def _rgb(image: Any) -> Any:
    """Any PIL image (grey, palette, RGBA) as RGB, as ``default_loader`` gives it."""
    return image.convert("RGB")


@dataclass
class DataSplits:
    """A dataset cut into train / validation / test splits, with what a model needs to know about it.

    Attributes:
        name: Dataset name (one of ``DATASETS``).
        train: Training split (the only one ever augmented).
        val: Validation split, carved from the training data; the search reward uses it.
        test: Held-out test split, reported once at the end.
        input_shape: ``(C, H, W)`` of one input.
        num_classes: Number of classes.
        split_seed: Seed of the train/validation split (the same seed gives the same split).
    """

    name: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, int, int]
    num_classes: int
    split_seed: int

    def describe(self) -> str:
        """One line such as ``digits: train 1149 / val 288 / test 360, input 1x8x8, 10 classes``."""
        shape = "x".join(str(s) for s in self.input_shape)
        return (
            f"{self.name}: train {len(self.train)} / val {len(self.val)} / test {len(self.test)}, "
            f"input {shape}, {self.num_classes} classes"
        )


# ----------------------------------------------------------------------------------------------- helpers


def default_data_dir() -> Path:
    """``$AJPQ_DATA_DIR`` or ``~/.cache/ajpq/data``: where downloads go when no ``--data-dir`` is given."""
    env = os.environ.get("AJPQ_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ajpq" / "data"


def _stratified_val(labels: np.ndarray, val_size: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``arange(len(labels))`` into sorted (train, val) index arrays, stratified by label."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_classes = len(np.unique(labels))
    if not isinstance(val_size, int) or not n_classes <= val_size <= n - n_classes:
        raise ConfigError(
            f"val_size for {what} must be an integer in [{n_classes}, {n - n_classes}] "
            f"(at least one sample per class in each split), but got {val_size!r}"
        )
    counts = np.bincount(labels)
    idx = np.arange(n)
    if counts[counts > 0].min() >= 2:
        tr, va = train_test_split(idx, test_size=val_size, stratify=labels, random_state=seed)
    else:  # a class with one sample cannot be stratified; fall back to a plain seeded split
        tr, va = train_test_split(idx, test_size=val_size, random_state=seed)
    return np.sort(tr), np.sort(va)


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# --------------------------------------------------------------------------------------------- idx files


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupted gzip file ({exc}); delete it and download it again") from exc
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzipped or not) as a uint8 array: ``(N, rows, cols)`` images or ``(N,)`` labels.

    Raises:
        DataError: Unknown magic number, or a file shorter or longer than its header says.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 8:
        raise DataError(f"{path}: too short to be an idx file ({len(data)} bytes)")
    (magic,) = struct.unpack(">i", data[:4])
    shape: tuple[int, ...]
    if magic == _IDX_IMAGES_MAGIC:
        if len(data) < 16:
            raise DataError(f"{path}: truncated idx image header")
        n, rows, cols = struct.unpack(">iii", data[4:16])
        shape, offset = (n, rows, cols), 16
    elif magic == _IDX_LABELS_MAGIC:
        (n,) = struct.unpack(">i", data[4:8])
        shape, offset = (n,), 8
    else:
        raise DataError(
            f"{path}: bad idx magic number {magic}, expected {_IDX_IMAGES_MAGIC} (images) or "
            f"{_IDX_LABELS_MAGIC} (labels); is this really an MNIST-format file?"
        )
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise DataError(
            f"{path}: header says {expected} bytes of data for shape {shape}, but the file holds "
            f"{len(data) - offset}; the file is truncated or corrupted"
        )
    # a copy: frombuffer views are read-only, which torch.from_numpy warns about
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _find_idx_dir(candidates: Sequence[Path]) -> dict[str, Path] | None:
    """The first candidate folder that holds all four idx files (each gzipped or not)."""
    for folder in candidates:
        found: dict[str, Path] = {}
        for key, base in _IDX_FILES.items():
            for name in (base, base + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(f"{images}: expected an idx image file (magic {_IDX_IMAGES_MAGIC}), got labels")
    if y.ndim != 1:
        raise DataError(f"{labels}: expected an idx label file (magic {_IDX_LABELS_MAGIC}), got images")
    if len(x) != len(y):
        raise DataError(f"{images.name} holds {len(x)} images but {labels.name} holds {len(y)} labels")
    return x, y


def _missing_message(
    what: str,
    files: Sequence[str],
    folders: Sequence[Path],
    root: Path,
    download_error: str | None,
    extra: str = "",
) -> str:
    where = ", ".join(str(f) for f in folders)
    if download_error:
        status = f"; downloading into {root} failed ({download_error})"
    else:
        status = " (download disabled)"
    return (
        f"{what} not found: looked for {', '.join(files)} in {where}{status}. Pass --data-dir pointing at "
        f"a folder that holds them{extra}."
    )


def _torchvision_download(kind: str, root: Path) -> str | None:
    """Download ``kind`` with torchvision into ``root``; return an error text on failure."""
    from torchvision import datasets

    cls = {
        "mnist": datasets.MNIST,
        "fashion-mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[kind]
    existed = {root, *_folders_under(root)} if root.exists() else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types (URLError, HTTPError, RuntimeError, ...)
        _remove_new_empty_folders(root, existed)
        return f"{type(exc).__name__}: {exc}"
    return None


def _folders_under(root: Path) -> list[Path]:
    return [Path(top) / name for top, names, _ in os.walk(root) for name in names]


def _remove_new_empty_folders(root: Path, existed: set[Path]) -> None:
    """Undo the empty folders (e.g. ``MNIST/raw``) a failed download created, deepest first; keep everything else."""
    for folder in sorted({root, *_folders_under(root)} - existed, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            pass


def _load_mnist_like(
    name: str, data_dir: Path | None, split_seed: int, val_size: int | None, download: bool
) -> DataSplits:
    root = data_dir if data_dir is not None else default_data_dir()
    candidates = [root, root / _TORCHVISION_DIR[name] / "raw"]
    if name == "fashion-mnist" and data_dir is None:
        candidates.append(DEBIAN_FASHION_MNIST)
    files = _find_idx_dir(candidates)
    download_error = None
    if files is None and download:
        download_error = _torchvision_download(name, root)
        files = _find_idx_dir(candidates)
    if files is None:
        extra = ""
        if name == "fashion-mnist":
            extra = (
                f" (on Debian, `apt-get install dataset-fashion-mnist` puts Fashion-MNIST in {DEBIAN_FASHION_MNIST})"
            )
        files_txt = [f"{b}[.gz]" for b in _IDX_FILES.values()]
        raise DataError(_missing_message(name, files_txt, candidates, root, download_error, extra))

    x_train, y_train = _load_idx_pair(files["train_images"], files["train_labels"])
    x_test, y_test = _load_idx_pair(files["test_images"], files["test_labels"])
    y_train64, y_test64 = y_train.astype(np.int64), y_test.astype(np.int64)
    num_classes = int(max(y_train64.max(), y_test64.max())) + 1
    tr, va = _stratified_val(y_train64, 5000 if val_size is None else val_size, split_seed, name)
    (mean,), (std,) = _MEAN_STD[name]

    def to_split(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> TensorSplit:
        xt = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1).float().div_(255.0)
        xt = xt.sub_(mean).div_(std)
        return TensorSplit(xt, torch.from_numpy(y), None, None if idx is None else torch.from_numpy(idx))

    return DataSplits(
        name=name,
        train=to_split(x_train[tr], y_train64[tr], tr),
        val=to_split(x_train[va], y_train64[va], va),
        test=to_split(x_test, y_test64, None),
        input_shape=(1, int(x_train.shape[1]), int(x_train.shape[2])),
        num_classes=num_classes,
        split_seed=split_seed,
    )


# ------------------------------------------------------------------------------------------------- CIFAR

_CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


@cache
def _array_globals() -> dict[tuple[str, str], Any]:
    """The globals a numpy pickle names (built on first use: they are private numpy names)."""
    import codecs

    from numpy._core import multiarray, numeric

    reconstruct, frombuffer = multiarray._reconstruct, numeric._frombuffer  # type: ignore[attr-defined]
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # numpy 1 (the files as distributed)
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy 2
        ("numpy.core.numeric", "_frombuffer"): frombuffer,  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
    }


class _ArrayUnpickler(pickle.Unpickler):
    """Reads pickles of numpy arrays, lists, dicts and strings, and nothing else: CIFAR's python batches are pickles,
    and a plain ``pickle.load`` of a received data folder would run whatever callable the file names."""

    def find_class(self, module: str, name: str) -> Any:
        found = _array_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file has no reason to")
        return found


def _read_cifar_batches(folder: Path, names: Sequence[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for n in names:
        path = folder / n
        try:
            with path.open("rb") as f:
                entry = _ArrayUnpickler(f, encoding="latin1").load()  # torchvision's own format
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry[key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc})") from exc
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar(name: str, data_dir: Path | None, split_seed: int, val_size: int | None, download: bool) -> DataSplits:
    sub, train_files, test_files, key, num_classes = _CIFAR_LAYOUT[name]
    root = data_dir if data_dir is not None else default_data_dir()
    candidates = [root / sub, root]

    def find() -> Path | None:
        for c in candidates:
            if all((c / f).is_file() for f in [*train_files, *test_files]):
                return c
        return None

    folder = find()
    download_error = None
    if folder is None and download:
        download_error = _torchvision_download(name, root)
        folder = find()
    if folder is None:
        extra = f" (torchvision's {sub}/ folder)"
        raise DataError(_missing_message(name, [*train_files, *test_files], candidates, root, download_error, extra))

    x_train, y_train = _read_cifar_batches(folder, train_files, key)
    x_test, y_test = _read_cifar_batches(folder, test_files, key)
    tr, va = _stratified_val(y_train, 5000 if val_size is None else val_size, split_seed, name)
    mean, std = _MEAN_STD[name]
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    augment = make_crop_flip(4, [-m / s for m, s in zip(mean, std, strict=True)])

    def to_split(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None) -> TensorSplit:
        xt = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0).sub_(mean_t).div_(std_t)
        return TensorSplit(xt, torch.from_numpy(y), augment, None if idx is None else torch.from_numpy(idx))

    return DataSplits(
        name=name,
        train=to_split(x_train[tr], y_train[tr], tr),
        val=to_split(x_train[va], y_train[va], va),
        test=to_split(x_test, y_test, None),
        input_shape=(3, 32, 32),
        num_classes=num_classes,
        split_seed=split_seed,
    )


# ------------------------------------------------------------------------------------------------ digits


def _load_digits(split_seed: int, val_size: int | None) -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=split_seed)
    rest = np.sort(rest)
    n_val = int(np.ceil(0.2 * len(rest))) if val_size is None else val_size
    tr_pos, va_pos = _stratified_val(labels[rest], n_val, split_seed, "digits")
    train, val, test = rest[tr_pos], rest[va_pos], np.sort(test)
    mean, std = float(images[train].mean()), float(images[train].std())

    def to_split(sel: np.ndarray) -> TensorSplit:
        x = torch.from_numpy((images[sel] - mean) / std).unsqueeze(1).contiguous()
        return TensorSplit(x, torch.from_numpy(labels[sel]), None, torch.from_numpy(sel))

    return DataSplits(
        name="digits",
        train=to_split(train),
        val=to_split(val),
        test=to_split(test),
        input_shape=(1, 8, 8),
        num_classes=10,
        split_seed=split_seed,
    )


# ------------------------------------------------------------------------------------------- imagefolder


def _load_imagefolder(
    data_dir: Path | None, split_seed: int, val_size: int | None, image_size: int | None, channels: int
) -> DataSplits:
    layout = "<data_dir>/train/<class>/*.jpg and <data_dir>/val/<class>/*.jpg (ImageNet layout)"
    if data_dir is None:
        raise DataError(f"imagefolder needs --data-dir pointing at a folder laid out as {layout}")
    missing = [d for d in ("train", "val") if not (data_dir / d).is_dir()]
    if missing:
        raise DataError(f"{data_dir}: missing {', '.join(missing)}/ folder(s); expected {layout}")
    from torchvision.datasets import ImageFolder

    try:
        train_set, val_set = ImageFolder(str(data_dir / "train")), ImageFolder(str(data_dir / "val"))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{data_dir}: cannot read images ({exc}); expected {layout}") from exc
    if val_set.class_to_idx != train_set.class_to_idx:
        raise DataError(
            f"{data_dir}: train/ and val/ must hold the same class folders, but train has "
            f"{len(train_set.classes)} and val has {len(val_set.classes)} (or their names differ)"
        )
    _check_images([*train_set.samples, *val_set.samples])
    labels = np.asarray(train_set.targets, dtype=np.int64)
    n_val = min(10000, max(len(train_set.classes), len(labels) // 10)) if val_size is None else val_size
    tr, va = _stratified_val(labels, n_val, split_seed, "imagefolder")
    samples = train_set.samples
    size = IMAGENET_SIZE if image_size is None else image_size
    if channels not in (1, 3):
        raise ConfigError(f"an image folder gives 1 (grey) or 3 (RGB) channels, but {channels} were asked for")

    def split(selected: Sequence[tuple[str, int]]) -> FolderSplit:
        return FolderSplit(selected, image_size=size, channels=channels)

    return DataSplits(
        name="imagefolder",
        train=split([samples[i] for i in tr]),
        val=split([samples[i] for i in va]),
        test=split(val_set.samples),
        input_shape=(channels, size, size),
        num_classes=len(train_set.classes),
        split_seed=split_seed,
    )


# ------------------------------------------------------------------------------------------- a user's data

IN_MEMORY_BYTES = 1 << 30
"""A validation split of a user's ``Dataset`` up to this size (estimated from its first sample) is read into memory
once: a search evaluates every candidate on it, and a ``DataLoader`` pass per candidate would cost more than the
evaluation. Larger ones, and every training and test split, are streamed."""


def _check_sample(x: Any, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise DataError(f"{what}: inputs must be tensors (apply a ToTensor transform), but got {type(x).__name__}")
    if x.ndim != 3:
        raise DataError(
            f"{what}: one input must be an image tensor (C, H, W), but has shape {tuple(x.shape)}; AJPQ compresses "
            "Conv2d/Linear models of images"
        )
    return x


def as_split(data: Any, what: str) -> Split:
    """A :class:`Split` of ``data``: a ``Split``, a ``Dataset`` of ``(input, target)`` pairs, a ``DataLoader``
    (its dataset, collate function and workers; AJPQ picks its own batch sizes), or a pair of tensors ``(x, y)``.

    Raises:
        DataError: anything else, an empty dataset, or inputs that are not ``(C, H, W)`` tensors.
    """
    if isinstance(data, TensorSplit | DatasetSplit):
        return data
    if isinstance(data, list | tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        _check_sample(x[0] if len(x) else x, what)
        return TensorSplit(x.float(), y)
    collate, workers = None, 0
    if isinstance(data, torch.utils.data.DataLoader):
        collate, workers, data = data.collate_fn, data.num_workers, data.dataset
    if isinstance(data, torch.utils.data.IterableDataset) or not hasattr(data, "__getitem__"):
        raise DataError(
            f"{what} must be a torch Dataset with __getitem__ and __len__, a DataLoader over one, or (x, y) tensors, "
            f"but got {type(data).__name__}"
        )
    try:
        size = len(data)
    except TypeError:
        raise DataError(f"{what} ({type(data).__name__}) has no len(); give a map-style Dataset") from None
    if size == 0:
        raise DataError(f"{what} is empty")
    sample = data[0]
    if not isinstance(sample, list | tuple) or len(sample) < 2:
        raise DataError(f"{what}: items must be (input, target) pairs, but item 0 is a {type(sample).__name__}")
    _check_sample(sample[0], what)
    return DatasetSplit(data, collate_fn=collate, num_workers=workers)


def in_memory(split: Split, what: str, limit: int = IN_MEMORY_BYTES, progress: bool = True) -> Split:
    """``split`` as a :class:`TensorSplit` when it is a user's dataset that fits in ``limit`` bytes (one pass), else
    unchanged."""
    if not isinstance(split, DatasetSplit):
        return split
    first = next(split.batches(1))[0]
    estimate = first.element_size() * first.numel() * len(split)
    if estimate > limit:
        return split
    from tqdm.auto import tqdm

    xs, ys = [], []
    disable = not progress or os.environ.get("AJPQ_NO_PROGRESS") == "1"
    with tqdm(total=len(split), desc=f"reading {what}", unit="img", disable=disable, leave=False) as bar:
        for x, y in split.batches(256):
            xs.append(x)
            ys.append(y)
            bar.update(len(y))
    return TensorSplit(torch.cat(xs).float(), torch.cat(ys))


def _targets(dataset: Any) -> np.ndarray | None:
    """Class labels of a dataset without decoding it (``targets``/``labels`` as torchvision's datasets have), or
    None."""
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is not None:
            try:
                array = np.asarray(values)
            except Exception:
                return None
            if array.ndim == 1 and len(array) == len(dataset) and np.issubdtype(array.dtype, np.integer):
                return array.astype(np.int64)
    return None


def carve_validation(train: Any, val_size: int | None, split_seed: int, what: str) -> tuple[Any, Any]:
    """``(train, val)`` subsets of a dataset: a seeded validation split, stratified when the dataset's labels are
    known without decoding (``targets``); default size a tenth of it, at most 5,000."""
    n = len(train)
    size = min(5000, max(1, n // 10)) if val_size is None else val_size
    labels = _targets(train)
    if labels is not None:
        tr, va = _stratified_val(labels, size, split_seed, what)
    else:
        if not isinstance(size, int) or not 1 <= size < n:
            raise ConfigError(f"val_size for {what} must be an integer in [1, {n - 1}], but got {size!r}")
        order = np.random.default_rng(split_seed).permutation(n)
        tr, va = np.sort(order[size:]), np.sort(order[:size])
    subset = torch.utils.data.Subset
    return subset(train, tr.tolist()), subset(train, va.tolist())


def num_classes_of(splits: Sequence[Split]) -> int:
    """The class count of labelled splits (largest label + 1; in-memory splits read all labels, streamed ones
    their first batches), or 1 for targets that are not class labels."""
    top = -1
    for split in splits:
        ys = [split.y] if isinstance(split, TensorSplit) else [y for _, y in itertools.islice(split.batches(256), 4)]
        for y in ys:
            if y.dtype.is_floating_point or y.ndim != 1:
                return 1
            top = max(top, int(y.max()) if y.numel() else -1)
    return top + 1


def splits_from_data(
    name: str, train: Any, val: Any, test: Any = None, *, split_seed: int = 0, progress: bool = True
) -> DataSplits:
    """:class:`DataSplits` of a user's data (see :func:`as_split`); the validation split is read into memory when
    it fits (:data:`IN_MEMORY_BYTES`), and the test split defaults to the validation one."""
    train_split = as_split(train, "train")
    val_split = in_memory(as_split(val, "val"), "the validation data", progress=progress)
    test_split = val_split if test is None else as_split(test, "test")
    shape = tuple(int(s) for s in next(train_split.batches(1))[0].shape[1:])
    val_shape = tuple(int(s) for s in next(val_split.batches(1))[0].shape[1:])
    if val_shape != shape:
        raise DataError(f"the validation inputs have shape {val_shape}, but the training inputs {shape}")
    return DataSplits(
        name=name,
        train=train_split,
        val=val_split,
        test=test_split,
        input_shape=(shape[0], shape[1], shape[2]),
        num_classes=num_classes_of([train_split, val_split]),
        split_seed=split_seed,
    )


def _load_factory(
    spec: str, data_dir: Path | None, split_seed: int, val_size: int | None, progress: bool = True
) -> DataSplits:
    """``--dataset package.module:make``: ``make()`` (given ``data_dir`` if it takes it) returns ``(train, test)``
    Datasets, whose validation split is carved from ``train`` by ``split_seed`` and ``val_size``, or ``(train, val,
    test)``."""
    from ajpq.factories import accepted_kwargs, import_factory

    factory = import_factory(spec, "dataset", DataError)
    try:
        made = factory(**accepted_kwargs(factory, {"data_dir": None if data_dir is None else str(data_dir)}))
    except AJPQError:
        raise
    except Exception as exc:  # a failing user factory must not crash with a bare traceback
        raise DataError(f"dataset factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, list | tuple) or len(made) not in (2, 3):
        raise DataError(
            f"dataset factory {spec!r} must return (train, test) or (train, val, test) datasets, but returned "
            f"{type(made).__name__}"
        )
    if len(made) == 3:
        train, val, test = made
    else:
        train, test = made
        as_split(train, f"{spec} train")  # checked before it is cut
        train, val = carve_validation(train, val_size, split_seed, spec)
    return splits_from_data(spec, train, val, test, split_seed=split_seed, progress=progress)


def split_digest(split: Split) -> str:
    """A short sha256 of a split's samples (all of an in-memory split; the size and first 512 samples of a streamed
    one), so that a run resumed on other validation data is noticed."""
    digest = hashlib.sha256(f"{len(split)}".encode())
    batches = [(split.x, split.y)] if isinstance(split, TensorSplit) else itertools.islice(split.batches(512), 1)
    for x, y in batches:
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
        digest.update(y.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ public


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split_seed: int = 0,
    val_size: int | None = None,
    download: bool = True,
    image_size: int | None = None,
    channels: int = 3,
    progress: bool = True,
) -> DataSplits:
    """Load a dataset by name and cut it into seeded train / validation / test splits.

    Args:
        name: One of ``DATASETS``, or ``package.module:factory`` (see :func:`_load_factory`).
        data_dir: Folder holding the data files (idx files, CIFAR batches, or an ImageNet-style tree);
            defaults to ``$AJPQ_DATA_DIR`` or ``~/.cache/ajpq/data``. Ignored for ``digits``.
        split_seed: Seed of the validation split (and of the test split for ``digits``).
        val_size: Number of validation samples, overriding the per-dataset default.
        download: Whether to let torchvision download missing MNIST/Fashion-MNIST/CIFAR files.
        image_size: ``imagefolder``: side of the square input (default 224).
        channels: ``imagefolder``: 3 (RGB) or 1 (grey).
        progress: Show a progress bar while a user's validation data is read into memory.

    Raises:
        DataError: Unknown name, missing or malformed files.
        ConfigError: ``val_size`` out of range.
    """
    path = None if data_dir is None else Path(data_dir).expanduser()
    if ":" in name:
        return _load_factory(name, path, split_seed, val_size, progress)
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}{_suggest(key, DATASETS)}")
    if key == "digits":
        return _load_digits(split_seed, val_size)
    if key in ("mnist", "fashion-mnist"):
        return _load_mnist_like(key, path, split_seed, val_size, download)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, path, split_seed, val_size, download)
    return _load_imagefolder(path, split_seed, val_size, image_size, channels)
