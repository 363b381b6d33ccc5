"""BatchNorm folded into convolutions: every backbone computes the same outputs,
a folded model trains the same variables with the original's gradients, and a
BatchNorm layer that trains (batch statistics) is never folded."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainkit
from transferlab import backbones, features
from transferlab.backbones import BACKBONES
from transferlab.folding import Folded, FoldedConvBN, fold_batchnorm
from transferlab.head import build_head
from transferlab.train import checkpoint as checkpoints
from transferlab.train import surgery

NAMES = sorted(BACKBONES)


def _random_statistics(model: keras.Model, seed: int = 0) -> None:
    """BatchNorm statistics far from the identity (fresh layers have mean 0,
    variance 1, gamma 1, beta 0, which a wrong fold could still get right), and
    convolution biases that are not zero."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {"gamma": rng.uniform(0.5, 1.5, n), "beta": rng.normal(0, 0.2, n),
                      "moving_mean": rng.normal(0, 0.2, n), "moving_variance": rng.uniform(0.5, 1.5, n)}
            for name, value in values.items():
                if getattr(layer, name, None) is not None:
                    getattr(layer, name).assign(value.astype("float32"))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape[0]).astype("float32"))  # ResNet's are zero


def _layers(model: keras.Model) -> list:
    out = []
    for layer in model.layers:
        out += [layer, *(_layers(layer) if isinstance(layer, keras.Model) else [])]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_folded_computes_the_same_features(name, monkeypatch):
    model = backbones.build_feature_extractor(name, image_size=16, input_size=32, weights=None)
    _random_statistics(model.get_layer(f"{name}_body"))
    folded = fold_batchnorm(model, trained=False)
    x = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3)).astype(np.uint8)
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(folded(x, training=False)), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in _layers(model))
    n_folded = sum(isinstance(layer, FoldedConvBN) for layer in _layers(folded))
    if n_bn:  # every BatchNorm of these backbones follows a convolution: all fold for inference
        assert n_folded == n_bn
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in _layers(folded))
    else:  # VGG has none: the model itself
        assert folded is model
    # the extraction the stages run (features, evaluate) is the folded model's, and the same
    folds = []
    monkeypatch.setattr(features, "fold_batchnorm", lambda m, **kw: folds.append(m) or fold_batchnorm(m, **kw))
    out = features.extract(model, x, batch_size=3)
    assert folds == [model]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _lite_classifier(train_bn: bool = False, train_depthwise: bool = True):
    spec = backbones.get("efficientnet_lite0")
    body = backbones.build_body(spec.name, 64, weights=None)
    _random_statistics(body)
    head = build_head(1280, 10, 8, 0.0)
    t = trainkit.build(spec, body, head, unfreeze=3, y_train=np.zeros(8, int), y_val=np.zeros(0, int),
                         batch_size=4, seed=0, images=(np.zeros((8, 16, 16, 3), np.uint8), None), image_size=16,
                         input_size=64, train_bn=train_bn, train_depthwise=train_depthwise)
    return spec, body, head, t


def test_the_fine_tune_trains_the_folded_model_with_the_originals_gradients():
    spec, body, head, t = _lite_classifier()
    original = surgery.assemble(spec, body, head, 16, 64)
    folded = [layer for layer in _layers(t.model) if isinstance(layer, FoldedConvBN)]
    assert len(folded) == sum(isinstance(layer, keras.layers.BatchNormalization) for layer in body.layers)
    # the same variables, in the same order: what the optimizer steps is the original model's
    assert len(t.model.trainable_variables) == len(original.trainable_variables) > 2
    assert all(a is b for a, b in zip(t.model.trainable_variables, original.trainable_variables))
    x = np.random.default_rng(2).integers(0, 255, (4, 16, 16, 3)).astype(np.uint8)
    y = np.array([0, 3, 5, 9])

    def gradients(model):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(tf.math.log(tf.gather(model(x, training=False), y, batch_dims=1)))
        return tape.gradient(loss, model.trainable_variables)

    for got, want in zip(gradients(t.model), gradients(original)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3,
                                   atol=1e-4 * float(np.abs(want).max()))
    # a step of the folded model moves the original's weights
    kernel = body.get_layer("top_conv").kernel
    before = np.array(kernel)
    t.model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    t.model.train_on_batch(x, y)
    assert not np.allclose(np.array(kernel), before)


def test_batchnorm_that_trains_is_not_folded():
    """train_bn: the unfrozen blocks' BatchNorm layers normalise by the batch in
    training; folded, they would use the moving statistics."""
    spec, body, head, t = _lite_classifier(train_bn=True)
    trains = [layer.name for layer in body.layers
              if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    frozen = [layer.name for layer in body.layers
              if isinstance(layer, keras.layers.BatchNormalization) and not layer.trainable]
    assert trains and frozen
    folded_body = fold_batchnorm(body, trained=True)
    kinds = {layer.name: type(layer) for layer in folded_body.layers}
    assert all(kinds[name] is keras.layers.BatchNormalization for name in trains)
    assert all(kinds[name] is Folded for name in frozen)
    x = np.random.default_rng(3).normal(size=(8, 64, 64, 3)).astype("float32")
    inference = np.asarray(body(x, training=False))
    want = np.asarray(body(x, training=True))  # batch statistics (a tiny batch's: far from the moving ones)
    got = np.asarray(folded_body(x, training=True))
    # close to the batch-normalised output, relative to how far the moving statistics' output is from it
    assert np.linalg.norm(got - want) < 0.02 * np.linalg.norm(inference - want)


def test_folded_model_runs_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        body = backbones.build_body("efficientnet_lite0", 32, weights=None)
        _random_statistics(body)
        body.trainable = False
        folded = fold_batchnorm(body, trained=False)
        x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype("float32")
        got, want = np.asarray(folded(x), np.float32), np.asarray(body(x, training=False), np.float32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # bfloat16 keeps 8 bits of mantissa


def test_the_registered_model_with_flips_and_temperature_folds_and_predict_uses_it(tmp_path, monkeypatch):
    """The model evaluate registers calls the classifier twice (the image and its
    mirror): folded, both calls share one folded body, and the probabilities are
    the same; `transferlab predict` runs that folded model."""
    from transferlab import folding, predict, tta

    spec = backbones.get("efficientnet_lite0")
    body = backbones.build_body(spec.name, 32, weights=None)
    _random_statistics(body)
    classifier = surgery.assemble(spec, body, build_head(1280, 3, 8, 0.0), 16, 32)
    registered = tta.with_tta(classifier, "flip", temperature=1.5)
    registered.save(tmp_path / "model.keras")
    loaded = predict.load(path=tmp_path / "model.keras")
    x = np.random.default_rng(5).integers(0, 255, (4, 16, 16, 3)).astype(np.uint8)
    folded = fold_batchnorm(loaded.model, trained=False)
    assert any(isinstance(layer, FoldedConvBN) for layer in _layers(folded))
    want = np.asarray(loaded.model(x, training=False))
    np.testing.assert_allclose(np.asarray(folded(x, training=False)), want, rtol=1e-4, atol=1e-6)

    folds = []
    monkeypatch.setattr(folding, "fold_batchnorm", lambda m, **kw: folds.append(m) or fold_batchnorm(m, **kw))
    from PIL import Image

    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    rows, _ = predict.predict(loaded, [tmp_path / f"{i}.png" for i in range(4)], top_k=1, progress=False)
    assert folds[0] is loaded.model  # (then its nested models, folded in turn)
    for row, p in zip(rows, want):
        assert row["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def test_a_checkpoint_of_another_weights_layout_is_never_resumed(in_tmp, monkeypatch):
    """The fine-tune's checkpoints hold the folded model's weights: one an older
    version wrote (unfolded) is another key, removed, not loaded into this one."""
    from transferlab.stages import MODELS
    from transferlab.stages import finetune as stage

    (MODELS / "head").mkdir(parents=True)
    (MODELS / "head" / "model.keras").write_bytes(b"a head")
    layout = checkpoints.CHECKPOINT_LAYOUT
    monkeypatch.setattr(checkpoints, "CHECKPOINT_LAYOUT", "unfolded")
    old = checkpoints.keyed_directory(stage.CHECKPOINTS, "params", MODELS / "head" / "model.keras")
    old.mkdir(parents=True)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_LAYOUT", layout)
    new = checkpoints.keyed_directory(stage.CHECKPOINTS, "params", MODELS / "head" / "model.keras")
    assert new == checkpoints.keyed_directory(stage.CHECKPOINTS, "params", MODELS / "head" / "model.keras") != old
    assert not old.exists()
