"""bench/scratch.py, the from-scratch peer (airbench94 in Keras), on tiny synthetic
images: the whitening, the schedule and rates, the architecture, training, the
augmentation and the test-time augmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import synth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import scratch  # noqa: E402

SMALL = (8, 16, 16)  # widths that train in seconds


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(synth.CLASSES), 192)
    return np.stack([synth.class_image(int(label), rng) for label in y]), y


def small_model(x, classes=len(synth.CLASSES)):
    import keras

    keras.utils.set_random_seed(0)
    model = scratch.build_model(*scratch.channel_stats(x), classes=classes, widths=SMALL)
    scratch.set_whitening(model, x)
    return model


def test_the_whitening_layer_decorrelates_the_training_patches(images):
    import keras

    x, _ = images
    model = small_model(x)
    whiten = keras.Model(model.input, model.get_layer("whiten").output)
    out = whiten(x.astype(np.float32)).numpy().reshape(-1, 24).astype(np.float64)
    cov = out[:, :12].T @ out[:, :12] / len(out)  # uncentred, as the reference estimates it
    diag = np.diag(cov)
    assert np.abs(cov - np.diag(diag)).max() < 1e-3
    # eigenvalue / (eigenvalue + eps): close to 1, the largest eigenvalue first
    assert diag.min() > 0.9 and diag.max() < 1 + 1e-4 and np.all(np.diff(diag) < 1e-6)
    np.testing.assert_allclose(out[:, 12:], -out[:, :12], atol=1e-5)
    assert all("whiten/kernel" != v.path for v in model.trainable_variables)  # frozen


def test_the_whitening_is_fitted_on_every_class_when_the_images_come_class_by_class(images, monkeypatch):
    # an image folder is read one class after another: the first WHITEN_IMAGES would be one class
    x, y = images
    order = np.argsort(y, kind="stable")
    x, y = x[order], y[order]
    n = int(np.sum(y == y[0]))  # as many as the first class holds
    monkeypatch.setattr(scratch, "WHITEN_IMAGES", n)
    fitted = []
    kernel = scratch.whitening_kernel
    monkeypatch.setattr(scratch, "whitening_kernel", lambda sample, *a: fitted.append(sample) or kernel(sample, *a))
    small_model(x)
    (sample,) = fitted
    rows = [np.flatnonzero((x == image).all(axis=(1, 2, 3)))[0] for image in sample]
    assert len(sample) == n and len(set(y[rows])) == len(synth.CLASSES)


def test_schedule_and_rates_are_the_references():
    steps = scratch.total_steps(50_000, 1024, 9.9)
    assert steps == 476  # 48 full batches an epoch, 9.9 epochs
    s = scratch.schedule(steps)
    peak = int(0.23 * steps)
    assert len(s) == steps + 1 and s[0] == pytest.approx(0.2) and s[-1] == pytest.approx(0.07)
    assert s.argmax() == peak and s[peak] == 1.0
    assert np.all(np.diff(s[:peak + 1]) > 0) and np.all(np.diff(s[peak:]) < 0)
    # lr 11.5 and decay 0.0153 per 1024 examples, through 1024 * (1 + 1 / (1 - 0.85))
    r = scratch.rates(1024)
    assert r["lr"] == pytest.approx(1.46484e-3, rel=1e-5) and r["bias_lr"] == pytest.approx(0.09375)
    assert r["l2"] * r["lr"] == pytest.approx(1.99567e-3, rel=1e-5)  # the decay per step
    assert r["bias_l2"] * r["bias_lr"] == pytest.approx(r["l2"] * r["lr"])  # the same decay for the biases


def test_the_network_is_the_papers(images):
    import keras

    x, _ = images
    keras.utils.set_random_seed(0)
    model = scratch.build_model(*scratch.channel_stats(x))
    assert model.output_shape == (None, 10) and model(x[:2].astype(np.float32)).shape == (2, 10)
    # 1.97 M parameters: the whitening kernel (frozen) and every trained weight; no BatchNorm scale
    trained = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trained + 2 * 2 * 3 * 24 == 1_971_640
    assert not any(v.path.endswith("gamma") for v in model.weights)
    kernel = model.get_layer("group2_conv1").kernel.numpy()  # 64 in, 256 out
    identity = np.zeros((3, 3, 64, 64))
    identity[1, 1] = np.eye(64)
    np.testing.assert_array_equal(kernel[..., :64], identity)
    bound = 1 / np.sqrt(3 * 3 * 64)
    assert np.abs(kernel[..., 64:]).max() <= bound and np.abs(kernel[..., 64:]).max() > 0.9 * bound


def test_training_lowers_the_loss_and_freezes_what_the_recipe_freezes(images):
    x, y = images
    model = small_model(x)
    kernel = model.get_layer("whiten").kernel.numpy()
    biases = []
    losses = scratch.train(model, x, y, epochs=6, batch_size=64,
                           on_epoch=lambda epoch: biases.append(model.get_layer("whiten").bias.numpy()))
    assert len(losses) == 18 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])
    np.testing.assert_array_equal(model.get_layer("whiten").kernel.numpy(), kernel)
    # the whitening bias trains for the first 3 epochs only
    assert np.abs(biases[2] - biases[0]).max() > 0 and np.abs(biases[2]).max() > 0
    for later in biases[3:]:
        np.testing.assert_array_equal(later, biases[2])


def test_augment_translates_and_mirrors(images):
    x = images[0][:2]
    pad = scratch.TRANSLATE
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    same = scratch.augment(padded, np.full((2, 2), pad, np.int32), np.array([False, True])).numpy()
    np.testing.assert_array_equal(same[0], x[0])
    np.testing.assert_array_equal(same[1], x[1, :, ::-1])
    moved = scratch.augment(padded, np.array([[0, 4], [4, 0]], np.int32), np.array([False, False])).numpy()
    np.testing.assert_array_equal(moved[0, 2:, :-2], x[0, :-2, 2:])  # down 2 px, left 2 px
    np.testing.assert_array_equal(moved[1, :-2, 2:], x[1, 2:, :-2])


def test_tta_weighs_the_six_views_as_the_reference(images):
    x = images[0][:4]
    model = small_model(images[0])

    def logits(v):
        return model(np.ascontiguousarray(v).astype(np.float32), training=False).numpy()

    def mirror(v):
        return 0.5 * logits(v) + 0.5 * logits(v[:, :, ::-1])

    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    expected = 0.5 * mirror(x) + 0.25 * mirror(padded[:, :32, :32]) + 0.25 * mirror(padded[:, 2:, 2:])
    np.testing.assert_allclose(scratch.predict(model, x, tta=True), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scratch.predict(model, x), logits(x), rtol=1e-4, atol=1e-5)
