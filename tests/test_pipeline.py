"""End to end on a tiny config, in a temporary copy of the project: `dvc repro`
through every stage, the MLflow store as `mlflow ui` serves it, and
`mlflow run . -P backbone=<each registered backbone>`."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

import pgserver
import synth
import tinyproject
from transferlab.backbones import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = tinyproject.TINY
run = tinyproject.run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (pipeline files and sources) with a tiny params.yaml."""
    return tinyproject.make(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def reproduced(project):
    dest, env = project
    first = run(["dvc", "repro"], dest, env)
    second = run(["dvc", "repro"], dest, env)
    return dest, env, first, second


def test_dvc_repro_runs_every_stage(reproduced):
    dest, _, first, _ = reproduced
    for stage in ("prepare", "features", "head", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in first
    manifest = json.loads((dest / "data/prepared/manifest.json").read_text())
    assert manifest["totals"] == {"train": 18, "val": 6, "test": 12}
    assert manifest["image_shape"] == [16, 16, 3]
    assert (dest / "data/features/efficientnet_lite0-32/meta.json").exists()
    assert (dest / "models/head/model.keras").exists()
    metrics = json.loads((dest / "metrics/head.json").read_text())
    with (dest / "plots/head/history.csv").open() as fh:  # the kept epoch's, as its history logged it
        history = list(csv.DictReader(fh))
    assert len(history) == metrics["epochs_run"] >= metrics["best_epoch"] >= 1
    assert metrics["best_val_accuracy"] == pytest.approx(float(history[metrics["best_epoch"] - 1]["val_accuracy"]),
                                                         abs=1e-5)
    assert (dest / "plots/head/confusion_val.png").stat().st_size > 1000
    # the shipped params.yaml's fine-tune path (the tiny config leaves finetune.mode as shipped)
    shipped_mode = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]["mode"]
    assert yaml.safe_load((dest / "params.yaml").read_text())["finetune"]["mode"] == shipped_mode
    assert json.loads((dest / "metrics/finetune.json").read_text())["mode"] == shipped_mode
    cache = dest / "data/features/efficientnet_lite0-32/activations/train_flip.npy"
    assert cache.exists() == (shipped_mode == "cached")
    evaluated = json.loads((dest / "metrics/evaluate.json").read_text())
    x_test, y_test = np.load(dest / "data/prepared/x_test.npy"), np.load(dest / "data/prepared/y_test.npy")
    single = keras.saving.load_model(dest / "models/finetune/model.keras", safe_mode=True)
    predicted = single.predict(x_test, verbose=0).argmax(axis=1)  # the fine-tuned model, one view
    accuracy = float((predicted == y_test).mean())
    assert evaluated["test_accuracy_single_view"] == pytest.approx(accuracy, abs=1e-5)  # metrics: 5 decimals
    # calibration: a temperature kept only where it lowered the validation NLL, ECE before and after
    assert evaluated["val_nll"] <= evaluated["val_nll_before_calibration"]
    if evaluated["temperature"] == 1.0:
        assert evaluated["val_nll"] == evaluated["val_nll_before_calibration"]
    assert {"test_ece", "test_ece_before_calibration"} <= set(evaluated)
    assert (dest / "plots/evaluate/reliability.png").stat().st_size > 1000
    # the registered model is the evaluated one: test-time flips inside where evaluate kept them
    from transferlab import predict

    cwd = os.getcwd()
    os.chdir(dest)
    try:
        registered = predict.load(TINY["tracking"]["model_name"], alias="champion")
    finally:
        os.chdir(cwd)
    assert ("tta_flip" in [layer.name for layer in registered.model.layers]) == (evaluated["tta_flip"] == 1)
    predicted = registered.model.predict(x_test, verbose=0).argmax(axis=1)  # its views, its temperature
    assert evaluated["test_accuracy"] == pytest.approx(float((predicted == y_test).mean()), abs=1e-5)
    rows = (dest / "plots/evaluate/confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 12
    assert set(json.loads((dest / "metrics/per_class.json").read_text())) >= set(synth.CLASSES)


def test_a_log_file_gets_one_line_per_epoch_not_progress_bars(reproduced):
    """`dvc repro > log`: the stages' stdout is no terminal, so Keras prints a line per
    epoch and tqdm stays quiet (in a terminal both show their bars)."""
    dest, _, first, _ = reproduced
    assert "━" not in first and "\r" not in first and "\x08" not in first
    head = json.loads((dest / "metrics/head.json").read_text())
    tuned = json.loads((dest / "metrics/finetune.json").read_text())
    assert first.count("Epoch ") == head["epochs_run"] + tuned["epochs_run"]
    # the fine-tune's loss and learning-rate curves are in its history, for `dvc plots`
    with (dest / "plots/finetune/history.csv").open() as fh:
        header = fh.readline().strip().split(",")
    assert {"train_loss", "val_loss", "learning_rate"} <= set(header)


def test_second_repro_does_nothing(reproduced):
    _, _, _, second = reproduced
    assert "Running stage" not in second
    assert "up to date" in second


def wait_for(url: str, proc: subprocess.Popen, seconds: float, log=lambda: "") -> None:
    """Until `url` answers; fails if `proc` exits first or `seconds` pass."""
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"{proc.args[:3]} did not answer at {url}:\n{log()}")
            time.sleep(1)


# --------------------------------------------------------------------------- real MLflow clients

# A process where this package cannot be imported, as on a machine where it is not installed.
NO_TRANSFERLAB = 'import sys; sys.modules["transferlab"] = None\n'


def _client_env(dest: Path, env: dict, tmp_path: Path) -> dict:
    (tmp_path / "block").mkdir(exist_ok=True)
    (tmp_path / "block" / "sitecustomize.py").write_text(NO_TRANSFERLAB)
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}", "PYTHONPATH": str(tmp_path / "block")}


def _predicted_by_transferlab(dest: Path, env: dict, tmp_path: Path):
    """What `transferlab predict` prints for some test images (its own process, as a
    user runs it), and those images as the model takes them."""
    from transferlab import data

    files = sorted((dest / "tiny-images" / "test").rglob("*.png"))[:6]
    classes = json.loads((dest / "data/prepared/classes.json").read_text())
    out = tmp_path / "predict.json"
    run(["transferlab", "predict", *map(str, files), "--top-k", str(len(classes)), "--format", "json",
         "--output", str(out)], dest, env)
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == list(map(str, files))
    expected = np.array([[next(p["probability"] for p in r["predictions"] if p["label"] == c) for c in classes]
                         for r in rows])
    size = yaml.safe_load((dest / "params.yaml").read_text())["data"]["image_size"]
    return np.stack([data.decode_image(f, size) for f in files]), expected


def test_registered_model_loads_with_pyfunc_where_transferlab_cannot_be_imported(reproduced, tmp_path):
    dest, env, _, _ = reproduced
    x, expected = _predicted_by_transferlab(dest, env, tmp_path)
    np.save(tmp_path / "x.npy", x)
    script = NO_TRANSFERLAB + f"""
import json, numpy as np, mlflow
model = mlflow.pyfunc.load_model("models:/{TINY['tracking']['model_name']}@champion")
probs = np.asarray(model.predict(np.load({str(tmp_path / 'x.npy')!r})))
np.save({str(tmp_path / 'probs.npy')!r}, probs)
inputs = model.metadata.get_input_schema().inputs[0]
info = {{"modules": [m for m, v in sys.modules.items() if m.startswith("transferlab") and v is not None],
        "dtype": str(inputs.type), "shape": list(inputs.shape),
        "example": model.metadata.saved_input_example_info is not None}}
open({str(tmp_path / 'info.json')!r}, "w").write(json.dumps(info))
"""
    run([sys.executable, "-c", script], tmp_path, {**_client_env(dest, env, tmp_path), "PYTHONPATH": ""})
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["modules"] == []
    assert info["dtype"] == "uint8" and info["shape"][1:] == list(x.shape[1:]) and info["example"]
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected, atol=1e-5)


def test_mlflow_models_serve_answers_invocations_over_http(reproduced, tmp_path):
    dest, env, _, _ = reproduced
    x, expected = _predicted_by_transferlab(dest, env, tmp_path)
    port = pgserver.free_port()
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{TINY['tracking']['model_name']}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_client_env(dest, env, tmp_path), stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"), start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/ping", proc, 120, lambda: (tmp_path / "serve.log").read_text()[-3000:])
        req = urllib.request.Request(f"{base}/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        got = np.asarray(json.load(urllib.request.urlopen(req, timeout=60))["predictions"])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_changing_what_no_stage_imports_leaves_dvc_status_clean(reproduced):
    """The ui command, compare, predict, export, the CLI, the README and a bench
    script: none is a stage's dependency, so none re-runs the pipeline. A stage's
    own module does."""
    dest, env, _, _ = reproduced
    untouched = ["src/transferlab/ui.py", "src/transferlab/compare.py", "src/transferlab/predict.py",
                 "src/transferlab/export.py", "src/transferlab/cli.py", "src/transferlab/run.py",
                 "src/transferlab/search/study.py", "src/transferlab/search/objective.py", "README.md",
                 "bench/recipes.py"]
    saved = {name: (dest / name).read_bytes() if (dest / name).exists() else None for name in untouched}
    try:
        for name in untouched:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            with open(dest / name, "a") as fh:
                fh.write("\n# changed\n")
        assert "up to date" in run(["dvc", "status"], dest, env)
        # a stage's own module re-runs it and what follows; a model module, the model's stages: never prepare
        for name, stage in (("src/transferlab/stages/head.py", "head:"), ("src/transferlab/backbones.py", "features:"),
                            ("src/transferlab/train/trainer.py", "finetune:")):
            changed = dest / name
            original = changed.read_bytes()
            changed.write_bytes(original + b"\n# changed\n")
            try:
                status = run(["dvc", "status"], dest, env)
                assert stage in status and "prepare:" not in status, (name, status)
            finally:
                changed.write_bytes(original)
    finally:
        for name, content in saved.items():
            if content is None:
                (dest / name).unlink()
            else:
                (dest / name).write_bytes(content)
    assert "up to date" in run(["dvc", "status"], dest, env)


def test_mlflow_runs_hold_params_metrics_and_tags(reproduced):
    import mlflow

    dest, _, _, _ = reproduced
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"pipeline", "prepare", "features", "head", "finetune", "evaluate"}
    parent = runs.pop("pipeline")
    assert parent.info.status == "FINISHED"  # closed by the last stage
    for stage, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
    h = runs["head"]
    assert h.data.params["head.units"] == "16" and h.data.params["backbone.name"] == "efficientnet_lite0"
    assert h.data.tags["backbone"] == "efficientnet_lite0"
    assert h.data.tags["git_commit"]
    # the head's inputs carry the md5 dvc.lock recorded for them
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    prepared_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    assert h.data.tags["dvc.dep.data/prepared"] == prepared_md5
    head_metrics = json.loads((dest / "metrics/head.json").read_text())
    assert len(client.get_metric_history(h.info.run_id, "val_accuracy")) == head_metrics["epochs_run"]
    assert h.data.metrics["best_val_accuracy"] == head_metrics["best_val_accuracy"]
    artifacts = [a.path for a in client.list_artifacts(h.info.run_id, "confusion")]
    assert "confusion/confusion_val.png" in artifacts
    e = runs["evaluate"]
    assert "confusion/confusion.png" in [a.path for a in client.list_artifacts(e.info.run_id, "confusion")]
    assert "model/MLmodel" in [a.path for a in client.list_artifacts(e.info.run_id, "model")]
    assert "calibration/reliability.png" in [a.path for a in client.list_artifacts(e.info.run_id, "calibration")]
    champion = client.get_model_version_by_alias("smoke-model", "champion")
    assert champion.run_id == e.info.run_id
    assert float(champion.tags["test_accuracy"]) == e.data.metrics["test_accuracy"]
    # the parent row carries the summary: the fine-tune's knobs, the test metrics, each stage's time
    f = runs["finetune"]
    for key in ("backbone.name", "backbone.weights", "backbone.input_size", "finetune.unfreeze",
                "finetune.learning_rate", "finetune.epochs", "finetune.mode"):
        assert parent.data.params[key] == f.data.params[key], key
    assert parent.data.params["evaluate.tta"] == e.data.params["evaluate.tta"]
    assert parent.data.metrics["input_size"] == f.data.metrics["input_size"] == 32  # the size trained
    for key in ("test_accuracy", "test_loss", "test_ece", "temperature"):
        assert parent.data.metrics[key] == e.data.metrics[key], key
    stage_seconds = {f"{s}_seconds": runs[s].data.metrics[f"{s}_seconds"]
                     for s in ("prepare", "features", "head", "finetune", "evaluate")}
    for key, value in stage_seconds.items():
        assert parent.data.metrics[key] == value, key
    walls = {s: runs[s].data.metrics["stage_seconds"] for s in ("prepare", "features", "head", "finetune", "evaluate")}
    assert all(walls[s] >= stage_seconds[f"{s}_seconds"] for s in walls)  # a stage's wall time holds its work
    assert parent.data.metrics["pipeline_seconds"] == pytest.approx(sum(walls.values()), abs=0.05)
    # ... and mlflow.search_runs on parent rows alone finds it, as `transferlab compare` reads it
    mlflow.set_tracking_uri(f"sqlite:///{dest / 'mlflow.db'}")
    table = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'")
    assert list(table["metrics.test_accuracy"]) == [e.data.metrics["test_accuracy"]]


def test_mlflow_ui_lists_the_runs(reproduced):
    dest, env, _, _ = reproduced
    port = pgserver.free_port()
    proc = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{dest / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=dest, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", proc, 90)
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke")
        exp_id = json.load(urllib.request.urlopen(req))["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [exp_id]}).encode()
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(req))["runs"]
        names = sorted(r["info"]["run_name"] for r in runs)
        assert names == sorted(["prepare"] + [f"{s}-efficientnet_lite0" for s in
                                              ("pipeline", "features", "head", "finetune", "evaluate")])
        head_run = next(r for r in runs if r["info"]["run_name"].startswith("head"))
        assert any(m["key"] == "val_accuracy" for m in head_run["data"]["metrics"])
        assert any(p["key"] == "head.dropout" for p in head_run["data"]["params"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mlflow_run_smoke(reproduced):
    """The default suite's `mlflow run` smoke run, on the backbone `reproduced`
    already ran (its features and head stay cached); every backbone runs with
    the heavy tests."""
    _mlflow_run(reproduced, TINY["backbone"]["name"])


@pytest.mark.heavy
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_mlflow_run_each_backbone(reproduced, backbone):
    _mlflow_run(reproduced, backbone)


def _mlflow_run(reproduced, backbone):
    """`mlflow run . -P backbone=...` writes the overrides into params.yaml, runs
    `dvc repro`, and nests every stage that ran under the mlflow run."""
    import re

    import mlflow

    dest, env, _, _ = reproduced
    # epochs=1 differs from the tiny config, so finetune and evaluate run even
    # for the backbone that `reproduced` already ran
    out = run(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "smoke",
               "-P", f"backbone={backbone}", "-P", "weights=none", "-P", "epochs=1"], dest, env)
    run_id = re.search(r"Run \(ID '([0-9a-f]+)'\) succeeded", out).group(1)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    assert params["backbone"]["name"] == backbone and params["backbone"]["weights"] == "none"
    assert params["finetune"]["epochs"] == 1
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    parent = client.get_run(run_id)
    assert parent.data.tags["mlflow.project.entryPoint"] == "main"
    assert parent.data.params["backbone"] == backbone
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    stages = {r.data.tags["stage"]: r for r in children}
    assert {"finetune", "evaluate"} <= set(stages)
    assert all(r.data.tags["backbone"] == backbone for r in children)
    evaluated = json.loads((dest / "metrics/evaluate.json").read_text())
    assert stages["evaluate"].data.metrics["test_accuracy"] == evaluated["test_accuracy"]


@pytest.mark.heavy
def test_compare_tabulates_every_backbone(reproduced):
    """After the per-backbone `mlflow run`s: one row per backbone, with accuracy,
    parameter count, time and throughput, as CSV, markdown and a plot."""
    import csv

    dest, env, _, _ = reproduced
    run(["transferlab", "compare", "--last", "1"], dest, env)
    with (dest / "reports/compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["backbone"] for r in rows} == set(BACKBONES)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    for r in rows:  # each row is its pipeline's evaluate run, as MLflow holds it
        evaluated = [c for c in client.search_runs(
            [client.get_run(r["run_id"]).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{r['run_id']}' and tags.stage = 'evaluate'")]
        assert len(evaluated) == 1, r["backbone"]
        assert float(r["test_accuracy"]) == evaluated[0].data.metrics["test_accuracy"]
        assert int(r["parameters"]) == int(evaluated[0].data.metrics["parameters"]) > 0
        assert float(r["total_seconds"]) > 0 and r["weights"] == "none"
    assert (dest / "reports/compare.png").stat().st_size > 5000


def test_dvc_plots_metrics_diff_and_experiments(reproduced):
    """The DVC side a user sees: `dvc plots show` renders the confusion matrix and
    the curves, `dvc exp run -S` sweeps a param, `dvc metrics diff` compares the
    experiment with the commit."""
    dest, env, _, _ = reproduced
    run(["dvc", "repro"], dest, env)  # whatever params.yaml now holds
    run(["git", "add", "-A"], dest, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], dest, env)
    run(["dvc", "plots", "show", "-o", "dvc_plots"], dest, env)
    page = (dest / "dvc_plots" / "index.html").read_text()
    for plot in ("confusion.csv", "head_accuracy", "finetune_accuracy", "finetune_loss", "finetune_learning_rate",
                 "confusion_val.png", "reliability.png", "mistakes.png", "recall.png"):
        assert plot in page, plot
    # a param of the last stage: the sweep re-runs that stage only (seconds, where one of the head's
    # re-runs the head, the fine-tune and evaluate)
    before = json.loads((dest / "metrics/evaluate.json").read_text())
    out = run(["dvc", "exp", "run", "-S", "evaluate.tta=flip", "-S", "evaluate.calibrate=false"], dest, env)
    assert "Running stage 'evaluate'" in out and "Running stage 'head'" not in out  # what the params change
    assert yaml.safe_load((dest / "params.yaml").read_text())["evaluate"]["tta"] == "flip"
    shown = run(["dvc", "exp", "show", "--json"], dest, env)
    assert "evaluate.tta" in shown or '"tta": "flip"' in shown
    after = json.loads((dest / "metrics/evaluate.json").read_text())
    assert after["tta_flip"] == 1 and after["temperature"] == 1.0  # the swept values took effect
    out = subprocess.run(["dvc", "metrics", "diff", "--all", "--json"], cwd=dest, env=env,
                         capture_output=True, text=True, check=True).stdout
    diff = json.loads(out)["metrics/evaluate.json"]
    for key in ("test_accuracy", "test_loss", "evaluate_seconds"):
        assert diff[key]["old"] == before[key] and diff[key]["new"] == after[key], key


def test_dvc_exp_run_temp_logs_to_the_project_store(reproduced):
    """`dvc exp run --temp` runs the stages in a temporary copy under .dvc/tmp/exps/,
    which DVC deletes afterwards: the runs and the registered model must land in
    the project's own store."""
    import mlflow

    dest, env, _, _ = reproduced
    run(["git", "add", "-A"], dest, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "before the experiment",
         "--allow-empty"], dest, env)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    versions = len(client.search_model_versions(f"name = '{TINY['tracking']['model_name']}'"))
    out = run(["dvc", "exp", "run", "--temp", "-S", "evaluate.tta=none"], dest, env)
    assert "Running stage 'evaluate'" in out
    exp = client.get_experiment_by_name(TINY["tracking"]["experiment"])
    evaluated = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'evaluate'",
                                   order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert evaluated.data.params["evaluate.tta"] == "none"
    assert len(client.search_model_versions(f"name = '{TINY['tracking']['model_name']}'")) == versions + 1
    assert not list((dest / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
