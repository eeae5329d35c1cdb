"""Datasets and loaders: seeded disjoint splits, normalised tensors, deterministic batches, real data."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from napkit.data import create_splits, list_datasets, make_loader
from napkit.data.datasets import CIFAR10_CLASSES, ImageFileDataset, dataset_fingerprint
from napkit.errors import NapkitError

REPO = Path(__file__).resolve().parents[1]
# the full archives (../shared/data beside the clone; NAPKIT_SHARED_DATA elsewhere): tests needing them skip
SHARED = Path(os.environ.get("NAPKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = REPO / "tests" / "fixtures"  # a few real MNIST records and CIFAR-10 JPEGs, always present
ARCHIVES = {"mnist": "mnist-MNIST-raw.tar.gz", "cifar10": "cifar10-jpg-imagefolder.tar.gz"}
# Extracted once and kept (git-ignored): creating and deleting CIFAR's 60,000 files costs 2-40 s per
# session on these disks, so sessions share one extraction. Decode caches stay per-session (tmp).
EXTRACTED = REPO / ".cache" / "test-data"


# ---------------------------------------------------------------------------------------------
# fixtures: real data extracted once, a tiny fake ImageNet


def _extracted(name: str) -> Path:
    """The archive's contents under EXTRACTED, extracting it (atomically) on first use."""
    archive = SHARED / ARCHIVES[name]
    if not archive.is_file():
        pytest.skip(f"{archive} not found (the full real-data tests need ../shared/data/)")
    target = EXTRACTED / f"{name}-{archive.stat().st_size}"
    if not target.is_dir():
        EXTRACTED.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=EXTRACTED))
        subprocess.run(["tar", "xzf", str(archive), "-C", str(tmp)], check=True)  # 5x faster than tarfile
        try:
            tmp.rename(target)
        except OSError:  # another session extracted it first
            shutil.rmtree(tmp)
    return target


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    return _extracted("mnist")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return _extracted("cifar10")


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cifar_first_load(cifar_root, cifar_cache):
    """(splits, seconds) of the first, decoding load."""
    start = time.perf_counter()
    splits = create_splits("cifar10", root=str(cifar_root), format="imagefolder", cache_dir=str(cifar_cache))
    return splits, time.perf_counter() - start


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for split, n in (("train", 6), ("val", 2)):
        for c, cls in enumerate(("n01", "n02")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), (60 * c, 10 * i, 90)).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def digits():
    return create_splits("digits", seed=0)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    if len(a) != len(b):
        return False
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# digits: splits, determinism, tensors


def test_digits_splits_are_disjoint_and_add_up(digits):
    parts = [set(split.indices.tolist()) for split in (digits.train, digits.val, digits.test)]
    assert sum(map(len, parts)) == 1797 and set().union(*parts) == set(range(1797))
    assert len(digits.test) == round(0.2 * 1797) and len(digits.val) == round(0.1 * (1797 - len(digits.test)))
    assert torch.equal(digits.train_plain.indices, digits.train.indices)
    assert (digits.num_classes, digits.in_channels, digits.input_size, digits.name) == (10, 1, 28, "digits")


def test_digits_splits_follow_the_seed(digits):
    again, other = create_splits("digits", seed=0), create_splits("digits", seed=1)
    assert torch.equal(again.val.indices, digits.val.indices)
    assert torch.equal(again.test.indices, digits.test.indices)
    assert not torch.equal(other.val.indices, digits.val.indices)
    assert not torch.equal(other.test.indices, digits.test.indices)


def test_digits_samples_are_normalised_tensors(digits):
    x, y = digits.train_plain[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int) and 0 <= y <= 9
    pixels = torch.stack([digits.train_plain[i][0] for i in range(len(digits.train_plain))])
    assert abs(pixels.mean().item()) < 0.05 and abs(pixels.std().item() - 1) < 0.05
    assert create_splits("digits", input_size=32).test[0][0].shape == (1, 32, 32)


def test_subset_caps_are_applied_before_val_is_carved():
    capped = create_splits("digits", subset_train=100, subset_test=50, val_fraction=0.2)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (80, 20, 50)


def test_augmentation_depends_only_on_seed_epoch_and_sample():
    splits = create_splits("digits", augment=True)
    first = [splits.train.with_epoch(0)[i][0] for i in range(20)]
    assert all(torch.equal(a, splits.train.with_epoch(0)[i][0]) for i, a in enumerate(first))
    assert any(not torch.equal(a, splits.train.with_epoch(1)[i][0]) for i, a in enumerate(first))
    assert any(not torch.equal(a, splits.train_plain[i][0]) for i, a in enumerate(first))


def test_without_augmentation_train_equals_train_plain(digits):
    assert all(torch.equal(digits.train[i][0], digits.train_plain[i][0]) for i in range(10))


# ---------------------------------------------------------------------------------------------
# loaders


def test_loader_order_depends_only_on_seed_and_epoch(digits):
    def run(seed, epoch):
        return batches(make_loader(digits.train, batch_size=64, shuffle=True, seed=seed, epoch=epoch))

    assert same_batches(run(0, 3), run(0, 3))
    assert not same_batches(run(0, 3), run(0, 4))
    assert not same_batches(run(0, 3), run(1, 3))


def test_unshuffled_loader_keeps_dataset_order(digits):
    ys = torch.cat([y for _, y in make_loader(digits.test, batch_size=100, shuffle=False, seed=0)])
    assert ys.tolist() == [digits.test[i][1] for i in range(len(digits.test))]


def test_augmented_batches_are_the_same_with_workers():
    train = create_splits("digits", augment=True, subset_train=200).train
    kwargs = {"batch_size": 32, "shuffle": True, "seed": 5, "epoch": 2}
    in_process, in_workers = make_loader(train, **kwargs), make_loader(train, num_workers=2, **kwargs)
    assert same_batches(batches(in_process), batches(in_workers))


def test_distributed_shards_are_disjoint_and_cover_the_split(digits):
    def shard(rank, epoch=0):
        loader = make_loader(
            digits.val, batch_size=1000, shuffle=True, seed=0, epoch=epoch, rank=rank, world_size=2
        )
        return loader.sampler, torch.cat([y for _, y in loader])

    (s0, _), (s1, _) = shard(0), shard(1)
    i0, i1 = list(s0), list(s1)
    assert not set(i0) & set(i1) and set(i0) | set(i1) == set(range(len(digits.val)))
    assert list(shard(0)[0]) == i0 and list(shard(0, epoch=1)[0]) != i0


# ---------------------------------------------------------------------------------------------
# real MNIST and CIFAR-10


def test_mnist_real_data(mnist_root):
    splits = create_splits("mnist", root=str(mnist_root), download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert splits.val.images is splits.train.images  # val is held out from the training set
    assert not set(splits.val.indices.tolist()) & set(splits.train.indices.tolist())
    assert splits.train.labels.unique().tolist() == splits.test.labels.unique().tolist() == list(range(10))
    x, y = splits.test[0]
    assert x.shape == (1, 28, 28) and y == 7  # the first MNIST test digit is a 7
    pixels = torch.stack([splits.train_plain[i][0] for i in range(2000)])
    assert abs(pixels.mean().item()) < 0.05 and abs(pixels.std().item() - 1) < 0.05
    padded = create_splits("mnist", root=str(mnist_root), download=False, input_size=32)
    assert padded.train[0][0].shape == (1, 32, 32)


def test_cifar10_imagefolder_real_data(cifar_first_load, cifar_root):
    splits, _ = cifar_first_load
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45000, 5000, 10000)
    assert splits.train.images.shape == (50000, 3, 32, 32) and splits.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(splits.train.labels).tolist() == [5000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert (splits.num_classes, splits.in_channels, splits.input_size) == (10, 3, 32)
    # class order is alphabetical = CIFAR-10's: the 4th test folder (cat) holds label 3
    with Image.open(cifar_root / "test" / "cat" / "0000.jpg") as image:
        cat = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert CIFAR10_CLASSES[3] == "cat" and splits.test.labels[3000] == 3
    assert torch.equal(splits.test.images[3000], cat)
    x, _ = splits.train[0]
    assert x.shape == (3, 32, 32) and not torch.equal(x, splits.train_plain[0][0])


def test_cifar10_cache_is_reused(cifar_first_load, cifar_root, cifar_cache):
    first, first_seconds = cifar_first_load
    assert len(list(cifar_cache.glob("cifar10-*.pt"))) == 2
    start = time.perf_counter()
    second = create_splits("cifar10", root=str(cifar_root), format="imagefolder", cache_dir=str(cifar_cache))
    assert time.perf_counter() - start < first_seconds / 2
    assert torch.equal(second.train.images, first.train.images)
    assert torch.equal(second.test.images, first.test.images)
    assert torch.equal(second.test.labels, first.test.labels)
    assert torch.equal(second.val.indices, first.val.indices)


def test_imagenet_folder_splits(fake_imagenet):
    splits = create_splits("imagenet", root=str(fake_imagenet), val_size=2)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (10, 2, 4, 2)
    assert not {p for p, _ in splits.val.samples} & {p for p, _ in splits.train.samples}
    x, y = splits.train[0]
    assert x.shape == (3, 224, 224) and y in (0, 1)
    assert torch.equal(splits.test[0][0], splits.test[0][0])  # eval transform is deterministic


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(NapkitError, match="unknown dataset 'svhn'; valid choices: cifar10, digits, imagenet"):
        create_splits("svhn")
    assert list_datasets() == ["cifar10", "digits", "imagenet", "mnist"]


def test_unknown_option_lists_valid_options():
    with pytest.raises(NapkitError, match="'digits' got unknown option.*root.*valid options: input_size"):
        create_splits("digits", root="data")


def test_missing_mnist_says_where_it_looked(tmp_path):
    with pytest.raises(NapkitError, match=f"MNIST not found in {re.escape(str(tmp_path / 'MNIST' / 'raw'))}"):
        create_splits("mnist", root=str(tmp_path), download=False)


def test_missing_or_malformed_cifar_folder_names_path_and_layout(tmp_path):
    cifar_root = FIXTURES / "cifar10"
    missing = re.escape(str(tmp_path / "train"))
    with pytest.raises(NapkitError, match=f"{missing} not found; expected layout .*/train/<class>/"):
        create_splits("cifar10", root=str(tmp_path), format="imagefolder", cache_dir=str(tmp_path / "cache"))
    kitten = tmp_path / "bad" / "train" / "kitten"
    kitten.mkdir(parents=True)
    shutil.copy(cifar_root / "test" / "cat" / "0000.jpg", kitten)
    with pytest.raises(NapkitError, match="has class folders \\['kitten'\\]; expected layout"):
        create_splits("cifar10", root=str(kitten.parents[1]), format="imagefolder", cache_dir=str(tmp_path))
    with pytest.raises(NapkitError, match="unknown cifar10 format 'zip'; valid choices: imagefolder, torchv"):
        create_splits("cifar10", root=str(tmp_path), format="zip")
    with pytest.raises(NapkitError, match="CIFAR-10 not found in .*cifar-10-batches-py"):
        create_splits("cifar10", root=str(tmp_path), download=False)


def test_missing_imagenet_names_path_and_layout(tmp_path):
    missing = re.escape(str(tmp_path / "train"))
    with pytest.raises(NapkitError, match=f"folder {missing} not found; expected layout .*/val/<class>"):
        create_splits("imagenet", root=str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be in \\[0, 1\\)"),
        ({"test_fraction": 0.0}, "test_fraction must be in \\(0, 1\\)"),
        ({"subset_train": 0}, "subset_train must be a positive"),
    ],
)
def test_bad_split_options(kwargs, message):
    with pytest.raises(NapkitError, match=message):
        create_splits("digits", **kwargs)


# ---------------------------------------------------------------------------------------------
# configs


def compose(name: str, **overrides) -> dict:
    """conf/data/<name>.yaml resolved against conf/config.yaml's paths, loader keys popped."""
    root = OmegaConf.load(REPO / "conf" / "config.yaml")
    data_cfg = OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")
    cfg = OmegaConf.merge({"paths": root.paths}, {"data": data_cfg})
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data.pop("batch_size"), int) and isinstance(data.pop("eval_batch_size"), int)
    return data | overrides


def test_every_dataset_has_a_config():
    assert sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")) == list_datasets()


def test_data_configs_compose(cifar_cache, fake_imagenet):
    mnist_root, cifar_root = FIXTURES / "mnist", FIXTURES / "cifar10"
    assert compose("mnist")["root"] == "data/mnist" and compose("cifar10")["cache_dir"] == ".cache/napkit"
    built = [
        create_splits(**compose("digits")),
        create_splits(**compose("mnist", root=str(mnist_root), subset_test=10)),
        create_splits(
            **compose(
                "cifar10",
                root=str(cifar_root),
                format="imagefolder",
                cache_dir=str(cifar_cache),
                subset_train=10,
            )
        ),
        create_splits(**compose("imagenet", root=str(fake_imagenet), val_size=2)),
    ]
    assert [s.name for s in built] == ["digits", "mnist", "cifar10", "imagenet"]


# ---------------------------------------------------------------------------------------------
# the small real-data fixtures: loading code covered on any clone, corrupt files named


def test_mnist_fixture_loads_real_records():
    splits = create_splits("mnist", root=str(FIXTURES / "mnist"), download=False, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    x, y = splits.test[0]
    assert x.shape == (1, 28, 28) and y == 7  # the first MNIST test digit is a 7
    assert splits.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first training labels


def test_cifar_fixture_loads_real_jpegs(tmp_path):
    splits = create_splits("cifar10", root=str(FIXTURES / "cifar10"), format="imagefolder",
                           cache_dir=str(tmp_path))
    assert splits.train.images.shape == (20, 3, 32, 32)
    assert splits.test.labels.tolist() == sorted([*range(10)] * 2)
    with Image.open(FIXTURES / "cifar10" / "test" / "cat" / "0000.jpg") as image:
        cat = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(splits.test.images[6], cat)


def _mnist_copy(tmp_path: Path) -> Path:
    root = tmp_path / "mnist"
    shutil.copytree(FIXTURES / "mnist", root)
    return root


@pytest.mark.parametrize("damage,what", [
    (lambda b: b"\x00\x00\x08\x04" + b[4:], r"idx magic 2052, expected 2051"),
    (lambda b: b[: len(b) - 100], r"\d+ bytes, its header announces 40 records"),
], ids=["wrong_magic", "truncated"])
def test_corrupt_mnist_file_is_named_with_what_to_do(tmp_path, damage, what):
    root = _mnist_copy(tmp_path)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    expected = f"corrupt MNIST file {re.escape(str(path))} \\({what}.*re-download"
    with pytest.raises(NapkitError, match=expected):
        create_splits("mnist", root=str(root), download=False)


def _cifar_copy(tmp_path: Path) -> Path:
    root = tmp_path / "cifar"
    shutil.copytree(FIXTURES / "cifar10", root)
    return root


def test_truncated_jpeg_in_the_image_folder_is_named(tmp_path):
    root = _cifar_copy(tmp_path)
    path = root / "train" / "dog" / "0001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(NapkitError) as err:
        create_splits("cifar10", root=str(root), format="imagefolder", cache_dir=str(tmp_path / "cache"))
    message = str(err.value)
    assert message.startswith(f"cannot decode image {path} (") and "\n" not in message
    assert "delete it, or re-extract the dataset archive" in message


def test_truncated_image_read_per_item_is_named(tmp_path):
    """ImageNet-style folders decode per item, mid-epoch: the error names the file, not just PIL's reason."""
    path = tmp_path / "broken.jpg"
    path.write_bytes((FIXTURES / "cifar10" / "test" / "cat" / "0000.jpg").read_bytes()[:300])
    dataset = ImageFileDataset([(str(path), 0)], transform=lambda image: torch.zeros(1))
    with pytest.raises(NapkitError, match=f"cannot decode image {re.escape(str(path))} .*delete it"):
        dataset[0]


def test_decoded_cache_is_not_served_stale_after_an_image_is_replaced(tmp_path):
    """The decode cache is keyed by the folder's files (names, sizes, mtimes), not its path alone."""
    root, cache = _cifar_copy(tmp_path), tmp_path / "cache"

    def load():
        return create_splits("cifar10", root=str(root), format="imagefolder", cache_dir=str(cache)).test

    before = load()
    shutil.copy(FIXTURES / "cifar10" / "test" / "dog" / "0000.jpg", root / "test" / "cat" / "0000.jpg")
    after = load()
    assert not torch.equal(after.images[6], before.images[6])  # cat/0000 now holds the dog
    assert torch.equal(after.images[6], after.images[10])
    assert len(list(cache.glob("cifar10-test-*.pt"))) == 2


def test_dataset_fingerprint_follows_the_data():
    a, b = create_splits("digits", seed=0), create_splits("digits", seed=0, subset_train=500)
    assert dataset_fingerprint(a.train) == dataset_fingerprint(create_splits("digits", seed=0).train)
    assert dataset_fingerprint(a.train) != dataset_fingerprint(b.train)
    padded = create_splits("digits", seed=0, input_size=32)
    assert dataset_fingerprint(a.train) != dataset_fingerprint(padded.train)
