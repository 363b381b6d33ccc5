"""The command line: every command takes --params and --set alike."""

import yaml

import tinyproject
from transferlab import cli, stages
from transferlab.cli import STAGE_HELP

COMMANDS = [*STAGE_HELP, "run", "tune", "predict", "export", "compare", "ui"]


def test_every_command_takes_params_and_set():
    for command in COMMANDS:
        extra = ["photo.jpg"] if command == "predict" else []
        args = cli._parser().parse_args([command, "--params", "p.yaml", "--set", "seed=3", *extra])
        assert (args.params, args.set) == ("p.yaml", ["seed=3"]), command


def test_a_stage_command_writes_its_overrides_into_its_params_file_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tinyproject.full_params(tinyproject.TINY), sort_keys=False))
    ran = []
    monkeypatch.setattr(stages, "run", lambda main, path: ran.append((main.__module__, path)) or 0)
    assert cli.main(["prepare", "--params", "p.yaml", "--set", "data.image_size=24"]) == 0
    assert ran == [("transferlab.stages.prepare", "p.yaml")]
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["data"]["image_size"] == 24


def test_run_refuses_a_params_file_its_stages_would_not_read(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(tinyproject.full_params(tinyproject.TINY)))
    assert cli.main(["run", "--params", "other.yaml", "--set", "seed=3"]) == 2
    assert "stages read the project's params.yaml" in caplog.text
    assert yaml.safe_load((tmp_path / "other.yaml").read_text())["seed"] == 1  # nothing written
