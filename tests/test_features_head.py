import json

import keras
import numpy as np
import pytest

from transferlab import backbones, features, head
from transferlab.train import recipe as recipes


def test_extract_streams_in_batches_and_matches_predict(tmp_path):
    model = backbones.build_feature_extractor("efficientnet_lite0", 16, 32, weights=None)
    x = np.random.default_rng(0).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    mmap = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = features.extract(model, mmap, batch_size=4)  # 4 + 4 + 2
    assert out.shape == (10, 1280) and out.dtype == np.float32
    np.testing.assert_allclose(out, model.predict(x, verbose=0), atol=1e-5)


def test_extract_splits_writes_features_and_meta(tmp_path):
    model = backbones.build_feature_extractor("mobilenetv2", 16, 32, weights=None)
    rng = np.random.default_rng(0)
    x = {s: rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8) for s, n in [("train", 6), ("val", 2), ("test", 3)]}
    out = tmp_path / "feats"
    meta = features.extract_splits(model, x, out, 4, {"backbone": "mobilenetv2"})
    feats, meta2 = features.load_features(out)
    # val_flip: the validation images' mirror images, for the head's mirror check (train.mirror)
    assert {s: len(f) for s, f in feats.items()} == {"train": 6, "val": 2, "test": 3, "val_flip": 2}
    assert meta == meta2 and meta["feature_dim"] == 1280 and meta["val_flip_index"] == [0, 1]
    assert json.loads((out / "meta.json").read_text())["timings"]["train"]["images"] == 6
    assert not list(tmp_path.glob(".feats-*"))  # no temporary folder left behind


def test_the_mirrored_validation_features_are_those_of_the_mirror_images(tmp_path, monkeypatch):
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))  # keeps where things are: a mirror changes it
    rng = np.random.default_rng(1)
    x = {s: rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8) for s, n in [("train", 2), ("val", 7), ("test", 0)]}
    monkeypatch.setattr(features.mirror, "CHECK_IMAGES", 4)  # at most 4 of the 7, evenly spaced
    meta = features.extract_splits(model, x, tmp_path / "feats", 3, {})
    feats, _ = features.load_features(tmp_path / "feats")
    assert meta["val_flip_index"] == [0, 2, 4, 6]
    mirrored = model.predict(x["val"][[0, 2, 4, 6], :, ::-1], verbose=0)
    np.testing.assert_allclose(feats["val_flip"], mirrored, rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats["val_flip"], feats["val"][[0, 2, 4, 6]], atol=1e-3)


def test_load_features_names_the_missing_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro features"):
        features.load_features(tmp_path / "none")


def test_head_layers_are_named():
    model = head.build_head(32, 4, units=16, dropout=0.2)
    assert [layer.name for layer in model.layers] == ["features", "head_dense", "head_dropout", "predictions", "probabilities"]
    assert model.output_shape == (None, 4)


def test_head_learns_separable_features_and_stops_early():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 4
    y = rng.integers(0, 3, 600)
    x = (centers[y] + rng.normal(size=(600, 16))).astype(np.float32)
    model = head.build_head(16, 3, units=32, dropout=0.1)
    hist = head.train_head(model, x[:500], y[:500], x[500:], y[500:], optimizer="adam",
                           learning_rate=1e-2, epochs=100, batch_size=64, patience=3, verbose=0)
    assert len(hist.history["loss"]) < 100  # early stopping fired
    acc = (model.predict(x[500:], verbose=0).argmax(1) == y[500:]).mean()
    assert acc > 0.95


@pytest.mark.parametrize("name", recipes.OPTIMIZERS)
def test_optimizers(name):
    opt = recipes.make_optimizer(name, 1e-3, weight_decay=1e-5)
    kinds = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD,
             "rmsprop": keras.optimizers.RMSprop}
    assert type(opt) is kinds[name]
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(1e-3)
    assert opt.weight_decay == pytest.approx(1e-5)
    if name == "sgd":
        assert opt.momentum == pytest.approx(0.9) and opt.nesterov
    assert not recipes.make_optimizer(name, 1e-3, weight_decay=0.0).weight_decay  # 0 means none, adamw too
    if name == "adamw":  # none given (the head): Keras' default
        assert recipes.make_optimizer(name, 1e-3).weight_decay == pytest.approx(1e-4)
