"""Data loading and site partitions (on local data: the hub path's conversion code included)."""

import gzip

import numpy as np
import pytest

from fedmoe.data import fashion_mnist as data


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28))
    write_idx(tmp_path / "x.gz", images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), images)


def test_load_debian_layout(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n))
    train, test = data.load_debian(tmp_path)
    assert len(train) == 12 and len(test) == 4 and train.images.shape == (12, 28, 28)


def test_hub_records_convert_like_the_hub_split():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(data.CLASS_NAMES))})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2, 3, 4, 5]}, features=features
    )
    converted = data.imageset_from_hf(ds)
    np.testing.assert_array_equal(converted.images, pixels)
    np.testing.assert_array_equal(converted.labels, np.arange(6))


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="data-source"):
        data.load_fashion_mnist("ftp")


def labels_fixture():
    return np.random.default_rng(3).integers(0, 10, size=3000).astype(np.int64)


def test_domain_partitions_hold_one_domain_each_and_cover_all_domains():
    labels = labels_fixture()
    seen = set()
    for p in range(6):
        rows = data.partition_rows(labels, data._DOMAIN_OF_CLASS[labels], p, 6, "domain", 0.5, 1, 0)
        domains = {int(data._DOMAIN_OF_CLASS[c]) for c in labels[rows]}
        assert len(domains) == 1
        seen |= domains
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet", "domain"])
def test_partitions_are_disjoint(partitioning):
    labels = labels_fixture()
    parts = [data.partition_rows(labels, data._DOMAIN_OF_CLASS[labels], p, 4, partitioning, 0.5, 2, 0) for p in range(4)]
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist()))


def test_site_has_disjoint_train_and_test():
    if not (data.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    site = data.load_site(1, 3, "domain", max_examples=500)
    assert len(site.train) + len(site.test) == 500
    assert len(site.test) == 100
    images, labels = site.train.tensors()
    assert images.shape == (400, 1, 28, 28) and labels.dtype.is_floating_point is False


def test_partition_rows_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path))
    labels = labels_fixture()
    first = data.partition_rows(labels, data._DOMAIN_OF_CLASS[labels], 1, 3, "dirichlet", 0.3, 1, 5)
    assert len(list((tmp_path / "partitions").glob("*.npy"))) == 1

    def fail(*args):
        raise AssertionError("partitioner ran again despite the cache")

    monkeypatch.setattr(data, "_fitted_partitioner", fail)
    assert np.array_equal(data.partition_rows(labels, data._DOMAIN_OF_CLASS[labels], 1, 3, "dirichlet", 0.3, 1, 5), first)
    with pytest.raises(AssertionError, match="ran again"):
        data.partition_rows(labels, data._DOMAIN_OF_CLASS[labels], 1, 3, "dirichlet", 0.3, 1, 6)  # another seed is another partition
