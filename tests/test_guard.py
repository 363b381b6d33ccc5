"""A fine-tune that cannot silently collapse: the guard's signs, what it puts
back and how it lowers the rate (a small model driven batch by batch), and the
finetune stage recording a diverged run (tests/test_budget.py has the tiny
pipeline; here the guard alone)."""

import math

import keras
import numpy as np
import pytest

from transferlab.train import checkpoint as checkpoints
from transferlab.train import guard as guards
from transferlab.train.schedule import WarmupToZero


def _model(n_classes=3, checkpoint=None):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(n_classes, activation="softmax")])
    schedule = WarmupToZero(0.1, warmup_steps=0, total_steps=1000)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    model.fit(np.ones((8, 4)), np.zeros(8), batch_size=8, verbose=0)  # the optimizer's state exists
    g = guards.CollapseGuard(n_classes, checkpoint=checkpoint)
    g.set_model(model)
    g.attach(schedule)
    return model, schedule, g


def _batches(g, model, losses):
    """One epoch of these batch losses, logged as Keras logs them: the running mean."""
    g.on_epoch_begin(0)
    for i, loss in enumerate(losses):
        model.optimizer.iterations.assign_add(1)
        g.on_train_batch_end(i, {"loss": float(np.mean(losses[:i + 1]))})


def test_a_loss_that_settles_at_the_uniform_level_restores_the_last_good_weights_at_a_lower_rate():
    model, schedule, g = _model()
    g.on_train_begin()
    good = [np.array(w) for w in model.weights]
    rate = float(schedule(500))
    _batches(g, model, [0.3] * guards.WINDOW)  # the start: well below ln 3
    assert g.events == []
    for w in model.weights:  # training moves the weights ...
        w.assign(np.asarray(w) + 1.0)
    _batches(g, model, [0.3] * 5 + [math.log(3)] * guards.WINDOW)  # ... into a uniform output, within an epoch
    assert len(g.events) == 1 and "uniform level" in g.events[0]["reason"]
    assert g.events[0]["step"] == model.optimizer.iterations.numpy()
    for w, before in zip(model.weights, good):
        np.testing.assert_array_equal(np.asarray(w), before)
    assert float(schedule(500)) == pytest.approx(rate * guards.FACTOR, rel=1e-6)
    assert not model.stop_training


def test_a_non_finite_loss_recovers_and_the_third_event_stops_the_run():
    model, schedule, g = _model()
    g.on_train_begin()
    _batches(g, model, [0.3] * guards.WINDOW)
    for n in range(1, guards.MAX_RECOVERIES + 1):  # one event an epoch: the running mean stays NaN after one
        _batches(g, model, [float("nan")] * 3)
        assert len(g.events) == n and "diverged" in g.events[-1]["reason"] and not model.stop_training
    _batches(g, model, [float("inf")])
    assert g.events[-1]["action"] == "stopped" and model.stop_training
    assert g.events[-1]["lr_scale"] == round(guards.FACTOR ** guards.MAX_RECOVERIES, 6)


def test_a_validation_loss_at_the_uniform_level_is_a_collapse_and_a_healthy_epoch_is_kept():
    model, _, g = _model()
    g.on_train_begin()
    _batches(g, model, [0.3] * guards.WINDOW)
    g.on_epoch_end(0, {"val_loss": 0.4})  # healthy: kept as the last good moment
    kept = [np.array(w) for w in model.weights]
    for w in model.weights:
        w.assign(np.asarray(w) - 1.0)
    g.on_epoch_end(1, {"val_loss": 1.01 * math.log(3)})
    assert len(g.events) == 1 and "validation loss after epoch 2" in g.events[0]["reason"]
    for w, before in zip(model.weights, kept):
        np.testing.assert_array_equal(np.asarray(w), before)


def test_a_start_that_was_already_uniform_is_not_called_a_collapse():
    """A head at chance leaves nothing to fall from: no recovery, only training."""
    model, _, g = _model()
    g.on_train_begin()
    _batches(g, model, [math.log(3)] * (2 * guards.WINDOW))
    g.on_epoch_end(0, {"val_loss": math.log(3)})
    assert g.events == []


def test_a_fine_tune_resumed_after_a_kill_keeps_its_recoveries_its_lower_rate_and_its_weights(tmp_path):
    """The guard's events go to the run's checkpoint. Killed after a recovery and
    restarted in a new process (a new model, schedule, checkpoint and guard on the
    same directory), the fine-tune goes on at the lowered rate with the event
    counted, and a later collapse puts back the weights it resumed from, not the
    new process's starting ones."""
    def restart():
        ckpt = checkpoints.Checkpoint(tmp_path, "val_accuracy")
        model, schedule, g = _model(checkpoint=ckpt)
        ckpt.set_model(model)
        ckpt.set_params({"epochs": 10})
        g.on_train_begin()  # the guard's hooks run first (trainer.fit), then the checkpoint loads its state
        ckpt.on_train_begin()
        return model, schedule, g, ckpt

    model, schedule, g, ckpt = restart()
    rate = float(schedule(500))
    _batches(g, model, [0.3] * guards.WINDOW)
    for w in model.weights:
        w.assign(np.asarray(w) + 1.0)
    _batches(g, model, [math.log(3)] * guards.WINDOW)  # collapsed: restored, rate lowered
    assert len(g.events) == 1
    ckpt.on_epoch_end(1, {"val_accuracy": 0.5})  # the epoch's end: its (restored) weights are the latest
    resumed_from = [np.array(w) for w in model.weights]

    model, schedule, g, ckpt = restart()  # the kill, then the restart
    g.on_epoch_begin(2)
    assert g.events == ckpt.state["collapse_events"] and len(g.events) == 1
    assert float(schedule(500)) == pytest.approx(rate * guards.FACTOR, rel=1e-6)
    _batches(g, model, [0.3] * guards.WINDOW)
    for w in model.weights:
        w.assign(np.asarray(w) - 1.0)
    _batches(g, model, [math.log(3)] * guards.WINDOW)
    assert len(g.events) == 2 and g.events[-1]["lr_scale"] == round(guards.FACTOR ** 2, 6)
    assert float(schedule(500)) == pytest.approx(rate * guards.FACTOR ** 2, rel=1e-6)
    for w, before in zip(model.weights, resumed_from):
        np.testing.assert_array_equal(np.asarray(w), before)
