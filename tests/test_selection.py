"""Imbalanced classes: the selection metric chosen from the training counts,
class weights in the loss, a validation floor per class, and the stages
selecting, reporting and registering by the one metric."""

import csv
import json

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score

import synth
import tinyproject
from transferlab import config
from transferlab import head as head_lib
from transferlab.data.prepared import val_floor
from transferlab.search.space import with_monitor
from transferlab.stages import evaluate, features, finetune, head, prepare
from transferlab.train import selection


def test_auto_selects_balanced_accuracy_and_weights_from_twice_the_smallest_class():
    even = selection.resolve("auto", "auto", {"a": 4500, "b": 4500, "c": 4400})
    assert (even.metric, even.class_weight) == ("accuracy", None)
    assert "every class weighing 1" in even.reason
    skewed = selection.resolve("auto", "auto", [150, 15, 14])
    assert skewed.metric == "balanced_accuracy" and skewed.ratio == pytest.approx(150 / 14)
    n = 150 + 15 + 14
    assert skewed.class_weight == pytest.approx({0: n / (3 * 150), 1: n / (3 * 15), 2: n / (3 * 14)})
    assert selection.resolve("auto", "auto", [20, 10]).metric == "balanced_accuracy"  # 2x: imbalanced
    assert selection.resolve("auto", "auto", [19, 10]).metric == "accuracy"
    # set by hand, either way
    assert selection.resolve("macro_f1", "none", [150, 15]).class_weight is None
    assert selection.resolve("accuracy", "balanced", [10, 10]).class_weight == {0: 1.0, 1: 1.0}
    assert selection.resolve("accuracy", "auto", [150, 15]).metric == "accuracy"
    assert skewed.record() == {"select_metric": "balanced_accuracy", "class_weighted": 1,
                               "class_imbalance": round(150 / 14, 3)}


def test_the_search_monitors_the_pipelines_selection_metric():
    params = config.from_dict(tinyproject.full_params(tinyproject.TINY))
    assert params.tune.monitor == "auto"
    assert with_monitor(params, [40, 4]).tune.monitor == "val_balanced_accuracy"
    assert with_monitor(params, [40, 40]).tune.monitor == "val_accuracy"
    chosen = config.from_dict(tinyproject.full_params({**tinyproject.TINY, "tune": {"monitor": "val_loss"}}))
    assert with_monitor(chosen, [40, 4]).tune.monitor == "val_loss"


@pytest.mark.parametrize("metric", ["balanced_accuracy", "macro_f1"])
def test_the_keras_metric_equals_scikit_learns_over_batches(metric):
    rng = np.random.default_rng(0)
    y = rng.choice(4, 203, p=[0.7, 0.2, 0.1, 0.0])  # class 3 never true
    probs = rng.random((203, 4)).astype(np.float32)
    probs[np.arange(203)[:120], y[:120]] += 1.0  # right more often than chance
    m = selection.ConfusionScore(4, metric)
    for start in range(0, 203, 50):  # several batches: the matrix sums them
        m.update_state(y[start:start + 50], probs[start:start + 50])
    expected = (balanced_accuracy_score(y, probs.argmax(1)) if metric == "balanced_accuracy" else
                f1_score(y, probs.argmax(1), average="macro", zero_division=0))
    assert float(m.result()) == pytest.approx(expected, rel=1e-5)
    assert selection.score(metric, y, probs.argmax(1)) == pytest.approx(expected)
    m.reset_state()
    m.update_state(y[:10], np.eye(4, dtype=np.float32)[y[:10]])
    assert float(m.result()) == pytest.approx(1.0)


def test_the_validation_floor_moves_a_rare_class_images_and_leaves_common_ones():
    y = np.array([0] * 150 + [1] * 15 + [2] * 3)
    rows = np.arange(len(y))
    held = np.sort(np.concatenate([rows[y == 0][:15], rows[y == 1][:1]]))  # a proportional split's
    kept = np.setdiff1d(rows, held)
    train, val = val_floor(y, kept, held, 5, seed=0)
    assert np.bincount(y[val], minlength=3).tolist() == [15, 5, 1]  # class 2 keeps 2 of its 3 to train on
    assert np.bincount(y[train], minlength=3).tolist() == [135, 10, 2]
    assert not set(train) & set(val) and len(train) + len(val) == len(y)
    assert val_floor(y, kept, held, 5, seed=0)[1].tolist() == val.tolist()  # seeded
    same = val_floor(y, kept, held, 0, seed=0)
    assert same[1].tolist() == held.tolist()


def test_class_weights_weigh_the_heads_loss():
    """At a learning rate of 0, one batch: the epoch's loss is the weighted mean
    of the per-image losses (Keras' class_weight as sample weights)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), np.array([0] * 30 + [1] * 10)

    def loss(weights):
        keras.utils.set_random_seed(0)
        model = head_lib.build_head(8, 2, 0, 0.0)
        hist = head_lib.train_head(model, x, y, x[:0], y[:0], optimizer="sgd", learning_rate=0.0, epochs=1,
                                   batch_size=64, patience=1, class_weight=weights, verbose=0)
        per_image = keras.losses.sparse_categorical_crossentropy(y, model.predict(x, verbose=0)).numpy()
        return hist.history["loss"][0], per_image

    plain, per_image = loss(None)
    assert plain == pytest.approx(per_image.mean(), rel=1e-4)
    weights = {0: 40 / 60, 1: 40 / 20}
    weighted, _ = loss(weights)
    assert weighted == pytest.approx(float(np.mean(per_image * np.where(y == 0, weights[0], weights[1]))), rel=1e-4)
    assert weighted != pytest.approx(plain, rel=1e-3)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """The tiny pipeline on a folder whose first class has 4x the images of the
    others, through evaluate, in a scratch folder."""
    import inspect
    import os

    folder = tmp_path_factory.mktemp("imbalanced")
    synth.make_image_folder(folder / "tiny-images", per_class=6, test_per_class=3, size=16)
    rng = np.random.default_rng(7)
    for i in range(18):  # class 0: 24 training images, every other class 6
        Image.fromarray(synth.class_image(0, rng, 16)).save(folder / "tiny-images/train" / synth.CLASSES[0] /
                                                            f"x{i:04d}.png")
    cwd, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)
    from transferlab import evaluate as evaluate_lib

    fit, baseline, weights, baseline_weights = keras.Model.fit, evaluate_lib.pixel_baseline, [], []

    def spy(self, *args, **kwargs):  # the class weights each fit was given
        weights.append(kwargs.get("class_weight"))
        return fit(self, *args, **kwargs)

    def baseline_spy(*args, **kwargs):  # and the raw-pixel baseline's
        bound = inspect.signature(baseline).bind(*args, **kwargs)
        baseline_weights.append(bound.arguments.get("class_weight"))
        return baseline(*args, **kwargs)

    keras.Model.fit, evaluate_lib.pixel_baseline = spy, baseline_spy
    try:
        over = {**tinyproject.TINY, "data": {**tinyproject.TINY["data"], "val_fraction": 0.25, "val_min_per_class": 3},
                "evaluate": {**tinyproject.TINY["evaluate"], "baseline": True}}
        params = config.from_dict(tinyproject.full_params(over))
        for stage in (prepare, features, head, finetune, evaluate):
            stage.main(params)
        yield folder, weights, baseline_weights
    finally:
        keras.Model.fit, evaluate_lib.pixel_baseline = fit, baseline
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri


def test_an_imbalanced_set_is_selected_weighted_and_reported_by_balanced_accuracy(imbalanced, monkeypatch):
    import mlflow

    from transferlab import data, tracking

    imbalanced, fit_weights, baseline_weights = imbalanced
    read = lambda name: json.loads((imbalanced / "metrics" / f"{name}.json").read_text())  # noqa: E731
    prepared = data.load_prepared(imbalanced / "data/prepared")
    # the floor: 3 validation images of each small class, where a quarter of 6 would be 1 or 2
    assert min(prepared.manifest["counts"]["val"].values()) == 3
    assert prepared.manifest["classes_too_small_to_validate"] == []
    counts = prepared.manifest["counts"]["train"]
    expected = selection.resolve("auto", "auto", counts).class_weight
    assert expected[0] < 1 < expected[1]  # the common class weighs less, the rare ones more
    # the head's fit, then the fine-tune's (the probe's timing fits train no weights)
    trained = [w for w in fit_weights if w is not None]
    assert len(trained) >= 2 and all(w == pytest.approx(expected) for w in trained)
    h, f, e = read("head"), read("finetune"), read("evaluate")
    for m in (h, f):
        assert m["select_metric"] == "balanced_accuracy" and m["class_weighted"] == 1
        assert m["class_imbalance"] == pytest.approx(prepared.manifest["counts"]["train"][synth.CLASSES[0]] /
                                                     min(prepared.manifest["counts"]["train"].values()), abs=1e-3)
    history = (imbalanced / "plots/head/history.csv").read_text().splitlines()[0]
    assert "val_balanced_accuracy" in history
    # the fine-tune's best epoch is the best val balanced accuracy, the head's score the one to beat
    epochs = list(csv.DictReader((imbalanced / "plots/finetune/history.csv").open()))
    scores = [h["best_val_balanced_accuracy"]] + [float(row["val_balanced_accuracy"]) for row in epochs]
    assert f["best_val_balanced_accuracy"] == pytest.approx(max(scores), abs=1e-4)
    assert scores[f["best_epoch"]] == pytest.approx(max(scores), abs=1e-4)  # of tied epochs, the lower loss
    assert "best_val_accuracy" in f
    report = read("per_class")  # scikit-learn's, of the same predictions
    recalls = [report[c]["recall"] for c in synth.CLASSES]
    assert e["test_balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-4)
    assert e["test_macro_f1"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-4)
    assert baseline_weights == [pytest.approx(expected)] and "baseline_test_balanced_accuracy" in e  # weighted alike
    monkeypatch.chdir(imbalanced)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    version = client.get_model_version(tinyproject.TINY["tracking"]["model_name"], "1")
    assert version.tags["selected_by"] == "test_balanced_accuracy"
    assert float(version.tags["test_balanced_accuracy"]) == pytest.approx(e["test_balanced_accuracy"], abs=1e-5)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'evaluate'")
    assert runs["tags.select_metric"].tolist() == ["balanced_accuracy"]


def test_the_fine_tunes_checkpoint_and_early_stopping_watch_the_selection_metric(tmp_path):
    from transferlab.train import checkpoint

    cbs, kept = checkpoint.callbacks(tmp_path, patience=2, schedule="plateau", has_val=True, start_score=0.4,
                                     select="balanced_accuracy")
    assert kept.monitor == "val_balanced_accuracy" and kept.state["best_value"] == 0.4
    watching = [cb.monitor for cb in cbs if isinstance(cb, (keras.callbacks.EarlyStopping,
                                                            keras.callbacks.ReduceLROnPlateau))]
    assert watching == ["val_balanced_accuracy", "val_balanced_accuracy"]
