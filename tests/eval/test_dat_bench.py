"""bench.ml1m_dat's precision variants: each model once per train.amp setting, each a valid config."""
import pytest

from bench.ml1m_dat import CONF, with_amp
from ml.config import ConfigError, load_config

BASE = {"two_tower": ["model=two_tower"], "dat": ["model=dat"]}


def test_several_settings_give_one_named_variant_per_model_and_setting():
    v = with_amp(BASE, ["off", "bf16"])
    assert list(v) == ["two_tower off", "two_tower bf16", "dat off", "dat bf16"]
    for name, over in v.items():
        cfg = load_config(CONF, ["warehouse=/tmp/unused", *over])
        assert (cfg.model, cfg.train.amp) == tuple(name.split(" "))


def test_one_setting_keeps_the_names_and_none_keeps_the_configs():
    assert with_amp(BASE, ["off"]) == {"two_tower": ["model=two_tower", "train.amp=off"],
                                      "dat": ["model=dat", "train.amp=off"]}
    assert with_amp(BASE, [None]) == BASE


def test_an_unknown_setting_is_a_config_error_naming_the_key():
    (over,) = with_amp({"dat": ["model=dat"]}, ["fp8"]).values()
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(CONF, ["warehouse=/tmp/unused", *over])


def test_the_bench_trains_with_the_pipeline_configs_of_dat_and_the_two_tower():
    two_tower = load_config(CONF.parent / "ml1m_two_tower.yaml", ["warehouse=/tmp/unused"])
    for model in ("dat", "two_tower"):
        cfg = load_config(CONF, ["warehouse=/tmp/unused", f"model={model}"])
        assert cfg.model == model and cfg.train == two_tower.train
