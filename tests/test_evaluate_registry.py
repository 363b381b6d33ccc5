import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from transferlab import evaluate, tracking


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


def test_should_promote():
    assert tracking.should_promote(0.8, None)[0]
    assert tracking.should_promote(0.81, 0.8)[0]
    promote, reason = tracking.should_promote(0.8, 0.8)
    assert not promote and "does not beat" in reason
    assert not tracking.should_promote(0.7, 0.8)[0]


def test_champion_alias_moves_only_to_a_better_model(in_tmp):
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment("champion-test")  # in this store, not one an earlier test made active
    client = mlflow.MlflowClient()

    def log(acc):
        with mlflow.start_run():
            mlflow.log_dict({"acc": acc}, "model/MLmodel")
            uri = f"runs:/{mlflow.active_run().info.run_id}/model"
            return tracking.register_and_promote(uri, "m", acc)

    assert log(0.80)[:2] == ("1", True)
    assert log(0.75)[:2] == ("2", False)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    version, promoted, reason = log(0.85)
    assert (version, promoted) == ("3", True) and "beats" in reason
    assert str(client.get_model_version_by_alias("m", "champion").version) == "3"
    assert client.get_model_version("m", "2").tags["test_accuracy"] == "0.750000"


def test_flip_tta_model_is_the_mean_over_image_and_mirror_and_reloads_safely(tmp_path):
    import keras

    from transferlab import tta

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Flatten()(inputs)
    base = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    images = np.random.default_rng(0).integers(0, 255, (5, 6, 6, 3)).astype(np.uint8)
    plain = base.predict(images, verbose=0)
    mirrored = base.predict(images[:, :, ::-1], verbose=0)
    assert not np.allclose(plain, mirrored)  # the mirror image is a different view
    with_tta = tta.with_tta(base, "flip")
    np.testing.assert_allclose(with_tta.predict(images, verbose=0), (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    probs, single = tta.predict_tta(base, images, 2, "flip")
    np.testing.assert_allclose(probs, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single, plain, rtol=1e-5, atol=1e-6)
    with_tta.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), probs, rtol=1e-5, atol=1e-6)
    assert tta.with_tta(base, "none") is base
