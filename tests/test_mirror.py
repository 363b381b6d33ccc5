"""flip: auto: the head's check whether a horizontal mirror keeps the labels,
and the fine-tune's flips and evaluate's test-time flips following it."""

import json

import keras
import numpy as np
import pytest
from PIL import Image

import tinyproject
from transferlab import config
from transferlab.stages import evaluate, features, finetune, head, prepare
from transferlab.train import mirror, trainer
from transferlab.train.recipe import Recipe


def test_a_mirror_changes_the_labels_when_accuracy_drops_beyond_chance_and_two_points():
    y = np.zeros(1000, int)
    right = np.zeros(1000, int)
    assert not mirror.check(y, right, np.r_[np.zeros(900, int), np.ones(100, int)]).keeps_labels  # -10 points
    # one point lost of a thousand images: within what a mirror may cost
    assert mirror.check(y, right, np.r_[np.zeros(990, int), np.ones(10, int)]).keeps_labels
    # 3 points, but of 40 images: one image, chance
    small = mirror.check(y[:40], right[:40], np.r_[np.zeros(39, int), np.ones(1, int)])
    assert small.keeps_labels and (small.lost, small.gained) == (1, 0)
    # as many gained as lost: no drop
    plain = np.r_[np.zeros(900, int), np.ones(100, int)]
    assert mirror.check(y, plain, plain[::-1]).keeps_labels
    check = mirror.check(y[:100], right[:100], np.r_[np.zeros(70, int), np.ones(30, int)])
    assert check.record() == {"mirror_keeps_labels": 0, "mirror_check_images": 100,
                              "mirror_val_accuracy": 1.0, "mirror_val_accuracy_mirrored": 0.7}


def test_auto_follows_the_heads_check_and_true_or_false_are_kept():
    changes = {"mirror_keeps_labels": 0, "mirror_val_accuracy": 0.95, "mirror_val_accuracy_mirrored": 0.5}
    flip, reason = mirror.resolve("auto", changes, "finetune.augment.flip")
    assert not flip and "changes the labels" in reason and "0.5000 mirrored" in reason
    assert mirror.resolve("auto", {**changes, "mirror_keeps_labels": 1}, "x")[0]
    assert mirror.resolve("auto", {}, "x")[0]  # no validation images: nothing to check on
    assert mirror.resolve(True, changes, "x")[0] and not mirror.resolve(False, {}, "x")[0]
    assert mirror.sample(10).tolist() == list(range(10))
    rows = mirror.sample(10 * mirror.CHECK_IMAGES)
    assert len(rows) == mirror.CHECK_IMAGES and rows[0] == 0 and rows[-1] == 10 * mirror.CHECK_IMAGES - 1


def test_a_recipe_needs_auto_resolved():
    f = config.from_dict(tinyproject.full_params(tinyproject.TINY)).finetune
    assert f.augment.flip == "auto"
    with pytest.raises(ValueError, match="auto"):
        Recipe.from_params(f, seed=0, batch_size=8)
    r = Recipe.from_params(f, seed=0, batch_size=8, flip=False)
    assert r.flip is False and r.augment["flip"] is False  # cached mode's and the full mode's alike


def ramp(kind: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A horizontal ramp dark to bright ("rising") or its mirror ("falling"), or a
    centred disc (mirror-symmetric), with noise."""
    xx = np.tile(np.linspace(0, 1, size), (size, 1))
    if kind == "rising":
        img = 40 + 180 * xx
    elif kind == "falling":
        img = 40 + 180 * xx[:, ::-1]
    else:
        yy = xx.T
        img = 40 + 180 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.1)
    img = img[..., None] + rng.normal(0, 15, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def chiral(tmp_path_factory):
    """The tiny pipeline on a set where a mirror turns one class into another
    (rising and falling ramps), through evaluate; the recipes the fine-tune built."""
    import os

    folder = tmp_path_factory.mktemp("chiral")
    rng = np.random.default_rng(3)
    for split, n in (("train", 20), ("test", 4)):
        for kind in ("disc", "falling", "rising"):
            (folder / "images" / split / kind).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(ramp(kind, rng)).save(folder / "images" / split / kind / f"{i:03d}.png")
    cwd, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)
    build, recipes = trainer.build, []

    def spy(spec, body, head_model, r, **kwargs):
        recipes.append(r)
        return build(spec, body, head_model, r, **kwargs)

    trainer.build = spy
    try:
        over = {**tinyproject.TINY, "data": {**tinyproject.TINY["data"], "source": "images", "val_min_per_class": 5},
                # VGG16's random weights (no BatchNorm) keep which way a ramp rises; Lite0's do not
                "backbone": {"name": "vgg16", "weights": "none", "input_size": 32},
                "finetune": {**tinyproject.TINY["finetune"], "unfreeze": 1},
                "head": {**tinyproject.TINY["head"], "epochs": 30, "patience": 10}}
        params = config.from_dict(tinyproject.full_params(over))
        for stage in (prepare, features, head, finetune, evaluate):
            stage.main(params)
        yield folder, recipes, params
    finally:
        trainer.build = build
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri


def test_where_a_mirror_changes_the_labels_neither_training_nor_test_time_flips(chiral):
    from transferlab import data
    from transferlab import features as features_lib
    from transferlab.stages import MODELS, features_dir

    folder, recipes, params = chiral
    read = lambda name: json.loads((folder / "metrics" / f"{name}.json").read_text())  # noqa: E731
    h, f, e = read("head"), read("finetune"), read("evaluate")
    # the head's check, from the features stage's mirrored validation features
    feats, meta = features_lib.load_features(folder / features_dir(params.backbone.name, params.backbone.input_size))
    assert len(feats["val_flip"]) == len(feats["val"]) == h["mirror_check_images"] == 15
    model = keras.saving.load_model(folder / MODELS / "head" / "model.keras")
    y_val = data.load_prepared(folder / "data/prepared").y["val"]
    plain = model.predict(feats["val"], verbose=0).argmax(1)
    mirrored = model.predict(feats["val_flip"], verbose=0).argmax(1)
    assert h["mirror_val_accuracy"] == pytest.approx(float((plain == y_val).mean()), abs=1e-5)
    assert h["mirror_val_accuracy_mirrored"] == pytest.approx(float((mirrored == y_val).mean()), abs=1e-5)
    assert h["mirror_keeps_labels"] == 0
    # the fine-tune trained without flips (the probe's build and the fit's), and says so
    assert recipes and all(r.flip is False and r.augment["flip"] is False for r in recipes)
    assert f["augment_flip"] == 0
    # evaluate: no test-time flips, whatever the validation NLL says
    assert e["tta_flip"] == 0 and "val_nll_flip" not in e
