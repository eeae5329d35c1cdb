"""Datasets as train / train_plain / val / test splits, registered by name (``create_splits``).

``val`` is always held out from the training set, never the test set. ``train_plain`` holds the
same samples as ``train`` without augmentation (curvature estimation needs clean inputs). Splits
and subsets come from a seeded permutation, so a seed fixes every sample's split.
Every dataset yields ``(float tensor C x H x W, normalised; int label)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from napkit.errors import NapkitError, unknown_choice
from napkit.io import load_torch, save_torch
from napkit.registry import Registry

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Sample = tuple[Tensor, int]


@dataclass
class DataSplits:
    """The four splits of one dataset and the input shape / class count models are built for."""

    train: Dataset[Sample]
    train_plain: Dataset[Sample]
    val: Dataset[Sample]
    test: Dataset[Sample]
    num_classes: int
    in_channels: int
    input_size: int
    name: str


# ---------------------------------------------------------------------------------------------
# registry

_DATASETS: Registry[Callable[..., DataSplits]] = Registry("dataset")
Builder = TypeVar("Builder", bound=Callable[..., DataSplits])


def register_dataset(fn: Builder) -> Builder:
    """Register a split builder under its function name; it must accept ``seed``."""
    return _DATASETS.add(fn.__name__, fn)


def list_datasets() -> list[str]:
    """Names accepted by :func:`create_splits`, sorted."""
    return _DATASETS.names()


def create_splits(name: str, *, seed: int = 0, **kwargs: Any) -> DataSplits:
    """Build the splits of dataset ``name``; ``kwargs`` are its config (``conf/data/<name>.yaml``)."""
    builder = _DATASETS.get(name)
    valid = [p for p in inspect.signature(builder).parameters if p != "seed"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise NapkitError(
            f"dataset {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    return builder(seed=seed, **kwargs)


def check_present(name: str, data: dict[str, Any]) -> None:
    """Before a stage's work: the dataset's files are where ``data.root`` says, unless they may be
    downloaded (``download: true``); MNIST's idx headers are checked too. Cheap: no decoding."""
    root = Path(str(data.get("root", "")))
    need: list[Path] = []
    if name == "mnist":
        raw = root / "MNIST" / "raw"
        check_mnist_files(raw)
        need = [] if data.get("download", True) else [raw / f for f in MNIST_FILES]
    elif name == "cifar10" and data.get("format") == "imagefolder":
        need = [root / "train", root / "test"]
    elif name == "cifar10" and not data.get("download", True):
        need = [root / "cifar-10-batches-py"]
    elif name == "imagenet":
        need = [root / "train", root / "val"]
    for path in need:
        if not path.exists():
            hint = "" if name == "imagenet" else " or set data.download=true on a connected machine"
            raise NapkitError(f"data.root={root}: {path} not found; put the {name} files there{hint}")


# ---------------------------------------------------------------------------------------------
# dataset classes


@dataclass(frozen=True)
class Augment:
    """Random crop after zero-padding by ``pad`` pixels, then a random horizontal flip if ``flip``."""

    pad: int
    flip: bool


@dataclass(frozen=True, eq=False)
class ImageTensorDataset(Dataset[Sample]):
    """Samples ``indices`` of uint8 images held in memory, normalised (and augmented) per item.

    The splits of one dataset share ``images``. Augmentation is a pure function of
    (seed, epoch, sample), so batches repeat exactly across runs, resumes and worker counts;
    ``make_loader`` selects the epoch through :meth:`with_epoch`.
    """

    images: Tensor = field(repr=False)  # uint8 (N, C, H, W)
    labels: Tensor = field(repr=False)  # int64 (N,)
    indices: Tensor = field(repr=False)  # int64, which of the N samples this split holds
    mean: Tensor = field(repr=False)  # (C, 1, 1)
    std: Tensor = field(repr=False)  # (C, 1, 1)
    augment: Augment | None = None
    seed: int = 0
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        j = int(self.indices[i])
        image = self.images[j]
        if self.augment is not None:
            image = self._augmented(image, j)
        x = image.float().div_(255).sub_(self.mean).div_(self.std)
        return x, int(self.labels[j])

    def with_epoch(self, epoch: int) -> ImageTensorDataset:
        """A view of the same samples whose augmentation is drawn for ``epoch``."""
        return dataclasses.replace(self, epoch=epoch)

    def _augmented(self, image: Tensor, j: int) -> Tensor:
        assert self.augment is not None
        rng = random.Random(f"{self.seed}:{self.epoch}:{j}")  # str seeds hash stably (sha512)
        pad, (h, w) = self.augment.pad, image.shape[-2:]
        if pad:
            top, left = rng.randrange(2 * pad + 1), rng.randrange(2 * pad + 1)
            image = F.pad(image, (pad, pad, pad, pad))[:, top : top + h, left : left + w]
        if self.augment.flip and rng.random() < 0.5:
            image = image.flip(-1)
        return image


class ImageFileDataset(Dataset[Sample]):
    """Image files read per item (``ImageFolder`` samples) through a torchvision transform."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Image.Image], Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except OSError as exc:  # truncated or corrupt: name the file, not just PIL's reason
            raise NapkitError(bad_image(path, exc)) from None


def dataset_fingerprint(dataset: Dataset[Sample], probes: int = 64) -> str:
    """Short hash of what a split holds: its size, the contents of up to ``probes`` evenly spaced samples,
    and for in-memory splits every sample index (subsets) and the normalisation; for image files, every
    path. A resume checkpoint keyed by it is not reused after the data or the data config changes."""
    n = len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"{type(dataset).__name__}:{n}".encode())
    if isinstance(dataset, ImageTensorDataset):
        h.update(dataset.indices.numpy().tobytes())
        h.update(f"{tuple(dataset.images.shape)}:{dataset.mean.tolist()}:{dataset.std.tolist()}:"
                 f"{dataset.augment}:{dataset.seed}".encode())
    elif isinstance(dataset, ImageFileDataset):
        h.update(repr(dataset.samples).encode())
        return h.hexdigest()[:16]  # reading files to probe them would cost a decode each
    for i in sorted({round(k * (n - 1) / max(probes - 1, 1)) for k in range(probes)} if n else set()):
        for part in dataset[i]:
            h.update(part.numpy().tobytes() if isinstance(part, Tensor) else repr(part).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# builders


@register_dataset
def digits(
    *,
    seed: int = 0,
    input_size: int = 28,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    augment: bool = False,
    subset_train: int | None = None,
    subset_test: int | None = None,
) -> DataSplits:
    """scikit-learn's 8x8 digits (1,797 images, shipped in its wheel), resized once to ``input_size``."""
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

    _check_fraction("test_fraction", test_fraction, allow_zero=False)
    bunch = load_digits()
    small = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)  # values 0..16 -> [0, 1]
    resized = F.interpolate(small, size=input_size, mode="bilinear", align_corners=False)
    images = resized.mul(255).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    n_test = round(test_fraction * len(labels))
    pool, test_pool = perm[n_test:], perm[:n_test]
    pixels = images[pool].float().div(255)
    return _tensor_splits(
        "digits",
        train=(images, labels),
        test=(images, labels),
        train_pool=pool,
        test_pool=test_pool,
        g=g,
        val_fraction=val_fraction,
        subset_train=subset_train,
        subset_test=subset_test,
        mean=(pixels.mean().item(),),
        std=(pixels.std().item(),),
        augment=Augment(pad=2, flip=False) if augment else None,
        seed=seed,
        num_classes=10,
    )


@register_dataset
def mnist(
    *,
    seed: int = 0,
    root: str = "data/mnist",
    download: bool = True,
    input_size: int = 28,
    val_fraction: float = 0.1,
    augment: bool = False,
    subset_train: int | None = None,
    subset_test: int | None = None,
) -> DataSplits:
    """MNIST through torchvision (files under ``root/MNIST/raw``); ``input_size`` 32 zero-pads by 2."""
    if input_size not in (28, 32):
        raise NapkitError(f"mnist input_size must be 28 or 32 (zero-padded), got {input_size}")
    pad = (input_size - 28) // 2
    train, test = (_load_mnist(root, train=t, download=download, pad=pad) for t in (True, False))
    return _tensor_splits(
        "mnist",
        train=train,
        test=test,
        train_pool=torch.arange(len(train[1])),
        test_pool=torch.arange(len(test[1])),
        g=torch.Generator().manual_seed(seed),
        val_fraction=val_fraction,
        subset_train=subset_train,
        subset_test=subset_test,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        augment=Augment(pad=2, flip=False) if augment else None,
        seed=seed,
        num_classes=10,
    )


@register_dataset
def cifar10(
    *,
    seed: int = 0,
    root: str = "data/cifar10",
    format: str = "torchvision",
    download: bool = True,
    cache_dir: str = ".cache/napkit",
    val_fraction: float = 0.1,
    augment: bool = True,
    subset_train: int | None = None,
    subset_test: int | None = None,
) -> DataSplits:
    """CIFAR-10 from torchvision's pickled batches (``format: torchvision``, may download) or an image
    folder ``root/{train,test}/<class>/*.jpg`` (``format: imagefolder``), decoded once into ``cache_dir``.
    Augmentation: random 32x32 crop of the 4-pixel zero-padded image, random horizontal flip."""
    if format == "torchvision":
        train, test = (_load_cifar_torchvision(root, train=t, download=download) for t in (True, False))
    elif format == "imagefolder":
        train, test = (_decoded_cifar_folder(Path(root), split, cache_dir) for split in ("train", "test"))
    else:
        raise unknown_choice("cifar10 format", format, ["imagefolder", "torchvision"])
    return _tensor_splits(
        "cifar10",
        train=train,
        test=test,
        train_pool=torch.arange(len(train[1])),
        test_pool=torch.arange(len(test[1])),
        g=torch.Generator().manual_seed(seed),
        val_fraction=val_fraction,
        subset_train=subset_train,
        subset_test=subset_test,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        augment=Augment(pad=4, flip=True) if augment else None,
        seed=seed,
        num_classes=10,
    )


@register_dataset
def imagenet(
    *,
    seed: int = 0,
    root: str = "data/imagenet",
    val_size: int = 10000,
    augment: bool = True,
    subset_train: int | None = None,
    subset_test: int | None = None,
) -> DataSplits:
    """ImageNet-style folder ``root/{train,val}/<class>/<image>``; test is ``val/``, and ``val_size``
    training images are held out as val. torchvision's standard 224 transforms; the random ones draw
    from torch's RNG, which ``make_loader`` seeds per worker from (seed, epoch) when num_workers > 0."""
    layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image>"
    train_folder = _image_folder(Path(root) / "train", layout)
    test_folder = _image_folder(Path(root) / "val", layout)
    if test_folder.classes != train_folder.classes:
        raise NapkitError(
            f"{root}/val has different class folders than {root}/train; expected layout {layout}"
        )
    g = torch.Generator().manual_seed(seed)
    pool = _shuffled_cap(torch.arange(len(train_folder.samples)), "subset_train", subset_train, g)
    if not 0 <= val_size < len(pool):
        raise NapkitError(
            f"imagenet val_size must be in [0, {len(pool)}) (the training images available), got {val_size}"
        )
    train_idx, val_idx = _split_off(pool, val_size)
    test_pool = torch.arange(len(test_folder.samples))
    test_idx = _shuffled_cap(test_pool, "subset_test", subset_test, g).sort().values
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    plain = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    random_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])

    def pick(folder: torchvision.datasets.ImageFolder, idx: Tensor, transform: Callable) -> ImageFileDataset:
        return ImageFileDataset([folder.samples[i] for i in idx.tolist()], transform)

    return DataSplits(
        train=pick(train_folder, train_idx, random_tf if augment else plain),
        train_plain=pick(train_folder, train_idx, plain),
        val=pick(train_folder, val_idx, plain),
        test=pick(test_folder, test_idx, plain),
        num_classes=len(train_folder.classes),
        in_channels=3,
        input_size=224,
        name="imagenet",
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _tensor_splits(
    name: str,
    *,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    train_pool: Tensor,
    test_pool: Tensor,
    g: torch.Generator,
    val_fraction: float,
    subset_train: int | None,
    subset_test: int | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: Augment | None,
    seed: int,
    num_classes: int,
) -> DataSplits:
    """Cap and split the index pools, then wrap each split as a view of the shared image tensors."""
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    pool = _shuffled_cap(train_pool, "subset_train", subset_train, g)
    train_idx, val_idx = _split_off(pool, round(val_fraction * len(pool)))
    test_idx = _shuffled_cap(test_pool, "subset_test", subset_test, g).sort().values
    mean_t, std_t = (torch.tensor(v).view(-1, 1, 1) for v in (mean, std))
    view = partial(ImageTensorDataset, mean=mean_t, std=std_t, seed=seed)
    images = train[0]
    return DataSplits(
        train=view(*train, train_idx, augment=augment),
        train_plain=view(*train, train_idx),
        val=view(*train, val_idx),
        test=view(*test, test_idx),
        num_classes=num_classes,
        in_channels=images.shape[1],
        input_size=images.shape[-1],
        name=name,
    )


def _first_line(exc: Exception) -> str:
    """An exception's message cut to one line (torchvision's download errors run to several)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    """``value`` must lie in [0, 1) or (0, 1)."""
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        raise NapkitError(f"{key} must be in {'[0' if allow_zero else '(0'}, 1), got {value!r}")


def _shuffled_cap(pool: Tensor, key: str, cap: int | None, g: torch.Generator) -> Tensor:
    """``pool`` in seeded random order, truncated to ``cap`` items when given."""
    if cap is not None and (not isinstance(cap, int) or cap < 1):
        raise NapkitError(f"{key} must be a positive integer or null, got {cap!r}")
    return pool[torch.randperm(len(pool), generator=g)][:cap]


def _split_off(pool: Tensor, n_val: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices, each sorted: the first ``n_val`` of the shuffled pool are val."""
    return pool[n_val:].sort().values, pool[:n_val].sort().values


MNIST_FILES = {  # raw file -> (idx magic number, bytes per record after the header)
    "train-images-idx3-ubyte": (2051, 28 * 28), "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 28 * 28), "t10k-labels-idx1-ubyte": (2049, 1),
}


def check_mnist_files(raw: Path) -> None:
    """Each MNIST idx file present in ``raw`` must have its idx header and the length it announces."""
    for name, (magic, record) in MNIST_FILES.items():
        path = raw / name
        if not path.is_file():
            continue
        header_len = 16 if record > 1 else 8
        with path.open("rb") as fh:
            header = fh.read(header_len)
        size = path.stat().st_size
        found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
        count = int.from_bytes(header[4:8], "big") if len(header) >= 8 else 0
        if found != magic or size != header_len + count * record:
            what = f"idx magic {found}, expected {magic}" if found != magic else \
                f"{size} bytes, its header announces {count} records = {header_len + count * record} bytes"
            raise NapkitError(f"corrupt MNIST file {path} ({what}); delete it and re-download it "
                              "(data.download: true) or copy it again from the MNIST archive")


def _load_mnist(root: str, *, train: bool, download: bool, pad: int) -> tuple[Tensor, Tensor]:
    """uint8 (N, 1, H, W) images and labels of one MNIST split, zero-padded by ``pad``."""
    check_mnist_files(Path(root) / "MNIST" / "raw")
    try:
        found = torchvision.datasets.MNIST(root, train=train, download=download)
    except Exception as exc:  # RuntimeError when absent, URLError/OSError when a download fails
        raw = Path(root) / "MNIST" / "raw"
        raise NapkitError(
            f"MNIST not found in {raw} ({_first_line(exc)}); "
            f"run once with download: true on a connected machine, or put train-images-idx3-ubyte, "
            f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte there"
        ) from exc
    return F.pad(found.data.unsqueeze(1), (pad,) * 4), found.targets.long()


def _load_cifar_torchvision(root: str, *, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """uint8 (N, 3, 32, 32) images and labels from torchvision's CIFAR-10 batches."""
    try:
        found = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except Exception as exc:  # RuntimeError when absent or corrupt, URLError/OSError when a download fails
        raise NapkitError(
            f"CIFAR-10 not found in {Path(root) / 'cifar-10-batches-py'} ({_first_line(exc)}); "
            f"run once with download: true on a connected machine, or use format: imagefolder "
            f"with {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
        ) from exc
    return torch.from_numpy(found.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(found.targets)


def _decoded_cifar_folder(root: Path, split: str, cache_dir: str) -> tuple[Tensor, Tensor]:
    """uint8 images and labels of ``root/split``, decoded once into a cache keyed by that path and by
    every image's name, size and modification time: replaced, added or removed images are decoded anew."""
    folder = root / split
    classes = ", ".join(CIFAR10_CLASSES)
    layout = f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg, class folders {classes}"
    if not folder.is_dir():
        raise NapkitError(f"CIFAR-10 image folder {folder} not found; expected layout {layout}")
    cache = Path(cache_dir) / f"cifar10-{split}-{folder_fingerprint(folder)}.pt"
    if cache.is_file():
        data = load_torch(cache)
        return data["images"], data["labels"]
    found = _image_folder(folder, layout)
    if tuple(found.classes) != CIFAR10_CLASSES:
        raise NapkitError(f"{folder} has class folders {found.classes}; expected layout {layout}")
    images = _decode_images([path for path, _ in found.samples], shape=(3, 32, 32))
    labels = torch.tensor(found.targets)
    save_torch(cache, {"images": images, "labels": labels})
    return images, labels


def bad_image(path: str | Path, exc: Exception) -> str:
    """The one-line error for an image file PIL cannot read."""
    return (f"cannot decode image {path} ({_first_line(exc)}); the file is truncated or corrupt: delete it, "
            "or re-extract the dataset archive")


def folder_fingerprint(folder: Path) -> str:
    """Hash of a folder's path and every file's relative path, size and mtime (ns) below it: changes
    when any file is replaced, added or removed, without reading the files."""
    h = hashlib.sha1(str(folder.resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), folder)}:{st.st_size}:{st.st_mtime_ns}\n"
                     .encode())
    return h.hexdigest()[:16]


def _image_folder(folder: Path, layout: str) -> torchvision.datasets.ImageFolder:
    """torchvision's ImageFolder scan of ``folder`` (classes sorted), with napkit's layout errors."""
    if not folder.is_dir():
        raise NapkitError(f"image folder {folder} not found; expected layout {layout}")
    try:
        return torchvision.datasets.ImageFolder(str(folder))
    except FileNotFoundError as exc:
        raise NapkitError(f"bad image folder {folder}: {exc}; expected layout {layout}") from exc


def _decode_images(paths: list[str], *, shape: tuple[int, int, int]) -> Tensor:
    """Decode image files with PIL (as ImageFolder does) into one uint8 (N, C, H, W) tensor."""
    images = np.empty((len(paths), shape[1], shape[2], shape[0]), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as exc:
            raise NapkitError(bad_image(path, exc)) from None
        if pixels.shape != images.shape[1:]:
            raise NapkitError(f"image {path} has shape {pixels.shape} (H, W, C); expected {images.shape[1:]}")
        images[i] = pixels
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
