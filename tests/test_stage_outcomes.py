"""What the stages report after a fine-tune: evaluate on the model it saved,
each stage run's dataset input, a diverged fine-tune recovered, the raw-pixel
baseline and the champion rule, the head on a share of the training features."""

import json

import keras
import pytest

import tinyproject
from stagekit import SLOW, run_finetune
from transferlab import config
from transferlab import head as head_lib
from transferlab.config import pipeline
from transferlab.stages import evaluate, features, head


@pytest.fixture(scope="module")
def fine_tuned(stages_done):
    """A planned fine-tune, run once for the tests that evaluate its model (they
    come before the tests that fine-tune again in the same folder)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_finetune(stages_done, monkeypatch, probe=SLOW, budget="10m")
    return stages_done


def run_evaluate(folder, monkeypatch, over: dict = tinyproject.TINY) -> dict:
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return evaluate.main(config.from_dict(tinyproject.full_params(over)))


def test_evaluate_runs_after_a_planned_fine_tune(fine_tuned, monkeypatch):
    """evaluate scores the model the planned fine-tune saved, on the test images."""
    import numpy as np

    from transferlab import data

    stages_done = fine_tuned
    metrics = run_evaluate(stages_done, monkeypatch)
    model = keras.saving.load_model(stages_done / "models/finetune/model.keras", safe_mode=True)
    prepared = data.load_prepared(stages_done / "data/prepared")
    predicted = model.predict(np.asarray(prepared.x["test"]), verbose=0).argmax(axis=1)
    assert metrics["test_accuracy_single_view"] == pytest.approx(float((predicted == prepared.y["test"]).mean()),
                                                                 abs=1e-4)


def test_every_stage_run_logs_the_prepared_data_as_its_dataset_input(fine_tuned, monkeypatch):
    """The MLflow UI's Dataset column: each stage's run names the data it saw,
    with the manifest's checksum as digest and the counts as profile."""
    import mlflow

    stages_done = fine_tuned
    run_evaluate(stages_done, monkeypatch)
    manifest = json.loads((stages_done / "data" / "prepared" / "manifest.json").read_text())
    digest = manifest["checksum"].split(":")[1][:16]
    mlflow.set_tracking_uri(f"sqlite:///{stages_done / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    for stage in ("prepare", "features", "head", "finetune", "evaluate"):
        run = mlflow.search_runs(experiment_names=["smoke"], filter_string=f"tags.stage = '{stage}'",
                                 order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
        (given,) = client.get_run(run["run_id"]).inputs.dataset_inputs
        assert given.dataset.name == "tiny-images" and given.dataset.digest == digest
        assert json.loads(given.dataset.profile) == {**manifest["totals"], "classes": len(manifest["classes"])}
        context = "evaluation" if stage == "evaluate" else "training"
        assert {t.key: t.value for t in given.tags}["mlflow.data.context"] == context
    # the parent run's tag, by which `transferlab compare` groups runs
    assert client.get_run(run["tags.mlflow.parentRunId"]).data.tags["dataset"] == f"tiny-images@{digest}"


WITH_BASELINE = {**tinyproject.TINY, "evaluate": {"baseline": True}}


def test_the_raw_pixel_baseline_is_scored_on_the_same_test_images_and_the_model_judged_by_it(fine_tuned,
                                                                                          monkeypatch):
    from transferlab import data
    from transferlab import evaluate as evaluate_lib

    stages_done = fine_tuned
    metrics = run_evaluate(stages_done, monkeypatch, WITH_BASELINE)
    prepared = data.load_prepared(stages_done / "data" / "prepared")
    pixels = evaluate_lib.pixel_baseline(prepared.x["train"], prepared.y["train"], prepared.x["test"],
                                         prepared.y["test"], WITH_BASELINE["seed"])
    assert metrics["baseline_test_accuracy"] == pytest.approx(pixels["baseline_test_accuracy"])
    assert metrics["baseline_train_images"] == len(prepared.y["train"]) == pixels["baseline_train_images"]
    assert metrics["beats_baseline"] == int(metrics["test_accuracy"] > metrics["baseline_test_accuracy"])


def test_a_model_below_its_raw_pixel_baseline_says_so_and_is_not_made_champion(fine_tuned, monkeypatch, caplog):
    import mlflow

    stages_done = fine_tuned
    monkeypatch.setattr("transferlab.evaluate.pixel_baseline", lambda *a: {  # a baseline nothing beats
        "baseline_test_accuracy": 1.0, "baseline_train_images": 1, "baseline_seconds": 0.0})
    with caplog.at_level("WARNING"):
        metrics = run_evaluate(stages_done, monkeypatch, WITH_BASELINE)
    assert metrics["beats_baseline"] == 0
    assert json.loads((stages_done / "metrics" / "evaluate.json").read_text())["beats_baseline"] == 0
    assert "TRANSFER DID NOT PAY" in caplog.text and "without the champion alias" in caplog.text
    mlflow.set_tracking_uri(f"sqlite:///{stages_done / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["smoke"], filter_string="tags.stage = 'evaluate'",
                             order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
    assert run["tags.transfer_paid"] == "false" and run["tags.champion"] == "false"
    assert "transfer did not pay" in run["tags.champion_reason"]
    artifacts = {a.path for folder in ("mistakes", "per_class")
                 for a in mlflow.MlflowClient().list_artifacts(run["run_id"], folder)}
    assert artifacts == {"mistakes/mistakes.png", "per_class/recall.png"}
    for name in ("mistakes.png", "recall.png"):  # and DVC's plots
        assert (stages_done / "plots" / "evaluate" / name).stat().st_size > 1000


def test_a_diverged_fine_tune_is_recovered_and_says_so(stages_done, monkeypatch, caplog):
    """A learning rate no network survives: the guard (transferlab.train.guard)
    restores the last good weights and lowers the rate, twice, then stops; the
    events go to the log, metrics/finetune.json and the MLflow run, and the
    saved model holds finite weights."""
    import mlflow
    import numpy as np

    recipe = {**tinyproject.TINY["finetune"], "learning_rate": 1e12, "optimizer": "sgd", "epochs": 4,
              "patience": 100}
    with caplog.at_level("WARNING"):
        out = run_finetune(stages_done, monkeypatch, finetune=recipe)
    assert out["collapses"] == len(out["collapse_events"]) >= 1
    assert "diverged" in out["collapse_events"][0]["reason"] and "FINE-TUNE COLLAPSED" in caplog.text
    written = json.loads((stages_done / "metrics" / "finetune.json").read_text())
    assert written["collapse_events"] == out["collapse_events"]
    model = keras.saving.load_model(stages_done / "models" / "finetune" / "model.keras", safe_mode=True)
    assert all(np.isfinite(np.asarray(w)).all() for w in model.weights)
    mlflow.set_tracking_uri(f"sqlite:///{stages_done / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["smoke"], filter_string="tags.stage = 'finetune'",
                             order_by=["attributes.start_time DESC"], max_results=1).iloc[0]
    assert run["tags.finetune_collapsed"] == "true"


def test_the_head_can_train_on_a_share_of_the_training_features(stages_done, monkeypatch):
    import numpy as np

    from transferlab import data

    monkeypatch.chdir(stages_done)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    share = {"train_fraction": 0.5, "min_train_images": 0}
    params = config.from_dict(tinyproject.full_params({**tinyproject.TINY, "features": share}))
    features.main(params)
    meta = json.loads(next((stages_done / "data" / "features").glob("*/meta.json")).read_text())
    y = data.load_prepared("data/prepared").y["train"]
    rows = np.asarray(meta["train_index"])
    assert abs(len(rows) - len(y) * 0.5) <= 1 and meta["timings"]["train"]["images"] == len(rows)
    counts = np.bincount(y[rows], minlength=y.max() + 1)
    assert counts.max() - counts.min() <= 1  # stratified
    assert meta["timings"]["test"]["images"] == 0  # nothing reads test features
    trained_on = []
    real_train_head = head_lib.train_head
    monkeypatch.setattr(head_lib, "train_head", lambda model, x, y, *a, **k: (
        trained_on.append((len(x), len(y))), real_train_head(model, x, y, *a, **k))[1])
    head.main(params)
    assert trained_on == [(len(rows), len(rows))]  # the head trained on the share's features and labels
    # at least min_train_images: the share's floor in images; a set smaller than it, whole
    n = len(y)
    for floor, rows in ((n * 3 // 4, n * 3 // 4), (n + 1, n)):
        features.main(config.from_dict(tinyproject.full_params(
            {**tinyproject.TINY, "features": {**share, "min_train_images": floor}})))
        meta = json.loads(next((stages_done / "data" / "features").glob("*/meta.json")).read_text())
        got = len(meta.get("train_index", range(n)))
        assert abs(got - rows) <= 1 and meta["timings"]["train"]["images"] == got
        assert ("train_index" in meta) == (rows < n)
    with pytest.raises(config.ConfigError, match="needs finetune.mode: full"):
        pipeline.check(config.from_dict(tinyproject.full_params(
            {**tinyproject.TINY, "features": {"train_fraction": 0.5}, "finetune": {"mode": "cached", "unfreeze": 2}})))
