"""task=images: an ImageFolder tree and a saved HF dataset become the arrays and site partitions
the run config asks for."""

import numpy as np
import pytest
from PIL import Image

from fedmoe.data import own_images, tasks
from fedmoe.config import ConfigError, RunConfig, launch_config


def write_tree(root, splits=("train", "test"), per_class=6, size=8):
    """root/<split>/<class>/<i>.png with class c's pixels all equal to 10 * c + i."""
    for split in splits:
        for c, name in enumerate(["ant", "bee", "cat"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size), 10 * c + i, dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "cache"))
    own_images.load_own_images.cache_clear()


def test_image_folder_tree_gives_sorted_classes_and_its_test_split(tmp_path):
    write_tree(tmp_path / "tree")
    data = own_images.load_own_images(str(tmp_path / "tree"), size=8, channels=1)
    assert data.num_classes == 3
    assert data.train.images.shape == (18, 1, 8, 8) and data.test.images.shape == (18, 1, 8, 8)
    # class = sorted folder name; every image's single grey value says which class and file it was
    values = data.train.images[:, 0, 0, 0].astype(int)
    assert sorted(zip(values // 10, values % 10)) == [(c, i) for c in range(3) for i in range(6)]
    assert np.array_equal(values // 10, data.train.labels)
    x, y = data.train.tensors()
    assert x.shape == (18, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert float(x[0, 0, 0, 0]) == pytest.approx(values[0] / 127.5 - 1)


def test_without_a_test_split_the_server_holds_out_a_seeded_tenth(tmp_path):
    write_tree(tmp_path / "tree", splits=("train",), per_class=10)
    data = own_images.load_own_images(str(tmp_path / "tree"), size=8, seed=4)
    assert len(data.test.labels) == 3 and len(data.train.labels) == 27
    held = set(data.test.images[:, 0, 0, 0].tolist())
    assert held.isdisjoint(data.train.images[:, 0, 0, 0].tolist())


def test_saved_dataset_with_a_site_column_gives_each_site_its_own_examples(tmp_path):
    from datasets import Dataset

    n = 60
    hospitals = ["west", "north", "south"]
    rows = {"img": [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(n)], "y": [i % 5 for i in range(n)],
            "hospital": [hospitals[i % 3] for i in range(n)]}
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    data = own_images.load_own_images(str(tmp_path / "saved"), image_column="img", label_column="y",
                                      site_column="hospital", size=4, channels=3)
    for site, name in enumerate(sorted(hospitals)):  # site i: the i-th value in sorted order
        train, test = own_images.own_site(data, site, 3, "column", 0.5, 1, 0, 0.25, 0)
        index = np.concatenate([train.images[:, 0, 0, 0], test.images[:, 0, 0, 0]]).astype(int)
        assert all(hospitals[i % 3] == name for i in index)
        assert len(test.labels) == round(0.25 * len(index))
        assert np.array_equal(train.labels, train.images[:, 0, 0, 0] % 5)
    everyone = sum(len(own_images.own_site(data, s, 3, "column", 0.5, 1, 0, 0.25, 0)[0].labels) for s in range(3))
    assert everyone + sum(len(own_images.own_site(data, s, 3, "column", 0.5, 1, 0, 0.25, 0)[1].labels)
                          for s in range(3)) == len(data.train.labels)
    with pytest.raises(ValueError, match="'site-column': 3 distinct values, but the run has 4 sites"):
        own_images.own_site(data, 0, 4, "column", 0.5, 1, 0, 0.25, 0)


def test_arrays_come_from_the_disk_cache_the_second_time(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree", per_class=2)
    first = own_images.load_own_images(str(tmp_path / "tree"), size=8)
    own_images.load_own_images.cache_clear()
    monkeypatch.setattr(own_images, "read_dataset", lambda path: pytest.fail("read the images again"))
    second = own_images.load_own_images(str(tmp_path / "tree"), size=8)
    assert np.array_equal(first.train.images, second.train.images) and second.num_classes == 3


def test_the_images_task_sizes_the_model_to_the_data(tmp_path):
    write_tree(tmp_path / "tree", size=12)
    cfg = RunConfig.from_run_config({"task": "images", "features": "pixels", "data-path": str(tmp_path / "tree"), "image-size": 12,
                                     "patch-size": 4, "partitioning": "iid", "d-model": 8, "expert-hidden": 8})
    model = tasks.build_model(cfg)
    train_x, train_y, test_x, test_y = tasks.site_data(cfg, 0, 2)
    logits, aux = model(train_x)
    assert logits.shape == (len(train_y), 3) and model.config.num_tokens == 9
    assert tasks.global_test(cfg)[0].shape == (18, 1, 12, 12)


@pytest.mark.parametrize("config,key", [
    ({"task": "images"}, "data-path"),
    ({"task": "images", "data-path": "/nonexistent/images"}, "data-path"),
    ({"partitioning": "column"}, "partitioning"),
    ({"image-size": 32}, "image-size"),
    ({"task": "images", "features": "pixels", "data-path": "/tmp", "image-size": 30}, "patch-size"),
    ({"image-channels": 2}, "image-channels"),
    ({"task": "no_such_module:Task"}, "task"),
    ({"task": "not a task"}, "task"),
])
def test_bad_data_config_names_the_key(config, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        launch_config(config)
