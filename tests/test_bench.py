"""The bench harness: one entry point (`python -m bench <name>`), one output
convention (a run folder docs/bench/<date>-<name>/ written through
bench/common.py), and each script runs and writes its figures (tiny data,
weights none: the figures themselves come from real runs)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

import synth

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_throughput_quick_compares_ours_with_model_predict(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--quick", "--images", "128",
                    "--input-size", "32", "--out", str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["figures"]["ratio_ours_to_predict"] > 0
    variants = [r["variant"] for r in result["rows"]]
    assert any(v.startswith("ours") for v in variants) and any(v.startswith("plain model.predict") for v in variants)
    assert any(v.startswith("fine-tune step") for v in variants)  # the training step builds and runs
    assert "ours / plain model.predict" in (tmp_path / "README.md").read_text()


@pytest.mark.heavy
def test_recipes_bench_runs_both_recipes_and_writes_the_table(tmp_path):
    synth.make_image_folder(tmp_path / "imgs", per_class=12, test_per_class=4)
    work, out = tmp_path / "work", tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "bench/recipes.py"), "--data", str(tmp_path / "imgs"),
                    "--weights", "none", "--workdir", str(work), "--out", str(out),
                    "--set", "head.epochs=2", "--set", "finetune.epochs=1", "--set", "finetune.min_steps=0", "--set", "backbone.input_size=32",
                    "--set", "finetune.unfreeze=1", "--seeds-head-epochs", "2", "--seeds-finetune-epochs", "1"],
                   check=True, capture_output=True)
    table = (out / "README.md").read_text()
    assert "| seeds |" in table and "| ours |" in table
    run = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in run["results"]] == ["seeds", "ours"]
    assert run["figures"]["seeds_test_accuracy"] == run["results"][0]["after_finetune"]
    with (out / "time_to_accuracy.csv").open() as fh:
        points = list(csv.DictReader(fh))
    seeds = [p for p in points if p["recipe"] == "seeds"]
    assert [(p["phase"], p["epoch"]) for p in seeds] == [("head", "1"), ("head", "2"), ("finetune", "1")]
    assert [float(p["seconds"]) for p in seeds] == sorted(float(p["seconds"]) for p in seeds)
    ours = [p for p in points if p["recipe"] == "ours" and p["phase"] == "finetune"]
    final = [p for p in points if p["recipe"] == "ours" and p["phase"] == "final"]
    evaluated = json.loads((work / "metrics/evaluate.json").read_text())
    assert float(final[0]["test_accuracy"]) == evaluated["test_accuracy"]
    # the fine-tune's one epoch, probed after the fit on that epoch's copied weights: the model evaluate then
    # scores, so the probe gives evaluate's single-view accuracy on the same test images, at a time before the end
    # (on these images the model is near chance: test_a_deferred_probe_... checks the weights it tests)
    n_test = json.loads((work / "metrics/prepare.json").read_text())["test_images"]
    assert [p["epoch"] for p in ours] == ["1"]
    assert float(ours[0]["test_accuracy"]) == evaluated["test_accuracy_single_view"]
    assert round(float(ours[0]["test_accuracy"]) * n_test, 3) == round(float(ours[0]["test_accuracy"]) * n_test)
    assert float(ours[0]["seconds"]) <= float(final[0]["seconds"])
    assert (out / "time_to_accuracy.png").stat().st_size > 5000


def test_study_table_lists_every_trial_with_its_epochs(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.enqueue_trial({"x": 0.5}, user_attrs={"params_yaml": True})
    for _ in range(2):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        for step, value in ((1, 0.25), (2, 0.5)):
            trial.report(value, step)
        study.tell(trial, 0.5)
    subprocess.run([sys.executable, str(ROOT / "bench/study_table.py"), "--storage", storage, "--study", "s",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    table = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["trial"] for r in table] == ["0", "1"] and table[0]["params_yaml"] == "True"
    assert table[1]["per_epoch"] == "0.2500 0.5000" and table[0]["x"] == "0.5"
    assert json.loads((tmp_path / "results.json").read_text())["figures"] == {"trials": 2, "best_value": 0.5}


def test_a_deferred_probe_tests_each_epochs_weights_after_the_fit():
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    import common
    import recipes

    x, y = np.eye(2, dtype="float32"), np.array([0, 1])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)])
    points = []
    probe = recipes.probe(common.Clock(), points, "finetune", x, y, deferred=True)
    probe.set_model(model)
    model.set_weights([np.eye(2, dtype="float32")])  # epoch 1's weights: both images right
    probe.on_epoch_end(0, {"val_accuracy": 0.5})
    model.set_weights([np.eye(2, dtype="float32")[::-1]])  # epoch 2's: both wrong
    probe.on_epoch_end(1, {"val_accuracy": 0.25})
    assert points == []  # nothing tested while the fit runs
    model.set_weights([np.zeros((2, 2), "float32")])  # whatever the fit leaves
    probe.finish()
    assert [(p["epoch"], p["test_accuracy"], p["val_accuracy"]) for p in points] == [(1, 1.0, 0.5), (2, 0.0, 0.25)]
    assert points[0]["seconds"] <= points[1]["seconds"]
    np.testing.assert_array_equal(model.get_weights()[0], np.eye(2)[::-1])  # left with the last epoch's weights


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not shutil.which("taskset"), reason="needs two CPUs and taskset")
def test_the_cpu_description_names_the_cores_a_pinned_run_may_use():
    code = "import sys; sys.path.insert(0, sys.argv[1]); from common import cpu_description; print(cpu_description())"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code, str(ROOT / "bench")], check=True,
                            capture_output=True, text=True).stdout
    assert f"{os.cpu_count()} CPU cores, 1 of them usable here (affinity)" in pinned


def test_an_ab_arm_may_change_only_what_the_arms_do_not_share():
    sys.path.insert(0, str(ROOT / "bench"))
    import ab

    assert ab.parse_arm("ema:finetune.ema=0.99,evaluate.tta=none") == ("ema", ["finetune.ema=0.99",
                                                                             "evaluate.tta=none"])
    with pytest.raises(SystemExit, match="changes a stage before the fine-tune"):
        ab.parse_arm("big:backbone.input_size=160")
    with pytest.raises(SystemExit, match="name:key=value"):
        ab.parse_arm("finetune.ema=0.99")


@pytest.mark.heavy
def test_ab_bench_trains_each_arm_on_the_same_head_and_writes_the_table(tmp_path):
    synth.make_image_folder(tmp_path / "imgs", per_class=12, test_per_class=4)
    work, out = tmp_path / "work", tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "bench/ab.py"), "--data", str(tmp_path / "imgs"),
                    "--workdir", str(work), "--out", str(out), "--set", "data.checksum=null",
                    "--set", "backbone.weights=none", "--set", "backbone.input_size=32", "--set", "budget=0",
                    "--set", "head.epochs=2", "--set", "finetune.unfreeze=1", "--set", "finetune.steps=3",
                    "--set", "evaluate.baseline=false",
                    "--arm", "off:finetune.ema=0", "--arm", "ema:finetune.ema=0.9"], check=True, capture_output=True)
    report = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in report["arms"]] == ["off", "ema"]
    assert [r["steps_run"] for r in report["arms"]] == [3, 3]
    assert sorted(report["shared_seconds"]) == ["features", "head", "prepare"]  # once, for both arms
    assert json.loads((work / "arms/ema/metrics/finetune.json").read_text())["steps_run"] == 3
    assert "| ema | finetune.ema=0.9 |" in (out / "README.md").read_text()
    assert report["figures"]["arms"]["ema"]["steps_run"] == 3


def test_a_run_goes_to_a_dated_folder_and_a_second_one_that_day_beside_it(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    first = common.run_folder("auto-20m", "2026-12-04", root=tmp_path)
    assert first == tmp_path / "2026-12-04-auto-20m"
    first.mkdir()
    assert common.run_folder("auto-20m", "2026-12-04", root=tmp_path) == tmp_path / "2026-12-04-auto-20m-2"
    assert common.run_folder("memory", root=tmp_path).name.startswith(f"{date.today().isoformat()}-")


def test_a_run_folder_holds_the_figures_the_command_the_commit_and_a_readme_stub(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    out = tmp_path / "2026-12-04-memory"
    common.write_run(out, "memory", {"peak_rss_ratio": 1.01}, {"rows": [1, 2]}, "| a table |\n",
                     ["--sizes", "500", "5000"])
    run = json.loads((out / "results.json").read_text())
    assert (run["name"], run["date"], run["figures"], run["rows"]) == ("memory", "2026-12-04", {"peak_rss_ratio": 1.01},
                                                                       [1, 2])
    assert run["command"] == "python -m bench memory --sizes 500 5000"
    assert run["commit"] and run["cpu"] and run["question"] is None
    assert (run["lscpu"] == "lscpu.txt") == (out / "lscpu.txt").exists()
    readme = (out / "README.md").read_text()
    assert "python -m bench memory --sizes 500 5000" in readme and "| a table |" in readme
    (out / "README.md").write_text("the author's notes\n")
    common.write_run(out, "memory", {}, {}, "", [])
    assert (out / "README.md").read_text() == "the author's notes\n"  # a written README is kept


def test_every_benchmark_has_the_one_entry_point_and_the_one_output_convention():
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import BENCHMARKS

    on_disk = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__", "__main__", "common", "report",
                                                                  "fastai_peer"}
    assert set(BENCHMARKS) == on_disk  # every script is reachable from `python -m bench`
    for name in BENCHMARKS:
        source = (ROOT / "bench" / f"{name}.py").read_text()
        assert "def main(argv" in source and "add_output_arguments(" in source and "write_run(" in source, name
    listed = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and all(name in listed.stdout for name in BENCHMARKS)
    unknown = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr
