"""Fashion-MNIST and its site partitions.

Sources: the Debian package ``dataset-fashion-mnist`` (idx files, works offline) or the Hugging
Face hub through ``datasets`` (``zalando-datasets/fashion_mnist``). Partitions come from
flwr-datasets partitioners run on a small index table (label, coarse domain, row index), so the
pixel arrays are never copied into an Arrow table.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..results import atomic_replace

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_DATASET = "zalando-datasets/fashion_mnist"
SOURCES = ("auto", "debian", "hub")
PARTITIONINGS = ("iid", "dirichlet", "domain", "column")
CACHE_DIR_ENV = "FEDMOE_CACHE_DIR"  # default ~/.cache/fedmoe

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Coarse domains for the multi-domain split: sites holding different domains should come to
# rely on different experts.
DOMAINS = {
    "tops": (0, 2, 4, 6),
    "footwear": (5, 7, 9),
    "bottoms-and-bags": (1, 3, 8),
}
_DOMAIN_OF_CLASS = np.empty(10, dtype=np.int64)
for _d, _classes in enumerate(DOMAINS.values()):
    _DOMAIN_OF_CLASS[list(_classes)] = _d

MEAN, STD = 0.2860, 0.3530


class DataUnavailable(RuntimeError):
    """Neither the local copy nor the hub could provide the data set."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images [N, 1, 28, 28] and long labels [N]."""
        x = torch.tensor(self.images, dtype=torch.float32).div_(255.0).sub_(MEAN).div_(STD)
        return x.unsqueeze(1), torch.from_numpy(self.labels).long()


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic (0, 0, dtype, ndim), big-endian dims, raw data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def load_debian(directory: Path = DEBIAN_DIR) -> tuple[ImageSet, ImageSet]:
    def split(prefix: str) -> ImageSet:
        images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return ImageSet(images, labels)

    return split("train"), split("t10k")


def imageset_from_hf(dataset) -> ImageSet:
    """A Hugging Face split with columns image (PIL or array) and label -> ImageSet."""
    images = np.stack([np.asarray(img, dtype=np.uint8) for img in dataset["image"]])
    return ImageSet(images, np.asarray(dataset["label"], dtype=np.int64))


def load_hub(name: str = HUB_DATASET) -> tuple[ImageSet, ImageSet]:
    from datasets import load_dataset

    dsd = load_dataset(name)
    return imageset_from_hf(dsd["train"]), imageset_from_hf(dsd["test"])


@lru_cache(maxsize=2)
def load_fashion_mnist(source: str = "auto") -> tuple[ImageSet, ImageSet]:
    """(train 60k, test 10k) from the Debian package, the hub, or whichever works (auto)."""
    if source not in SOURCES:
        raise ValueError(f"data-source must be one of {SOURCES}, got {source!r}")
    errors = []
    if source in ("auto", "debian"):
        if (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
            return load_debian()
        errors.append(f"{DEBIAN_DIR} has no Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    if source in ("auto", "hub"):
        try:
            return load_hub()
        except Exception as exc:  # any hub/network failure: report, do not hide
            errors.append(f"hub dataset {HUB_DATASET!r} could not be loaded: {exc}")
    raise DataUnavailable("Fashion-MNIST is not available: " + "; ".join(errors))


def make_partitioner(partitioning: str, num_partitions: int, alpha: float, domains_per_site: int, seed: int):
    """The flwr-datasets partitioner of ``partitioning`` over an index table with columns label,
    domain (a group of each row: its coarse domain, or its site for partitioning=column) and row."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, PathologicalPartitioner,
    )

    if partitioning == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioning == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=10, self_balancing=True, seed=seed,
        )
    if partitioning == "domain":
        # first-deterministic: site i always holds domain i % 3, so no domain is silently lost.
        return PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="domain",
            num_classes_per_partition=domains_per_site,
            class_assignment_mode="first-deterministic", seed=seed,
        )
    if partitioning == "column":  # the data names each row's site: site i holds the i-th value
        return NaturalIdPartitioner(partition_by="domain")
    raise ValueError(f"partitioning must be one of {PARTITIONINGS}, got {partitioning!r}")


@lru_cache(maxsize=4)
def _fitted_partitioner(
    labels_key: bytes, groups_key: bytes, partitioning: str, num_partitions: int, alpha: float,
    domains_per_site: int, seed: int,
):
    from datasets import Dataset

    labels = np.frombuffer(labels_key, dtype=np.int64)
    groups = np.frombuffer(groups_key, dtype=np.int64)
    table = Dataset.from_dict({"label": labels, "domain": groups, "row": np.arange(len(labels))})
    partitioner = make_partitioner(partitioning, num_partitions, alpha, domains_per_site, seed)
    partitioner.dataset = table
    return partitioner


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fedmoe")


def partition_rows(
    labels: np.ndarray, groups: np.ndarray, partition_id: int, num_partitions: int, partitioning: str,
    alpha: float, domains_per_site: int, seed: int,
) -> np.ndarray:
    """Row indices of ``labels`` that the partitioner assigns to ``partition_id`` (``groups``: each
    row's domain, or its site for partitioning=column).

    Kept on disk under ``cache_dir()/partitions``: in a deployment every ClientApp task is a new
    process, and re-running the partitioner there (seconds) dominated a round."""
    from importlib.metadata import version

    labels, groups = labels.astype(np.int64), groups.astype(np.int64)
    recipe = repr((partitioning, num_partitions, alpha, domains_per_site, seed, version("flwr-datasets")))
    key = hashlib.sha256(labels.tobytes() + groups.tobytes() + recipe.encode()).hexdigest()[:32]
    path = cache_dir() / "partitions" / f"{key}-{partition_id}.npy"
    with contextlib.suppress(OSError, ValueError):
        return np.load(path)
    partitioner = _fitted_partitioner(labels.tobytes(), groups.tobytes(), partitioning, num_partitions, alpha,
                                      domains_per_site, seed)
    rows = np.asarray(partitioner.load_partition(partition_id)["row"], dtype=np.int64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, rows)

    with contextlib.suppress(OSError):  # a read-only cache only costs the recomputation
        atomic_replace(path, write)
    return rows


@dataclass(frozen=True)
class SiteData:
    train: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class SiteRows:
    train: np.ndarray
    test: np.ndarray


def site_rows(
    labels: np.ndarray, groups: np.ndarray, partition_id: int, num_partitions: int, partitioning: str,
    alpha: float, domains_per_site: int, seed: int, test_fraction: float, max_examples: int,
) -> SiteRows:
    """The site's partition (``partition_rows``), shuffled by a seeded generator, cut to at most
    ``max_examples`` (0: all) and split into the site's own train and test rows."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, num-partitions={num_partitions})")
    rows = partition_rows(labels, groups, partition_id, num_partitions, partitioning, alpha, domains_per_site, seed)
    rng = np.random.default_rng(seed + 7919 * partition_id)
    rows = rng.permutation(rows)
    if max_examples:
        rows = rows[:max_examples]
    n_test = int(round(len(rows) * test_fraction))
    return SiteRows(train=rows[n_test:], test=rows[:n_test])


def load_site(
    partition_id: int, num_partitions: int, partitioning: str = "domain", alpha: float = 0.5,
    domains_per_site: int = 1, seed: int = 0, test_fraction: float = 0.2, source: str = "auto",
    max_examples: int = 0,
) -> SiteData:
    """The site's partition of the 60k training images (at most ``max_examples`` of it, 0: all),
    split into its own train and test."""
    if partitioning == "column":
        raise ValueError("partitioning=column needs a site column: Fashion-MNIST has none (task=images)")
    train, _ = load_fashion_mnist(source)
    rows = site_rows(train.labels, _DOMAIN_OF_CLASS[train.labels], partition_id, num_partitions, partitioning, alpha,
                     domains_per_site, seed, test_fraction, max_examples)
    return SiteData(train=train.subset(rows.train), test=train.subset(rows.test))


def load_global_test(source: str = "auto") -> ImageSet:
    """The official 10k test set: the centralised, held-out evaluation."""
    return load_fashion_mnist(source)[1]
