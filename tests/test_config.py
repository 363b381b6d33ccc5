import pytest
import yaml

from transferlab import config


def test_repo_params_file_is_valid():
    params = config.load(config.Path(__file__).parents[1] / "params.yaml")
    assert params.backbone.name == "efficientnet_lite0"
    assert params.data.checksum.startswith("sha256:")


def test_defaults_fill_missing_sections():
    params = config.from_dict({"head": {"units": 8}})
    assert params.head.units == 8
    assert params.head.dropout == config.HeadConfig().dropout


def test_unknown_key_names_valid_keys():
    with pytest.raises(config.ConfigError, match=r"unknown key\(s\) \['unit'\] in head; valid keys: \[.*'units'"):
        config.from_dict({"head": {"unit": 8}})


def test_unknown_top_level_key():
    with pytest.raises(config.ConfigError, match="the top level"):
        config.from_dict({"lerning_rate": 0.1})


def test_wrong_type_is_an_error():
    with pytest.raises(config.ConfigError, match="head.epochs: expected int"):
        config.from_dict({"head": {"epochs": "ten"}})
    with pytest.raises(config.ConfigError, match="expected int"):
        config.from_dict({"head": {"epochs": True}})


def test_int_is_accepted_for_float():
    assert config.from_dict({"head": {"learning_rate": 1}}).head.learning_rate == 1.0


def test_unknown_backbone_lists_registry():
    with pytest.raises(config.ConfigError, match="registered: .*efficientnet_lite0.*vgg16"):
        config.from_dict({"backbone": {"name": "vgg17"}})


def test_choices_are_checked():
    with pytest.raises(config.ConfigError, match="head.optimizer: must be one of"):
        config.from_dict({"head": {"optimizer": "adagrad"}})


def test_load_names_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"head": {"dropot": 0.1}}))
    with pytest.raises(config.ConfigError, match=str(path)):
        config.load(path)


def test_flatten():
    assert config.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
