"""Fine-tuning rules on every registered backbone (weights none), the cached
path, resume after an interruption."""

import json
import time
import types

import keras
import numpy as np
import pytest
from keras import layers

import tinyproject
import trainkit
from transferlab import backbones, budget, head
from transferlab.budget import callback, plans
from transferlab.budget.callback import StepBudget
from transferlab.train import checkpoint as checkpoints
from transferlab.train import recipe as recipes
from transferlab.train import schedule, surgery, trainer
from transferlab.backbones import BACKBONES

NAMES = sorted(BACKBONES)


def _train(t, *, steps=0, small_steps=0, replans=(), length=None, callbacks=(), verbose=0, **recipe):
    """trainer.fit for `steps` (or the recorded `replans`, or a `length` of the caller's); the
    StepBudget used is `history.length`."""
    length = length or StepBudget(steps=steps, replans=replans, small_steps=small_steps)
    hist = trainer.fit(t, trainkit.recipe(**recipe), length, callbacks=list(callbacks), verbose=verbose)
    hist.length = length
    return hist


def expected_trainable(spec, body, n):
    """Independent count: non-BN weights of layers in the top n blocks."""
    groups = backbones.layers_by_block(spec, body)
    top = groups[len(groups) - n:] if n else []
    return sum(len(layer.weights) for g in top for layer in g
               if not isinstance(layer, layers.BatchNormalization)
               and not isinstance(layer, layers.Normalization))


@pytest.mark.parametrize("name", NAMES)
def test_unfreeze_exactly_the_requested_blocks(name):
    spec = BACKBONES[name]
    body = backbones.build_body(name, 32, weights=None)
    for n in (0, 1, 2, "all"):
        count = surgery.set_trainable(spec, body, n)
        k = len(spec.blocks) if n == "all" else n
        assert count == expected_trainable(spec, body, k), f"{name} unfreeze={n}"
        assert not any(layer.trainable for layer in body.layers if isinstance(layer, layers.BatchNormalization))
    # the top block is really trainable, the bottom one really not
    surgery.set_trainable(spec, body, 1)
    groups = backbones.layers_by_block(spec, body)
    assert any(layer.trainable_weights for layer in groups[-1])
    assert not any(layer.trainable_weights for layer in groups[0])


@pytest.mark.parametrize("name", NAMES)
def test_split_at_the_boundary_is_the_same_function(name):
    spec = BACKBONES[name]
    body = backbones.build_body(name, 32, weights=None)
    split = surgery.split_body(spec, body, 2)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    whole = body(x, training=False).numpy()
    parts = split.upper(split.lower(x, training=False), training=False).numpy()
    np.testing.assert_allclose(parts, whole, rtol=1e-4, atol=1e-4)
    first_top = len(spec.blocks) - 2
    assert backbones.block_index(spec, split.boundary) == first_top - 1


def test_all_leaves_nothing_to_cache():
    spec = BACKBONES["efficientnet_lite0"]
    body = backbones.build_body("efficientnet_lite0", 32, weights=None)
    with pytest.raises(ValueError, match="no frozen part to cache"):
        surgery.split_body(spec, body, "all")


def _tiny_classifier(name="efficientnet_lite0", unfreeze="all"):
    spec = BACKBONES[name]
    body = backbones.build_body(name, 32, weights=None)
    hm = head.build_head(spec.feature_dim, 3, units=0, dropout=0.0)  # no ReLU to die
    surgery.set_trainable(spec, body, unfreeze)
    model = surgery.assemble(spec, body, hm, 16, 32)
    return spec, body, model


# efficientnetb0: BatchNorm everywhere and swish, so random weights still pass
# gradients (ReLU6 saturates on random weights and would hide a frozen layer).


def test_batchnorm_statistics_do_not_move_in_a_finetune_step():
    keras.utils.set_random_seed(0)
    spec, body, model = _tiny_classifier("efficientnetb0", unfreeze="all")
    bns = [layer for layer in body.layers if isinstance(layer, layers.BatchNormalization)]
    before = [[w.numpy().copy() for w in bn.weights] for bn in bns]
    conv = body.get_layer("top_conv")
    kernel_before = conv.kernel.numpy().copy()
    recipes.compile_model(model, "sgd", 0.1, None)
    x = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8)
    model.fit(x, np.arange(8) % 3, epochs=1, batch_size=8, verbose=0)
    for bn, old in zip(bns, before):
        for w, o in zip(bn.weights, old):
            np.testing.assert_array_equal(w.numpy(), o, err_msg=f"{bn.name}/{w.name} changed")
    assert not np.array_equal(conv.kernel.numpy(), kernel_before), "unfrozen weights did not train"


@pytest.mark.parametrize("cached", [False, True], ids=["full", "cached"])
def test_train_bn_trains_the_unfrozen_blocks_batchnorm_and_no_other(cached):
    """finetune.train_bn: the top blocks' BatchNorm layers learn gamma and beta and
    move their statistics; the frozen part's stay as they were, on both paths."""
    keras.utils.set_random_seed(0)
    spec = BACKBONES["efficientnet_lite0"]
    body = backbones.build_body(spec.name, 32, weights=None)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16, 16, 16, 3)).astype(np.uint8)
    y = np.arange(16) % 3
    images = activations = None
    if cached:
        acts = surgery.cache_extractor(spec, surgery.split_body(spec, body, 2), 16, 32).predict(x, verbose=0)[0]
        activations = {"train": acts, "val": acts[:4]}
    else:
        images = (x, x[:4])
    t = trainkit.build(spec, body, head.build_head(spec.feature_dim, 3, units=0, dropout=0.0), unfreeze=2,
                         y_train=y, y_val=y[:4], batch_size=8, seed=0, images=images, image_size=16,
                         input_size=32, activations=activations, flip=False, train_bn=True)
    groups = backbones.layers_by_block(spec, body)
    top = [layer for g in groups[-2:] for layer in g if isinstance(layer, layers.BatchNormalization)]
    rest = [layer for g in groups[:-2] for layer in g if isinstance(layer, layers.BatchNormalization)]
    assert top and rest and all(bn.trainable for bn in top) and not any(bn.trainable for bn in rest)
    before = {id(w): w.numpy().copy() for bn in top + rest for w in bn.weights}
    _train(t, optimizer="adam", learning_rate=1e-2, weight_decay=0.0, schedule="cosine", warmup_epochs=0,
                 steps=4, batch_size=8, callbacks=[], verbose=0)
    for bn in rest:
        for w in bn.weights:
            np.testing.assert_array_equal(w.numpy(), before[id(w)], err_msg=f"{bn.name}/{w.name} changed")
    for bn in top:
        for w in bn.weights:  # gamma, beta, moving mean and variance
            assert not np.array_equal(w.numpy(), before[id(w)]), f"{bn.name}/{w.name} did not train"


@pytest.mark.parametrize("train_depthwise", [True, False], ids=["trained", "kept"])
def test_train_depthwise_false_keeps_the_unfrozen_blocks_depthwise_kernels(train_depthwise):
    """finetune.train_depthwise: false keeps the top blocks' depthwise kernels as
    they were while their other convolutions train; true trains both."""
    keras.utils.set_random_seed(0)
    spec = BACKBONES["efficientnetb0"]  # swish: random weights pass gradients (see above)
    body = backbones.build_body(spec.name, 32, weights=None)
    x = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3)).astype(np.uint8)
    y = np.arange(16) % 3
    t = trainkit.build(spec, body, head.build_head(spec.feature_dim, 3, units=0, dropout=0.0), unfreeze=3,
                         y_train=y, y_val=y[:4], batch_size=8, seed=0, images=(x, x[:4]), image_size=16,
                         input_size=32, flip=False, train_depthwise=train_depthwise)
    top = [layer for g in backbones.layers_by_block(spec, body)[-3:] for layer in g]
    depthwise = [layer for layer in top if isinstance(layer, layers.DepthwiseConv2D)]
    convs = [layer for layer in top if type(layer) is layers.Conv2D]
    assert depthwise and convs
    before = {id(w): w.numpy().copy() for layer in depthwise + convs for w in layer.weights}
    _train(t, optimizer="adam", learning_rate=1e-2, weight_decay=0.0, schedule="cosine", warmup_epochs=0,
                 steps=4, batch_size=8, callbacks=[], verbose=0)
    def moved(group):
        return [layer.name for layer in group if not np.array_equal(layer.kernel.numpy(), before[id(layer.kernel)])]

    assert moved(convs), "no convolution of the unfrozen blocks trained"
    if train_depthwise:
        assert moved(depthwise), "no depthwise kernel trained"
    else:
        assert not moved(depthwise), f"depthwise kernels changed: {moved(depthwise)}"


def test_frozen_blocks_do_not_train():
    keras.utils.set_random_seed(0)
    spec, body, model = _tiny_classifier("efficientnetb0", unfreeze=1)
    frozen = body.get_layer("block1a_dwconv").kernel.numpy().copy()
    top = body.get_layer("top_conv").kernel.numpy().copy()
    recipes.compile_model(model, "sgd", 0.1, None)
    x = np.random.default_rng(1).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8)
    model.fit(x, np.arange(8) % 3, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(body.get_layer("block1a_dwconv").kernel.numpy(), frozen)
    assert not np.array_equal(body.get_layer("top_conv").kernel.numpy(), top)


def test_flip_cache_dataset_mixes_both_caches_reproducibly():
    plain = np.zeros((40, 2, 2, 1), np.float16)
    flipped = np.ones((40, 2, 2, 1), np.float16)
    y = np.arange(40)
    a = trainer.FlipCacheDataset(plain, flipped, y, 16, seed=3)
    b = trainer.FlipCacheDataset(plain, flipped, y, 16, seed=3)
    assert len(a) == 3
    xa, ya = a[0]
    xb, yb = b[0]
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    picked = np.concatenate([a[i][0].reshape(-1, 4)[:, 0] for i in range(len(a))])
    assert 0 < picked.mean() < 1  # some plain, some flipped
    assert sorted(np.concatenate([a[i][1] for i in range(len(a))]).tolist()) == list(range(40))


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_step(shape):
    lr = schedule.learning_rate_schedule(shape, 1e-2, total_steps=40, warmup_steps=10)
    values = [float(lr(s)) for s in (0, 10, 25, 39, 40, 60)]
    assert values[0] == pytest.approx(1e-3)
    assert values[1] == pytest.approx(1e-2, rel=1e-3)
    assert values[2] == pytest.approx(5e-3, rel=1e-3)  # half way down, both shapes
    assert 0 < values[3] < 1e-3
    assert values[4] == values[5] == 0.0  # zero at the end, and after it
    if shape == "linear":
        assert float(lr(17.5)) == pytest.approx(7.5e-3, rel=1e-3)
    else:
        assert float(lr(17.5)) == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 0.25)), rel=1e-3)
    assert schedule.learning_rate_schedule("plateau", 1e-3, 40, 10) == 1e-3


def test_total_steps_floor_in_steps_for_small_data_sets():
    assert schedule.total_steps(epochs=5, steps_per_epoch=352, min_steps=500) == 1760  # CIFAR-10: epochs rule
    assert schedule.total_steps(epochs=5, steps_per_epoch=22, min_steps=500) == 500  # 2,800 images: the floor
    assert schedule.total_steps(epochs=5, steps_per_epoch=22, min_steps=500, steps=77) == 77  # a replayed plan


def test_fit_takes_exactly_the_planned_steps_and_ends_at_zero_learning_rate(tmp_path):
    spec, body, model = _tiny_classifier()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 16, 16, 3)).astype(np.uint8)
    y = np.arange(40) % 3
    t = trainer.FineTuning(model, x, (x[:8], y[:8]), {"y": y, "batch_size": 8, "shuffle": True}, 40, "full")
    hist = _train(t, optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="linear",
                        warmup_epochs=0.2, steps=13, batch_size=8, callbacks=[recipes.LearningRateLogger()],
                        verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 13  # 2 epochs of 5 steps and 3 of a third
    assert len(hist.history["val_accuracy"]) == 3  # the partial epoch is validated too
    assert hist.history["learning_rate"][-1] == 0.0


class StepRates(keras.callbacks.Callback):
    """The learning rate of every optimizer step, as the optimizer computes it."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def _dense_training():
    """100 samples of 8 values, 3 classes, in batches of 2 (50 steps an epoch), a small dense model."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    y = np.arange(100) % 3
    model = head.build_head(8, 3, units=8, dropout=0.0)
    return model, trainer.FineTuning(model, x, (x[:4], y[:4]), {"y": y, "batch_size": 2, "shuffle": True}, 100,
                                    "full")


def _live(steps, answers, max_steps, per_epoch=50, monkeypatch=None):
    """A StepBudget planned live to `steps` of `per_epoch` an epoch, at most `max_steps`: each
    re-plan answers from `answers` ({steps done: steps}), else as it last answered; the steps
    done it was asked at are `length.asked`. (The budget's own re-plan arithmetic is
    test_budget's; here, what the callback does with the answers.)"""
    asked = []

    def replan(p, *, step_seconds, steps_done, seconds_left):
        asked.append(steps_done)
        assert step_seconds > 0
        return plans._planned_again(p, steps_done, answers.get(steps_done, p.steps))

    monkeypatch.setattr(plans, "replan", replan)
    plan = plans.Plan(budget_seconds=1e6, spent_seconds=0.0, evaluate_seconds=0.0, margin_seconds=0.0,
                      step_seconds=1.0, train_images_per_second=1.0, inference_images_per_second=1.0,
                      steps_per_epoch=per_epoch, steps=steps, epochs=steps / per_epoch, finetune_seconds=0.0,
                      max_steps=max_steps)
    length = StepBudget(plan=plan, live=True)
    length.asked = asked
    return length


def _fit_steps(steps, length=None, replans=(), warmup_epochs=0.8, extra=(), **kwargs):
    """100 samples in batches of 2: 50 steps an epoch; a warmup of 40 steps. A
    small dense model: the schedule and the re-plans do not depend on the network."""
    model, t = _dense_training()
    rates = StepRates()
    hist = _train(t, optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine",
                  warmup_epochs=warmup_epochs, steps=steps, batch_size=2, callbacks=[rates, *extra],
                  verbose=0, replans=replans, length=length, **kwargs)
    return int(model.optimizer.iterations.numpy()), rates.rates, hist


def test_a_replan_at_the_warmups_end_trains_what_a_run_of_that_length_trains(monkeypatch):
    """Planned 90 steps, 130 at the warmup's end (step 40), unchanged after each
    epoch: every step's learning rate is the one of a run of 130 from the start."""
    decide = _live(90, {40: 130}, 200, monkeypatch=monkeypatch)
    ran, rates, hist = _fit_steps(90, length=decide)
    plain_ran, plain_rates, _ = _fit_steps(130)
    assert ran == plain_ran == 130 and decide.asked == [40, 50, 100]  # the warmup's end, then every epoch's
    np.testing.assert_allclose(rates, plain_rates, rtol=1e-5)
    assert hist.length.replans == [[0, 90], [40, 130], [50, 130], [100, 130]]


def test_replans_after_every_epoch_follow_the_pace_and_replay_exactly(monkeypatch):
    """Re-planned at the warmup's end and after epochs 1 and 2 (the last much
    shorter: the machine slowed down): the rate goes on from where it was at
    each change and still ends annealed; the recorded replans replay the run
    step for step without asking anyone."""
    decide = _live(90, {40: 130, 50: 150, 100: 112}, 200, monkeypatch=monkeypatch)
    ran, rates, hist = _fit_steps(90, length=decide)
    assert ran == 112
    recorded = hist.length.replans
    assert recorded == [[0, 90], [40, 130], [50, 150], [100, 112]]
    peak = max(rates)
    assert abs(rates[100] - rates[99]) < 0.05 * peak  # no jump where the end moved
    assert 0 < rates[-1] < 0.05 * peak  # annealed at the new end
    replay_ran, replay_rates, _ = _fit_steps(90, replans=recorded)
    assert replay_ran == ran
    np.testing.assert_allclose(replay_rates, rates, rtol=1e-5)
    # and capped at the recipe's length
    assert _fit_steps(90, length=_live(90, {40: 500}, 120, monkeypatch=monkeypatch))[0] == 120


def test_a_warmup_too_short_to_time_is_planned_again_after_the_first_epoch(monkeypatch):
    decide = _live(60, {50: 70}, 200, monkeypatch=monkeypatch)
    ran, _, _ = _fit_steps(60, length=decide, warmup_epochs=0.2)
    assert ran == 70 and decide.asked == [50]  # a warmup of 10 steps: not timed; the epoch's 50 are


class StepClock(keras.callbacks.Callback):
    """A clock for the StepBudget's deadline that reads the optimizer steps done (it
    runs before the fit's own callbacks), and the validations run."""

    def __init__(self):
        super().__init__()
        self.now, self.validated = 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def on_train_batch_end(self, batch, logs=None):
        self.now = float(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_test_begin(self, logs=None):
        self.validated += 1


def test_a_deadline_ends_the_run_at_the_step_past_it_and_the_replay_stops_there(monkeypatch):
    """Planned 130 steps at the warmup's end; the window ends after step 70 (the
    machine slowed down after the last re-plan): the run stops at step 70, its
    partial epoch validated, with the rates of the planned run up to there; the
    stop is recorded as [70, 70] and the recorded replans replay it exactly."""
    clock = StepClock()
    decide = _live(90, {40: 130}, 200, monkeypatch=monkeypatch)
    decide.window_end = 70.0  # the plan's validation takes no time here: the stop is at the window's end
    monkeypatch.setattr(callback, "time", types.SimpleNamespace(monotonic=clock.monotonic,
                                                                perf_counter=time.perf_counter))
    ran, rates, hist = _fit_steps(90, length=decide, extra=[clock])
    assert ran == 70 and clock.validated == 2  # epoch 1, and the partial epoch 2
    assert hist.length.replans == [[0, 90], [40, 130], [50, 130], [70, 70]]
    assert decide.plan.steps == 70 and decide.plan.replans[-1] == [70, 70]  # the plan says where it stopped
    monkeypatch.undo()
    planned_ran, planned_rates, _ = _fit_steps(90, length=_live(90, {40: 130}, 200, monkeypatch=monkeypatch))
    assert planned_ran == 130
    np.testing.assert_allclose(rates, planned_rates[:70], rtol=1e-5)
    replay_ran, replay_rates, _ = _fit_steps(90, replans=hist.length.replans)
    assert replay_ran == 70
    np.testing.assert_allclose(replay_rates, rates, rtol=1e-5)
    # a deadline never passed changes nothing
    assert _fit_steps(90, length=_live(90, {40: 130}, 200, monkeypatch=monkeypatch))[0] == 130


class Weights(keras.callbacks.Callback):
    """The model's weights after every training step and when validation begins."""

    def __init__(self):
        super().__init__()
        self.after_step, self.validated = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.after_step.append([np.array(w) for w in self.model.trainable_weights])

    def on_test_begin(self, logs=None):
        self.validated.append((len(self.after_step), [np.array(w) for w in self.model.trainable_weights]))


def test_a_moving_average_of_the_weights_is_what_every_epoch_validates():
    """ema 0.9 over 130 steps of 50 an epoch: the average is written into the
    weights at each epoch's end (steps 50 and 100), and where the budget's stop
    ends the run mid-epoch (step 130), so that the partial epoch, too, is
    validated (and checkpointed) with the average, not its last step's weights."""
    _, t = _dense_training()
    seen = Weights()
    _train(t, optimizer="adam", learning_rate=1e-2, weight_decay=0.0, schedule="linear", warmup_epochs=0.1,
                 steps=130, batch_size=2, callbacks=[seen], verbose=0, ema=0.9)
    assert [step for step, _ in seen.validated] == [50, 100, 130]
    # the average, step by step, from the weights each step left: where the average was written
    # into them (the epochs' last steps), they are the average
    average = seen.after_step[0]  # Keras' average starts at the first step's weights
    for step, weights in enumerate(seen.after_step[1:], start=2):
        average = weights if step % 50 == 0 else [0.9 * a + 0.1 * w for a, w in zip(average, weights)]
    _, validated = seen.validated[-1]
    last_step = seen.after_step[-1]
    assert max(float(np.abs(v - a).max()) for v, a in zip(validated, average)) < 1e-5
    assert max(float(np.abs(v - w).max()) for v, w in zip(validated, last_step)) > 1e-3  # not the last step's


def _progressive(small_size=32, name="efficientnet_lite0"):
    spec = BACKBONES[name]
    body = backbones.build_body(spec.name, 64, weights=None, any_size=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 16, 16, 3)).astype(np.uint8)
    y = np.arange(40) % 3
    t = trainkit.build(spec, body, head.build_head(spec.feature_dim, 3, units=0, dropout=0.0), unfreeze=2,
                         y_train=y, y_val=y[:8], batch_size=8, seed=0, images=(x, x[:8]), image_size=16,
                         input_size=64, augment={"flip": True}, small_size=small_size)
    return spec, body, t


def _same(optimizer):  # under mixed precision (a GPU) compile wraps the optimizer in a loss scaler
    return getattr(optimizer, "inner_optimizer", optimizer)


def _fit_progressive(t, callbacks, steps=25, small=15, **kwargs):
    return _train(t, optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine",
                        warmup_epochs=0.2, steps=steps, batch_size=8, small_steps=small, verbose=0,
                        callbacks=callbacks, **kwargs)


@pytest.mark.heavy  # progressive resizing: test_progressive.py says why
def test_progressive_resizing_trains_the_first_epochs_small_then_goes_on_at_full_size():
    spec, body, t = _progressive()
    assert {id(v) for v in t.small.trainable_weights} == {id(v) for v in t.model.trainable_weights}  # shared
    sizes = tinyproject.input_sizes_callback()
    small = budget.small_steps(25, 5, 0.6)
    assert small == 15  # 3 whole epochs of 5 steps
    hist = _fit_progressive(t, [recipes.LearningRateLogger(), sizes], small=small)
    assert sizes.sizes == [32, 32, 32, 64, 64]
    # one optimizer, one schedule across the switch: the step counter goes on and the rate keeps decaying
    assert _same(t.model.optimizer) is _same(t.small.optimizer)
    assert int(t.model.optimizer.iterations.numpy()) == 25
    rates = hist.history["learning_rate"]
    assert len(rates) == 5 and rates[3] < rates[2] and rates[-1] == 0.0
    assert len(hist.history["val_accuracy"]) == 5 and hist.epoch == [0, 1, 2, 3, 4]  # both phases' epochs


@pytest.mark.heavy  # progressive resizing: test_progressive.py says why
def test_progressive_resizing_is_planned_again_once_the_full_size_trains(monkeypatch):
    """Planned 25 steps of 5 an epoch, the first 15 at 32 px: the re-plans time
    full-size steps only (none before step 15; none at its end either, whose
    epoch ran small), so 30 steps are planned after epoch 4, the extra epoch
    trains at the full size, and the recorded re-plans replay the run, sizes and
    learning rates alike. (Epochs of 5 steps: every step of one is timed here.)"""
    monkeypatch.setattr(StepBudget, "SKIP", 0)
    monkeypatch.setattr(StepBudget, "MIN_TIMED", 3)
    decide = _live(25, {20: 30}, 40, per_epoch=5, monkeypatch=monkeypatch)
    decide.small_steps = 15
    sizes, rates = tinyproject.input_sizes_callback(), StepRates()
    _, _, t = _progressive()
    hist = _fit_progressive(t, [sizes, rates], length=decide)
    assert decide.asked == [20, 25]
    assert hist.length.replans == [[0, 25], [20, 30], [25, 30]]
    assert int(t.model.optimizer.iterations.numpy()) == 30
    assert sizes.sizes == [32, 32, 32, 64, 64, 64]
    assert 0 < rates.rates[-1] < 0.05 * max(rates.rates)  # annealed at the new end

    replay_sizes, replay_rates = tinyproject.input_sizes_callback(), StepRates()
    _, _, t = _progressive()
    _fit_progressive(t, [replay_sizes, replay_rates], replans=hist.length.replans)
    assert int(t.model.optimizer.iterations.numpy()) == 30 and replay_sizes.sizes == sizes.sizes
    np.testing.assert_allclose(replay_rates.rates, rates.rates, rtol=1e-5)


class ValidatedAtFullSize(keras.callbacks.Callback):
    """Checks each epoch's val_loss against the full-size model's own evaluation."""

    def __init__(self, full, val):
        super().__init__()
        self.full, self.val, self.pairs = full, val, []

    def on_epoch_end(self, epoch, logs=None):
        own = self.full.evaluate(*self.val, batch_size=8, verbose=0, return_dict=True)["loss"]
        self.pairs.append((logs["val_loss"], own))


@pytest.mark.heavy  # progressive resizing: test_progressive.py says why
def test_progressive_resizing_validates_every_epoch_at_the_full_size():
    """The small epochs' val_* come from the full-size model, so the best epoch,
    early stopping and the head's score compare like with like. (vgg16: its
    random-weight outputs differ by input size; Lite0's are constant.)"""
    _, _, t = _progressive(name="vgg16")
    check = ValidatedAtFullSize(t.model, t.val)
    _fit_progressive(t, [check])
    assert len(check.pairs) == 5
    small = t.small.evaluate(*t.val, batch_size=8, verbose=0, return_dict=True)["loss"]
    assert small != pytest.approx(check.pairs[-1][1], rel=1e-5)  # the sizes differ at the tolerance below
    for logged, own in check.pairs:
        assert logged == pytest.approx(own, rel=1e-5)


class StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


@pytest.mark.heavy  # progressive resizing: test_progressive.py says why
def test_early_stopping_in_the_small_epochs_ends_the_run_with_the_full_size_model_compiled():
    _, _, t = _progressive()
    hist = _fit_progressive(t, [StopAfterFirstEpoch()])
    assert len(hist.history["loss"]) == 1
    assert int(t.model.optimizer.iterations.numpy()) == 5  # what the stage reads as the steps run


def test_a_body_of_one_input_size_cannot_train_progressively():
    spec = BACKBONES["efficientnet_lite0"]
    x = np.zeros((8, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="any_size=True"):
        trainkit.build(spec, backbones.build_body(spec.name, 64, weights=None),
                         head.build_head(spec.feature_dim, 3, units=0, dropout=0.0), unfreeze=2,
                         y_train=np.zeros(8), y_val=np.zeros(0), batch_size=8, seed=0, images=(x, x[:0]),
                         image_size=16, input_size=64, small_size=32)


def test_small_input_size_is_a_multiple_of_32_and_never_below_the_backbone_minimum():
    spec = BACKBONES["efficientnet_lite0"]
    assert surgery.small_input_size(spec, 128, 0.75, 0.6) == 96
    assert surgery.small_input_size(spec, 224, 0.75, 0.6) == 160  # 168, down to a multiple of 32
    assert surgery.small_input_size(spec, 64, 0.4, 0.6) == 32  # the backbone's smallest
    assert surgery.small_input_size(spec, 32, 0.75, 0.6) == 0  # nothing smaller: one size
    assert surgery.small_input_size(spec, 100, 0.75, 0.6) == 0  # input no multiple of 32: one size
    assert surgery.small_input_size(spec, 128, 1.0, 0.6) == 0  # off
    assert surgery.small_input_size(spec, 128, 0.75, 0.0) == 0  # no step at the smaller size


@pytest.mark.heavy  # progressive resizing: test_progressive.py says why
def test_probe_times_both_sizes_of_progressive_resizing(monkeypatch):
    _, _, t = _progressive()
    timed, real = [], trainer._time_steps

    def spy(model, *args):
        timed.append(model)
        return real(model, *args)

    monkeypatch.setattr(trainer, "_time_steps", spy)
    before = [np.array(v) for v in t.model.variables + t.small.variables]
    measured = trainer.probe(t, batch_size=8, steps=4)
    assert timed == [t.model, t.small]
    assert measured.step_seconds > 0 and measured.small_step_seconds > 0
    for v, b in zip(t.model.variables + t.small.variables, before):
        np.testing.assert_array_equal(np.array(v), b, err_msg=f"the probe changed {v.path}")


def test_the_step_timer_counts_from_one_step_start_to_the_next():
    timer = trainer._StepTimer()
    timer.starts = [10.0, 13.0, 14.0, 15.5]
    assert timer.seconds == [3.0, 1.0, 1.5]
    timer.starts, timer.end = [10.0], 12.5  # one batch (a tiny data set): its own time
    assert timer.seconds == [2.5]


def test_probe_leaves_the_model_as_it_found_it():
    spec, body, model = _tiny_classifier()
    aug = surgery.augmentation(True, 0.1, 0.0, 0.0, erase=0.5, seed=3)
    model = surgery.assemble(spec, body, head.build_head(spec.feature_dim, 3, 0, 0.2), 16, 32, aug)
    x = np.random.default_rng(0).integers(0, 255, (48, 16, 16, 3)).astype(np.uint8)
    t = trainer.FineTuning(model, x, None, {"y": np.arange(48) % 3, "batch_size": 8, "shuffle": True}, 48, "full")
    before = [np.array(v) for v in model.variables]
    assert any("seed" in v.path for v in model.variables)  # the augmentation's random state is a variable
    measured = trainer.probe(t, batch_size=8, steps=5)
    assert measured.step_seconds > 0 and measured.first_step_seconds >= measured.step_seconds
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(np.array(v), b, err_msg=f"the probe changed {v.path}")


def test_erase_replaces_a_patch_of_the_given_share_of_images_in_training_only():
    """`erase: p`: each image loses one patch with probability p (Keras' own
    factor, a single float, would draw p from [0, p] per image)."""
    (layer,) = surgery.augmentation(erase=0.5, seed=1)
    x = np.full((400, 16, 16, 3), 128, np.uint8)
    changed = np.any(np.asarray(layer(x, training=True)) != 128, axis=(1, 2, 3))
    assert 0.4 < changed.mean() < 0.6
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    assert surgery.augmentation(flip=True, seed=1)[0].name == "aug_flip"  # erase: 0 adds no layer


def test_label_smoothing_loss_matches_the_categorical_one():
    y = np.array([0, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]], np.float32)
    ours = recipes.SmoothedSparseCrossentropy(0.1)(y, p)
    ref = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], p)
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)
    assert float(recipes.SmoothedSparseCrossentropy(0.1)(y, p)) != pytest.approx(
        float(keras.losses.SparseCategoricalCrossentropy()(y, p)))


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt("simulated kill")


def _toy_problem():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = head.build_head(8, 2, units=8, dropout=0.0)
    recipes.compile_model(model, "adam", 1e-2, None)
    return x, y, model


def _fit(tmp_path, epochs, extra):
    x, y, model = _toy_problem()
    cbs, checkpoint = checkpoints.callbacks(tmp_path / "backup", patience=10, schedule="cosine", has_val=True,
                                         extra=extra)
    model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=16, callbacks=cbs, verbose=0)
    return model, checkpoint


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def _interrupted(tmp_path, at_epoch=3) -> dict:
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, 6, [Interrupt(at_epoch)])
    return json.loads((tmp_path / "backup" / "state.json").read_text())


def test_resume_after_interruption_continues_from_last_completed_epoch(tmp_path):
    state = _interrupted(tmp_path)
    assert state["epoch"] == 3 and len(state["history"]) == 3  # epochs 0, 1, 2 completed
    record = Record()
    _, checkpoint = _fit(tmp_path, 6, [record])
    assert record.seen == [3, 4, 5]  # resumed, not restarted
    assert [r["epoch"] for r in checkpoint.state["history"]] == [1, 2, 3, 4, 5, 6]
    assert len(checkpoint.history()["val_accuracy"]) == 6


def test_a_fine_tune_with_a_moving_average_resumes_where_it_was_killed(tmp_path):
    """ema 0.9 over 3 epochs of 50 steps, killed before epoch 3 and restarted: the
    checkpoint holds the optimizer's state (its step counter, the average) with the
    weights, so the restart ends with the uninterrupted run's weights."""
    def run(directory, extra):
        _, t = _dense_training()
        t.fit_kwargs["shuffle"] = False  # the same batches in a restarted process
        cbs, _ = checkpoints.callbacks(directory, patience=10, schedule="cosine", has_val=True, extra=extra)
        _train(t, optimizer="adam", learning_rate=1e-2, weight_decay=0.0, schedule="cosine",
                     warmup_epochs=0.1, steps=150, batch_size=2, callbacks=cbs, verbose=0, ema=0.9)
        return t.model

    whole = run(tmp_path / "whole", [])
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", [Interrupt(2)])
    resumed = run(tmp_path / "killed", [])
    assert int(resumed.optimizer.iterations.numpy()) == 150
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.heavy  # progressive resizing: test_progressive.py says why
def test_progressive_resizing_resumes_at_the_size_of_the_epoch_it_was_killed_in(tmp_path):
    """Killed after the first full-size epoch: the restart trains no small epoch
    again and goes on at the full size with the optimizer's step count."""
    def run(extra):
        _, _, t = _progressive()
        sizes = tinyproject.input_sizes_callback()
        cbs, checkpoint = checkpoints.callbacks(tmp_path / "backup", patience=10, schedule="cosine", has_val=True,
                                             extra=[sizes, *extra])
        _train(t, optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine",
                     warmup_epochs=0.2, steps=20, batch_size=8, small_steps=10, verbose=0, callbacks=cbs)
        return t, sizes, checkpoint

    with pytest.raises(KeyboardInterrupt):
        run([Interrupt(3)])  # epochs 1-2 at 32 px and 3 at 64 completed
    t, sizes, checkpoint = run([])
    assert sizes.sizes == [64]  # only epoch 4, at the full size
    assert int(t.model.optimizer.iterations.numpy()) == 20
    assert [r["epoch"] for r in checkpoint.state["history"]] == [1, 2, 3, 4]


def test_a_truncated_checkpoint_is_never_loaded(tmp_path, caplog):
    """A damaged weights file (here: cut in half) fails its sha256 check: the
    checkpoint is discarded and training starts over, instead of loading it."""
    state = _interrupted(tmp_path)
    latest = tmp_path / "backup" / state["latest"]["file"]
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    record = Record()
    with caplog.at_level("WARNING", logger="transferlab.train.checkpoint"):
        _, checkpoint = _fit(tmp_path, 6, [record])
    assert "does not match its recorded sha256" in caplog.text
    assert record.seen == [0, 1, 2, 3, 4, 5]
    assert len(checkpoint.state["history"]) == 6


def test_a_partial_write_left_by_a_kill_is_ignored_and_removed(tmp_path):
    """A kill in the middle of a write leaves only a temporary file (written, then
    renamed): the resume uses the last committed epoch and clears the leftover."""
    _interrupted(tmp_path)
    leftover = tmp_path / "backup" / ".tmp-999-epoch-4.weights.h5"
    leftover.write_bytes(b"\x89HDF\r\n partial")
    record = Record()
    _fit(tmp_path, 6, [record])
    assert record.seen == [3, 4, 5]
    assert not leftover.exists()


def test_an_epoch_must_beat_the_start_score_to_replace_the_starting_weights(tmp_path):
    x, y, model = _toy_problem()
    cbs, checkpoint = checkpoints.callbacks(tmp_path / "b", patience=10, schedule="cosine", has_val=True,
                                         start_score=1.0)
    start = [w.copy() for w in model.get_weights()]
    model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=16, callbacks=cbs, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(start, model.get_weights()))  # it trained
    checkpoint.restore_best(model)
    for a, b in zip(start, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # but nothing beat 1.0: the start is kept


def test_between_epochs_of_equal_score_the_lower_loss_is_kept(tmp_path):
    """Under a schedule to zero, the last epochs often tie on validation accuracy;
    the annealed one (lower loss) is kept, and a tie with the start score is no win."""
    x, y, model = _toy_problem()
    checkpoint = checkpoints.Checkpoint(tmp_path / "b", "val_accuracy", start_score=0.5)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    for epoch, (acc, loss) in enumerate([(0.5, 0.1), (0.9, 0.40), (0.9, 0.30), (0.9, 0.35), (0.8, 0.1)]):
        checkpoint.on_epoch_end(epoch, {"val_accuracy": acc, "val_loss": loss})
    assert checkpoint.best_epoch == 3 and checkpoint.state["best_value"] == 0.9


def test_a_run_that_early_stopping_ended_does_not_train_on_after_a_restart(tmp_path):
    class StopAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    _fit(tmp_path, 6, [StopAfterTwo()])  # stopped after 2 epochs; the stage was then killed
    record = Record()
    _, checkpoint = _fit(tmp_path, 6, [record])
    assert record.seen == []
    assert len(checkpoint.history()["val_accuracy"]) == 2
