"""The bench scripts run and write what the README's tables come from (tiny
data, weights none: the figures themselves come from real runs)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import synth

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_throughput_quick_compares_ours_with_model_predict(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--quick", "--images", "128",
                    "--input-size", "32", "--out", str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "throughput.json").read_text())
    variants = [r["variant"] for r in result["rows"]]
    assert any(v.startswith("ours") for v in variants) and any(v.startswith("plain model.predict") for v in variants)
    assert any(v.startswith("fine-tune step") for v in variants)  # the training step builds and runs
    assert result["ratio_ours_to_predict"] > 0
    assert "ours / plain model.predict" in (tmp_path / "throughput.md").read_text()


@pytest.mark.heavy
def test_recipes_bench_runs_both_recipes_and_writes_the_table(tmp_path):
    synth.make_image_folder(tmp_path / "imgs", per_class=12, test_per_class=4)
    work, out = tmp_path / "work", tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "bench/recipes.py"), "--data", str(tmp_path / "imgs"),
                    "--weights", "none", "--workdir", str(work), "--out", str(out),
                    "--set", "head.epochs=2", "--set", "finetune.epochs=1", "--set", "finetune.min_steps=0", "--set", "backbone.input_size=32",
                    "--set", "finetune.unfreeze=1", "--seeds-head-epochs", "2", "--seeds-finetune-epochs", "1"],
                   check=True, capture_output=True)
    table = (out / "table.md").read_text()
    assert "| seeds |" in table and "| ours |" in table and "peak RSS <= 4 GB" in table
    with (out / "time_to_accuracy.csv").open() as fh:
        points = list(csv.DictReader(fh))
    seeds = [p for p in points if p["recipe"] == "seeds"]
    assert [(p["phase"], p["epoch"]) for p in seeds] == [("head", "1"), ("head", "2"), ("finetune", "1")]
    assert [float(p["seconds"]) for p in seeds] == sorted(float(p["seconds"]) for p in seeds)
    ours = [p for p in points if p["recipe"] == "ours" and p["phase"] == "finetune"]
    assert [p["epoch"] for p in ours] == ["1"] and float(ours[0]["test_accuracy"]) >= 0  # tested after the fit
    final = [p for p in points if p["recipe"] == "ours" and p["phase"] == "final"]
    evaluated = json.loads((work / "metrics/evaluate.json").read_text())
    assert float(final[0]["test_accuracy"]) == evaluated["test_accuracy"]
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


def _points(*rows):
    return [{"phase": phase, "epoch": i, "seconds": s, "test_accuracy": a, "val_accuracy": float("nan")}
            for i, (phase, s, a) in enumerate(rows, 1)]


def test_the_peer_comparison_needs_ours_sooner_at_every_accuracy_the_peer_reached():
    sys.path.insert(0, str(ROOT / "bench"))
    import recipes

    ours = {"recipe": "ours", "peak_rss_gb": 2.0,
            "points": _points(("head", 60, 0.80), ("finetune", 300, 0.88), ("final", 400, 0.90))}

    def peer(*rows):
        return {"recipe": "fastai", "points": _points(*rows)}

    slower = recipes.sooner_than_peer(ours, peer(("head", 600, 0.79), ("finetune", 1200, 0.87)))
    assert slower["met"] and "87.00%: fastai 20.0 min, ours 5.0 min" in slower["measured"]
    assert not recipes.sooner_than_peer(ours, peer(("head", 600, 0.79), ("finetune", 200, 0.87)))["met"]
    assert not recipes.sooner_than_peer(ours, peer(("finetune", 5000, 0.95)))["met"]  # ours never got there
    rows = recipes.targets(ours, None, peer(("finetune", 1200, 0.87)))
    assert [r["target"] for r in rows][-2:] == ["every accuracy fastai reached, ours reached sooner",
                                                "ours' peak RSS <= 4 GB"]


def test_a_budgeted_run_is_met_only_if_it_finished_within_its_budget():
    sys.path.insert(0, str(ROOT / "bench"))
    import recipes

    ours = {"recipe": "ours", "peak_rss_gb": 2.0, "wall_seconds": 1224.1, "budget_seconds": 1200.0,
            "points": _points(("head", 60, 0.80), ("finetune", 991, 0.919), ("final", 1224.1, 0.925))}
    row = {r["target"]: r for r in recipes.targets(ours, None)}["ours finished within its budget of 20 min"]
    assert not row["met"] and row["measured"] == "20.4 min (+24 s)"
    rows = recipes.targets({**ours, "wall_seconds": 1190.0}, None)
    assert [r["met"] for r in rows if r["target"].startswith("ours finished")] == [True]
    assert not any(r["target"].startswith("ours finished") for r in recipes.targets({**ours, "budget_seconds": None},
                                                                                     None))


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
    report = json.loads((out / "ab.json").read_text())
    assert [r["arm"] for r in report["arms"]] == ["off", "ema"]
    assert [r["steps_run"] for r in report["arms"]] == [3, 3]
    assert sorted(report["shared_seconds"]) == ["features", "head", "prepare"]  # once, for both arms
    assert json.loads((work / "arms/ema/metrics/finetune.json").read_text())["steps_run"] == 3
    assert "| ema | finetune.ema=0.9 |" in (out / "ab.md").read_text()
