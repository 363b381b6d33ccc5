import typing

import pytest
import yaml

import tinyproject
from transferlab import config
from transferlab.config import pipeline

ROOT_PARAMS = tinyproject.ROOT / "params.yaml"


def test_repo_params_file_is_valid():
    params = pipeline.check(config.load(ROOT_PARAMS))
    assert params.backbone.name == "efficientnet_lite0"
    assert params.data.checksum.startswith("sha256:")


def test_params_yaml_is_the_only_place_defaults_live():
    """No dataclass field has a default of its own, so the typed config and the
    shipped params.yaml cannot disagree; and the shipped file gives every key."""
    import dataclasses

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                f"{key} has a default in config.py; params.yaml is the one place defaults live"
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, key + ".")

    walk(config.Params)
    shipped = yaml.safe_load(ROOT_PARAMS.read_text())
    assert config.to_dict(config.from_dict(shipped)) == shipped  # every key, nothing added


def test_a_missing_key_is_an_error_naming_it():
    raw = tinyproject.full_params({})
    del raw["head"]["dropout"]
    with pytest.raises(config.ConfigError, match=r"missing key\(s\) \['dropout'\] in head"):
        config.from_dict(raw)
    del raw["evaluate"]
    with pytest.raises(config.ConfigError, match=r"missing key\(s\) \['evaluate'\] in the top level"):
        config.from_dict(raw)


def test_subset_nests_the_keys_a_stage_reads():
    params = config.from_dict(tinyproject.full_params({"head": {"units": 8}}))
    got = config.subset(params, "seed", "head", "backbone.name")
    assert got == {"seed": params.seed, "head": config.to_dict(params)["head"],
                   "backbone": {"name": params.backbone.name}}


def test_unknown_key_names_valid_keys():
    with pytest.raises(config.ConfigError, match=r"unknown key\(s\) \['unit'\] in head; valid keys: \[.*'units'"):
        config.from_dict(tinyproject.full_params({"head": {"unit": 8}}))


def test_unknown_top_level_key():
    with pytest.raises(config.ConfigError, match="the top level"):
        config.from_dict(tinyproject.full_params({"lerning_rate": 0.1}))


def test_wrong_type_is_an_error():
    with pytest.raises(config.ConfigError, match="head.epochs: expected int"):
        config.from_dict(tinyproject.full_params({"head": {"epochs": "ten"}}))
    with pytest.raises(config.ConfigError, match="expected int"):
        config.from_dict(tinyproject.full_params({"head": {"epochs": True}}))


def test_int_is_accepted_for_float():
    assert config.from_dict(tinyproject.full_params({"head": {"learning_rate": 1}})).head.learning_rate == 1.0


def test_unknown_backbone_lists_registry():
    params = config.from_dict(tinyproject.full_params({"backbone": {"name": "vgg17"}}))  # the data stage's read
    with pytest.raises(config.ConfigError, match="registered: .*efficientnet_lite0.*vgg16"):
        pipeline.check(params)  # what the model stages, run and tune check first


def test_unfreeze_is_checked_against_the_backbones_blocks():
    params = config.from_dict(tinyproject.full_params({"finetune": {"unfreeze": 12}}))
    with pytest.raises(config.ConfigError, match=r"finetune.unfreeze must be 0..9 \(blocks of efficientnet_lite0\)"):
        pipeline.check(params)
    with pytest.raises(config.ConfigError, match="finetune.unfreeze must be a number of blocks or 'all'"):
        config.from_dict(tinyproject.full_params({"finetune": {"unfreeze": -1}}))


def test_choices_are_checked():
    with pytest.raises(config.ConfigError, match="head.optimizer: must be one of"):
        config.from_dict(tinyproject.full_params({"head": {"optimizer": "adagrad"}}))


def test_load_names_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"head": {"dropot": 0.1}}))
    with pytest.raises(config.ConfigError, match=str(path)):
        config.load(path)


def test_flatten():
    assert config.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_set_writes_exponent_floats_that_yaml_1_1_reads_back_as_floats(tmp_path):
    """`--set finetune.weight_decay=1e-5` (and `tune --apply`): PyYAML, which
    config.load and DVC use, reads 1e-05 as a string; the value written must
    stay a float, with the file's comments kept."""
    from transferlab.run import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(ROOT_PARAMS.read_text())
    changes = apply_overrides(path, ["finetune.weight_decay=1e-5", "finetune.learning_rate=3.5e-4"])
    assert changes == {"finetune.weight_decay": 1e-5, "finetune.learning_rate": 3.5e-4}
    loaded = config.load(path)
    assert loaded.finetune.weight_decay == 1e-5 and loaded.finetune.learning_rate == 3.5e-4
    assert "# peak; pretrained weights" in path.read_text()
    assert "  checksum: sha256:" in path.read_text()  # not wrapped onto a line of its own


@pytest.mark.parametrize("erase", [-0.1, 1.5])
def test_erase_is_a_probability(erase):
    with pytest.raises(config.ConfigError, match="finetune.augment.erase is a probability"):
        config.from_dict(tinyproject.full_params({"finetune": {"augment": {"erase": erase}}}))
    config.from_dict(tinyproject.full_params({"finetune": {"augment": {"erase": 1.0}}}))


@pytest.mark.parametrize("ema", [-0.1, 1.0])
def test_ema_is_a_momentum_below_one(ema):
    with pytest.raises(config.ConfigError, match="finetune.ema is a momentum"):
        config.from_dict(tinyproject.full_params({"finetune": {"ema": ema}}))
    config.from_dict(tinyproject.full_params({"finetune": {"ema": 0.99}}))
