"""Run config: pyproject defaults match RunConfig, bad keys and values fail naming the key."""

import tomllib

import pytest

from fedmoe.config import ConfigError, RunConfig
from tests.conftest import ROOT


def test_pyproject_holds_every_key_with_its_default():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().as_run_config()
    assert RunConfig.from_run_config(app_config) == RunConfig()


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"no-such-key": 1}, "no-such-key"),
        ({"top-k": 9}, "top-k"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"learning-rate": -1.0}, "learning-rate"),
        ({"partitioning": "random"}, "partitioning"),
        ({"batch-size": "big"}, "batch-size"),
        ({"patch-size": 5}, "patch-size"),
        ({"active-min-share": float("nan")}, "active-min-share"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_run_config(overrides)


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_run_config({"learning-rate": 1}).learning_rate == 1.0
