"""Your own images as a workload (task=images): an ImageFolder tree or a saved Hugging Face
dataset, split over the sites by a flwr-datasets partitioner (fedmoe.data.fashion_mnist.partition_rows).

``data-path`` is either
  an ImageFolder tree   root/<class>/<image file>, or root/train/<class>/... and root/test/<class>/...
                        (read by the ``datasets`` imagefolder builder; the class is the folder name)
  a saved HF dataset    what ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote, read by
                        ``datasets.load_from_disk``: columns ``image-column`` (PIL images or arrays)
                        and ``label-column`` (integers), and ``site-column`` for partitioning=column
The ``test`` split is the server's held-out set; without one the server holds out a seeded
GLOBAL_TEST_FRACTION of the examples and the sites split the rest. Images are converted to
``image-channels`` (1: grayscale, 3: RGB), resized to ``image-size`` squared and scaled to
[-1, 1] by fixed constants (no statistic of anyone's data is needed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .fashion_mnist import cache_dir, site_rows

GLOBAL_TEST_FRACTION = 0.1


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    sites: np.ndarray | None  # int64 [N]: index of the example's site-column value (sorted), if asked for

    def subset(self, rows: np.ndarray) -> "ImageArrays":
        return ImageArrays(self.images[rows], self.labels[rows], None if self.sites is None else self.sites[rows])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images scaled to [-1, 1], float [N, C, H, W], and long labels [N]."""
        x = torch.from_numpy(self.images).float().div_(127.5).sub_(1.0)
        return x, torch.from_numpy(self.labels).long()


@dataclass(frozen=True)
class OwnImages:
    train: ImageArrays  # what the sites split
    test: ImageArrays  # the server's held-out set
    num_classes: int


def is_saved_dataset(path: Path) -> bool:
    """True for a save_to_disk folder (a Dataset or a DatasetDict), False for anything else."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_dataset(path: Path):
    """A DatasetDict from either layout (a lone saved Dataset becomes its train split)."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if is_saved_dataset(path):
        loaded = load_from_disk(str(path))
        return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded
    return load_dataset("imagefolder", data_dir=str(path), cache_dir=str(cache_dir() / "hf-datasets"))


def to_arrays(split, image_column: str, label_column: str, site_column: str, size: int, channels: int,
              site_values: list) -> ImageArrays:
    from PIL import Image

    for column in (image_column, label_column, site_column):
        if column and column not in split.column_names:
            raise ValueError(f"data-path: no column {column!r} (columns: {', '.join(split.column_names)})")
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(split), channels, size, size), dtype=np.uint8)
    for i, image in enumerate(split[image_column]):
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        pixels = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.uint8)
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    labels = np.asarray(split[label_column], dtype=np.int64)
    sites = None
    if site_column:
        index = {value: i for i, value in enumerate(site_values)}
        sites = np.asarray([index[value] for value in split[site_column]], dtype=np.int64)
    return ImageArrays(images, labels, sites)


@lru_cache(maxsize=2)
def load_own_images(data_path: str, image_column: str = "image", label_column: str = "label",
                    site_column: str = "", size: int = 28, channels: int = 1, seed: int = 0) -> OwnImages:
    """The data set at ``data_path`` as arrays, cached per process and on disk (cache_dir()/images,
    keyed by the folder's path, its files' sizes and times, and these arguments)."""
    path = Path(data_path)
    if not path.is_dir():
        raise FileNotFoundError(f"run config 'data-path': no such folder, got {data_path!r}")
    key = hashlib.sha256(repr((str(path.resolve()), _folder_stamp(path), image_column, label_column, site_column,
                               size, channels, seed)).encode()).hexdigest()[:32]
    cached = cache_dir() / "images" / f"{key}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            sites = lambda name: z[name] if name in z else None  # noqa: E731
            return OwnImages(ImageArrays(z["train_x"], z["train_y"], sites("train_s")),
                             ImageArrays(z["test_x"], z["test_y"], sites("test_s")), int(z["num_classes"]))
    loaded = _convert(read_dataset(path), image_column, label_column, site_column, size, channels, seed)
    _save(cached, loaded)
    return loaded


def _convert(dataset, image_column, label_column, site_column, size, channels, seed) -> OwnImages:
    site_values = sorted(set().union(*(split.unique(site_column) for split in dataset.values()))) if site_column else []
    arrays = {name: to_arrays(split, image_column, label_column, site_column, size, channels, site_values)
              for name, split in dataset.items()}
    train = arrays.get("train")
    if train is None:
        raise ValueError(f"data-path: no train split (splits: {', '.join(arrays)})")
    test = arrays.get("test")
    if test is None:  # a seeded hold-out for the server
        order = np.random.default_rng(seed).permutation(len(train.labels))
        n_test = max(1, int(round(len(order) * GLOBAL_TEST_FRACTION)))
        train, test = train.subset(np.sort(order[n_test:])), train.subset(np.sort(order[:n_test]))
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return OwnImages(train, test, num_classes)


def _folder_stamp(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())


def _save(path: Path, data: OwnImages) -> None:
    from ..results import atomic_replace

    arrays = {"train_x": data.train.images, "train_y": data.train.labels, "test_x": data.test.images,
              "test_y": data.test.labels, "num_classes": np.int64(data.num_classes)}
    if data.train.sites is not None:
        arrays |= {"train_s": data.train.sites, "test_s": data.test.sites}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        atomic_replace(path, write)
    except OSError:  # a read-only cache only costs the conversion next time
        pass


def own_site(data: OwnImages, partition_id: int, num_partitions: int, partitioning: str, alpha: float,
             labels_per_site: int, seed: int, test_fraction: float, max_examples: int) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) of one site: its partition of the train split, cut into its own two parts.

    partitioning: iid, dirichlet (over labels), domain (each site holds ``labels_per_site`` whole
    classes, site i starting at class i), column (site i holds the examples whose site-column has
    the i-th value in sorted order; there must be exactly one site per value)."""
    if partitioning == "column":
        if data.train.sites is None:
            raise ValueError("run config 'partitioning': column needs site-column")
        found = int(data.train.sites.max()) + 1
        if found != num_partitions:
            raise ValueError(f"run config 'site-column': {found} distinct values, but the run has {num_partitions} sites")
    groups = data.train.sites if partitioning == "column" else data.train.labels
    rows = site_rows(data.train.labels, groups, partition_id, num_partitions, partitioning, alpha, labels_per_site,
                     seed, test_fraction, max_examples)
    return data.train.subset(rows.train), data.train.subset(rows.test)
