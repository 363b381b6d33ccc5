import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from transferlab import evaluate, registry, tracking


def test_confusion_matrix_on_known_predictions(tmp_path):
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 2, 2, 0, 2])
    probs = np.full((len(y), 3), 0.1)
    probs[np.arange(len(y)), pred] = 0.8
    result = evaluate.summarize(y, probs, classes)
    expected = np.array([[1, 1, 0], [0, 2, 1], [1, 0, 3]])
    np.testing.assert_array_equal(result["confusion"], expected)
    np.testing.assert_array_equal(result["confusion"], confusion_matrix(y, pred))
    assert result["test_accuracy"] == pytest.approx(6 / 9, abs=1e-5)
    assert result["per_class"]["c"]["recall"] == pytest.approx(0.75)
    assert result["per_class"]["a"]["precision"] == pytest.approx(0.5)
    path = evaluate.write_confusion_csv(y, pred, classes, tmp_path / "cm.csv")
    rows = path.read_text().splitlines()
    assert rows[0] == "actual,predicted" and rows[2] == "a,b" and len(rows) == 10
    png = evaluate.confusion_png(result["confusion"], classes, tmp_path / "cm.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_the_gallery_shows_the_most_confident_mistakes_first(tmp_path):
    y = np.array([0, 1, 2, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05],   # right
                      [0.7, 0.2, 0.1],     # wrong, 0.7
                      [0.05, 0.9, 0.05],   # wrong, 0.9
                      [0.4, 0.6, 0.0],     # wrong, 0.6
                      [0.1, 0.8, 0.1]])    # right
    assert evaluate.confident_mistakes(y, probs).tolist() == [2, 1, 3]
    assert evaluate.confident_mistakes(y, probs, n=1).tolist() == [2]
    x = np.zeros((5, 8, 8, 3), np.uint8)
    classes = ["a", "b", "c"]
    assert evaluate.mistakes_png(x, y, probs, classes, tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    report = evaluate.per_class_report(y, probs.argmax(axis=1), classes)
    assert evaluate.recall_png(report, classes, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_should_promote():
    assert registry.should_promote(0.8, None)[0]
    assert registry.should_promote(0.81, 0.8)[0]
    promote, reason = registry.should_promote(0.8, 0.8)
    assert not promote and "does not beat" in reason
    assert not registry.should_promote(0.7, 0.8)[0]
    promote, reason = registry.should_promote(0.9, None, baseline=0.95)  # the first, but below its baseline
    assert not promote and "raw-pixel baseline's 0.9500: transfer did not pay" in reason
    assert registry.should_promote(0.9, 0.8, baseline=0.5)[0]
    promote, reason = registry.should_promote(0.6, 0.5, metric="test_balanced_accuracy")
    assert promote and reason.startswith("test_balanced_accuracy 0.6000 beats")


def test_champion_alias_moves_only_to_a_better_model(in_tmp):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment("champion-test")  # in this store, not one an earlier test made active
    client = mlflow.MlflowClient()

    def log(acc):
        with mlflow.start_run():
            mlflow.log_dict({"acc": acc}, "model/MLmodel")
            uri = f"runs:/{mlflow.active_run().info.run_id}/model"
            return registry.register_and_promote(uri, "m", {"test_accuracy": acc})

    assert log(0.80)[:2] == ("1", True)
    assert log(0.75)[:2] == ("2", False)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    version, promoted, reason = log(0.85)
    assert (version, promoted) == ("3", True) and "beats" in reason
    assert str(client.get_model_version_by_alias("m", "champion").version) == "3"
    assert client.get_model_version("m", "2").tags["test_accuracy"] == "0.750000"


def test_the_champion_rule_compares_the_selection_metric(in_tmp):
    """On imbalanced data the champion is the better balanced accuracy, not the
    better accuracy; a champion registered before the metric was tagged is
    compared by its test accuracy."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment("champion-select")
    client = mlflow.MlflowClient()

    def log(scores, metric):
        with mlflow.start_run():
            mlflow.log_dict({}, "model/MLmodel")
            uri = f"runs:/{mlflow.active_run().info.run_id}/model"
            return registry.register_and_promote(uri, "b", scores, metric)

    balanced = "test_balanced_accuracy"
    assert log({"test_accuracy": 0.7}, "test_accuracy")[:2] == ("1", True)  # no balanced accuracy tag
    assert log({"test_accuracy": 0.95, balanced: 0.6}, balanced)[:2] == ("2", False)  # 0.6 against 0.7
    assert log({"test_accuracy": 0.90, balanced: 0.8}, balanced)[:2] == ("3", True)
    assert log({"test_accuracy": 0.97, balanced: 0.75}, balanced)[:2] == ("4", False)  # more accurate, less balanced
    assert str(client.get_model_version_by_alias("b", "champion").version) == "3"
    tags = client.get_model_version("b", "4").tags
    assert tags[balanced] == "0.750000" and tags["selected_by"] == balanced


def _classifier():
    """A tiny classifier shaped like the pipeline's: images -> pool -> head."""
    import keras

    from transferlab import head

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head.build_head(4, 3, 8, 0.0)(x), name="tiny")


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_flip_tta_and_temperature_inside_the_model_match_the_numpy_views_and_reload_safely(tmp_path, temperature):
    import keras

    from transferlab import evaluate, tta

    base = _classifier()
    images = np.random.default_rng(0).integers(0, 255, (5, 6, 6, 3)).astype(np.uint8)
    plain = base.predict(images, verbose=0)
    mirrored = base.predict(images[:, :, ::-1], verbose=0)
    assert not np.allclose(plain, mirrored)  # the mirror image is a different view
    views = tta.logit_views(tta.logits_model(base), images, 2, "flip")
    np.testing.assert_allclose(evaluate.softmax_views(views[:1]), plain, rtol=1e-5, atol=1e-6)
    expected = evaluate.softmax_views(views, temperature)
    if temperature == 1.0:
        np.testing.assert_allclose(expected, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    model = tta.with_tta(base, "flip", temperature)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)
    # Keras' own layers only: it loads where this package is not installed
    assert all(type(layer).__module__.startswith("keras.") for layer in model._flatten_layers())
    model.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert tta.with_tta(base, "none") is base


def test_expected_calibration_error_by_hand():
    from transferlab import evaluate

    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.62, 0.38], [0.32, 0.68]])
    y = np.array([0, 1, 0, 1])
    # 15 bins: 0.9 (2 samples, accuracy 0.5, gap 0.4), 0.62 (1, accuracy 1, gap 0.38), 0.68 (1, accuracy 1, gap 0.32)
    assert evaluate.expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.4 + 0.25 * 0.38 + 0.25 * 0.32)
    assert evaluate.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_fitted_temperature_recovers_the_one_that_made_the_labels():
    from transferlab import evaluate

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(20000, 5))
    truth = 2.0  # labels drawn from softmax(logits / 2): the logits are overconfident by 2x
    probs = evaluate.softmax_views([logits], truth)
    y = np.array([rng.choice(5, p=p) for p in probs])
    fitted = evaluate.fit_temperature([logits], y)
    assert fitted == pytest.approx(truth, rel=0.05)
    assert evaluate.nll(evaluate.softmax_views([logits], fitted), y) < evaluate.nll(evaluate.softmax_views([logits]), y)
    calibrated = evaluate.expected_calibration_error(evaluate.softmax_views([logits], fitted), y)
    assert calibrated < 0.5 * evaluate.expected_calibration_error(evaluate.softmax_views([logits]), y)


def test_evaluate_model_keeps_a_temperature_only_where_it_lowers_val_nll():
    from transferlab import evaluate

    base = _classifier()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (40, 6, 6, 3)).astype(np.uint8)
    y = rng.integers(0, 3, 40)
    result = evaluate.evaluate_model(base, x, y, ["a", "b", "c"], 8, "flip", x, y)
    assert result["val_nll"] <= result["val_nll_before_calibration"]
    if result["temperature"] != 1.0:
        assert result["val_nll"] < result["val_nll_before_calibration"]
    np.testing.assert_allclose(result["model"].predict(x, verbose=0), result["probs"], atol=1e-5)
    off = evaluate.evaluate_model(base, x, y, ["a", "b", "c"], 8, "flip", x, y, calibrate=False)
    assert off["temperature"] == 1.0 and "val_nll" not in off


def test_a_temperature_that_raises_val_nll_is_not_kept(monkeypatch):
    from transferlab import evaluate

    base = _classifier()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, (30, 6, 6, 3)).astype(np.uint8)
    y = base.predict(x, verbose=0).argmax(axis=1)  # labels the model gets right: a high T only hurts
    monkeypatch.setattr(evaluate, "fit_temperature", lambda views, y: 20.0)
    result = evaluate.evaluate_model(base, x, y, ["a", "b", "c"], 8, "none", x, y)
    assert result["temperature"] == 1.0
    assert result["val_nll"] == result["val_nll_before_calibration"]
    assert result["model"] is base


def _fixed_linear_classifier(weight: np.ndarray, bias: np.ndarray):
    """uint8 8x8x3 images -> pixels in [0, 1] -> a Dense "predictions" with the given
    weights -> softmax: the layout `tta.logits_model` reads."""
    import keras

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Flatten(name="pool")(keras.layers.Rescaling(1 / 255)(inputs))
    h_in = keras.Input((192,))
    dense = keras.layers.Dense(2, name="predictions")
    h = keras.Model(h_in, keras.layers.Activation("softmax", name="probabilities")(dense(h_in)), name="head")
    dense.set_weights([weight.astype(np.float32), bias.astype(np.float32)])
    return keras.Model(inputs, h(x), name="fixed")


LEFT_MINUS_RIGHT = np.concatenate([np.ones((8, 4, 3)), -np.ones((8, 4, 3))], axis=1).reshape(-1)


def test_auto_tta_drops_flips_where_the_mirror_image_is_another_class():
    from transferlab import evaluate

    w = np.stack([LEFT_MINUS_RIGHT, -LEFT_MINUS_RIGHT], axis=1) * 0.1
    model = _fixed_linear_classifier(w, np.zeros(2))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    x = rng.integers(0, 60, (60, 8, 8, 3))
    x[y == 0, :, :4] += 150  # class 0: the bright half on the left; class 1: on the right
    x[y == 1, :, 4:] += 150
    x = x.astype(np.uint8)
    result = evaluate.evaluate_model(model, x, y, ["left", "right"], 16, "auto", x, y)
    assert result["tta"] == "none" and result["val_nll_flip"] > result["val_nll_single_view"]
    assert result["test_accuracy"] == 1.0
    assert not any(layer.name.startswith("tta_flip") for layer in result["model"]._flatten_layers())
    # every validation image right: no temperature is fitted to sharpen it further
    assert result["temperature"] == 1.0 and result["val_nll"] == result["val_nll_before_calibration"]


def test_auto_tta_keeps_flips_where_they_average_out_noise():
    from transferlab import evaluate

    # brightness decides the class; a left-right term adds noise that the mirror image cancels
    w0 = 0.1 * np.ones(192) + 0.5 * LEFT_MINUS_RIGHT
    model = _fixed_linear_classifier(np.stack([w0, -w0], axis=1), np.array([-9.6, 9.6]))
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    x = np.clip(np.where(y[:, None, None, None] == 0, 150, 105) + rng.normal(0, 60, (400, 8, 8, 3)), 0, 255)
    x = x.astype(np.uint8)
    result = evaluate.evaluate_model(model, x, y, ["bright", "dark"], 64, "auto", x, y)
    assert result["tta"] == "flip" and result["val_nll_flip"] < result["val_nll_single_view"]
    assert result["test_accuracy"] > result["test_accuracy_single_view"]
    assert any(layer.name.startswith("tta_flip") for layer in result["model"]._flatten_layers())


def test_the_raw_pixel_baseline_learns_what_pixels_tell_and_no_more():
    from transferlab import evaluate

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.integers(0, 80, (300, 48, 48, 3))
    for c in range(3):
        x[y == c, :, :, c] += 150  # the class is the dominant colour
    x = x.astype(np.uint8)
    easy = evaluate.pixel_baseline(x[:200], y[:200], x[200:], y[200:], seed=0)
    assert easy["baseline_test_accuracy"] > 0.95 and easy["baseline_train_images"] == 200
    noise = rng.integers(0, 255, (300, 48, 48, 3)).astype(np.uint8)  # labels pixels cannot tell
    assert evaluate.pixel_baseline(noise[:200], y[:200], noise[200:], y[200:], seed=0)["baseline_test_accuracy"] < 0.6
    assert evaluate._pixels(x[:2], 32).shape == (2, 32 * 32 * 3)  # larger images are shrunk first


def test_the_raw_pixel_baseline_weighs_imbalanced_classes_as_the_fine_tune_does():
    from transferlab import evaluate
    from transferlab.train import selection

    rng = np.random.default_rng(0)
    y, y_test = np.r_[np.zeros(190, int), np.ones(10, int)], np.r_[np.zeros(100, int), np.ones(100, int)]
    x, x_test = (rng.integers(0, 200, (len(labels), 8, 8, 3)) + 25 * labels[:, None, None, None]
                 for labels in (y, y_test))  # the rare class a little brighter
    weights = selection.resolve("auto", "auto", np.bincount(y)).class_weight
    plain = evaluate.pixel_baseline(x.astype(np.uint8), y, x_test.astype(np.uint8), y_test, seed=0)
    weighted = evaluate.pixel_baseline(x.astype(np.uint8), y, x_test.astype(np.uint8), y_test, seed=0,
                                       class_weight=weights)
    assert plain["baseline_test_balanced_accuracy"] < 0.7 < 0.85 < weighted["baseline_test_balanced_accuracy"]
