"""The scattering front end (fedmoe.data.scattering) and the run config's input geometry."""

import numpy as np
import pytest
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

from fedmoe.config import ConfigError, RunConfig
from fedmoe.data import scattering
from fedmoe.models.moe import MoEClassifier


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def reference_features(batch: torch.Tensor) -> np.ndarray:
    """kymatio's transform of each image on its own, normalised per group of 3 coefficients with
    numpy, placed top-left in an 8 x 8 grid of zeros."""
    transform = ScatteringTorch2D(J=2, shape=(28, 28), L=8)
    out = np.zeros((len(batch), 81, 8, 8), dtype=np.float64)
    for i, image in enumerate(batch):
        coefficients = transform(image[None]).reshape(81, 7, 7).double().numpy()
        groups = coefficients.reshape(27, 3 * 49)
        normalised = (groups - groups.mean(axis=1, keepdims=True)) / np.sqrt(groups.var(axis=1, keepdims=True) + 1e-5)
        out[i, :, :7, :7] = normalised.reshape(81, 7, 7)
    return out


def test_features_are_the_normalised_scattering_coefficients_of_each_image_alone(monkeypatch):
    monkeypatch.setattr(scattering, "BATCH_PIXELS", 3 * 28 * 28)  # batches of 3: a boundary inside the 5 images
    batch = images(5)
    features = scattering.scattering_features(batch)
    assert features.shape == (5, 81, 8, 8)
    np.testing.assert_allclose(features.double().numpy(), reference_features(batch), atol=1e-4)


def test_features_depend_on_the_image_only_not_on_its_batch():
    batch = images(4)
    together = scattering.scattering_features(batch)
    for i in range(4):
        torch.testing.assert_close(scattering.scattering_features(batch[i : i + 1])[0], together[i])


def test_cache_serves_the_same_images_and_recomputes_for_others(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path))
    first = scattering.cached_scattering_features(images(3))
    assert len(list((tmp_path / "features").iterdir())) == 1

    def recompute(_):
        raise AssertionError("recomputed images the cache holds")

    with monkeypatch.context() as m:
        m.setattr(scattering, "scattering_features", recompute)
        torch.testing.assert_close(scattering.cached_scattering_features(images(3)), first)
    other = scattering.cached_scattering_features(images(3, seed=1))
    assert not torch.equal(other, first) and len(list((tmp_path / "features").iterdir())) == 2


def test_input_grid_of_pixels_and_of_scattering_features():
    assert RunConfig(features="pixels").input_grid() == (28, 1, 7)
    assert RunConfig(features="scattering").input_grid() == (8, 81, 2)
    assert RunConfig(features="pixels", patch_size=4).input_grid() == (28, 1, 4)
    assert RunConfig(task="images", data_path="x", features="scattering", image_size=32, image_channels=3).input_grid() == (8, 243, 2)
    model = MoEClassifier(RunConfig().model_config())
    assert model.config.num_tokens == 16
    logits, _ = model(scattering.scattering_features(images(2)))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"features": "scattering", "patch-size": 3}, "patch-size"),
    ({"features": "pixels", "patch-size": 5}, "patch-size"),
    ({"features": "scattering", "attack": "backdoor"}, "features"),
    ({"features": "wavelets"}, "features"),
])
def test_bad_input_geometry_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_run_config(overrides)
