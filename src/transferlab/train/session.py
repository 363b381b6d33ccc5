"""A fine-tune from the model `trainer.build` made to its best epoch (`run`):
how long it trains (a time budget's plan, a resumed run's saved plan, or a
replay of `finetune.replans`, `finetune.steps` or the recipe's epochs), the
checkpoints that make it resumable, the collapse guard, the fit, the best
epoch put back, its history and its metrics. The fine-tune stage builds the
model, in the precision it chose, and hands it here with a `Start`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path

import keras

from transferlab import budget
from transferlab.budget.callback import StepBudget, plan_to_budget
from transferlab.budget.plans import Probe
from transferlab.train import checkpoint as checkpoints
from transferlab.train import recipe as recipes
from transferlab.train import schedule, trainer
from transferlab.train.guard import CollapseGuard
from transferlab.train.precision import Choice
from transferlab.train.recipe import Recipe

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Clock:
    """A time budget as the fine-tune plans with it (transferlab.budget)."""

    budget_seconds: float
    spent_seconds: float  # by the earlier stages, and by this one so far
    startup_seconds: float  # this stage's before its model was built and timed: the evaluate stage's start-up
    inference_images_per_second: float  # the features stage's: the same network, forward only


@dataclasses.dataclass(frozen=True)
class Start:
    """What a fine-tune starts from, besides its model and recipe."""

    directory: Path  # its checkpoints (`checkpoint.keyed_directory`), removed when it completes
    head: dict  # the head's metrics: its validation score (the selection metric's) is what an epoch must beat
    n_classes: int
    n_val: int
    n_test: int
    precision: Choice  # recorded with a budget's plan
    clock: Clock | None = None  # a time budget; None: the recipe's length, or a replay
    saved: dict | None = None  # a resumed budgeted run's plan, replayed
    probed: Probe | None = None  # the step time the precision's choice measured, planned with


def run(t: trainer.FineTuning, r: Recipe, f, start: Start, *, history_csv: Path, callbacks: list) -> dict:
    """Fine-tune `t` (`f`: params' finetune section) with resumable checkpoints;
    the model keeps its best epoch's weights, or the head's if no epoch beat it.
    `callbacks`: more Keras callbacks for the fit. Returns the metrics."""
    per_epoch = t.steps_per_epoch(r.batch_size)
    recipe_steps = schedule.total_steps(epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps)
    head = start.head if t.val else {}  # the head's score on the same validation images
    # patience and the warmup count epochs of the recipe's length: a schedule that min_steps stretched
    # over more (shorter) epochs waits as many more, so it can reach its low-rate end, and warms up over
    # as many more, so the same share of its steps (a budget's plan stretches neither: a long budget on a
    # small set still stops). Unstretched, 540 training images warmed up in 2 steps and collapsed at the peak.
    stretch = recipe_steps / max(1, f.epochs * per_epoch)
    patience = math.ceil(f.patience * stretch)
    r = dataclasses.replace(r, warmup_epochs=r.warmup_epochs * stretch)
    to_beat = head.get(f"best_val_{r.select}")  # the head's, by the same selection metric
    cbs, checkpoint = checkpoints.callbacks(start.directory, patience=patience, schedule=r.schedule,
                                            has_val=t.val is not None, start_score=to_beat,
                                            extra=callbacks, select=r.select)
    length = _length(t, r, f, start, checkpoint, per_epoch, recipe_steps)
    guard = CollapseGuard(start.n_classes, start_loss=head.get("best_val_loss"), checkpoint=checkpoint)
    began = time.perf_counter()
    trainer.fit(t, r, length, callbacks=cbs, verbose=recipes.verbosity(), guard=guard)
    seconds = time.perf_counter() - began
    if length.plan is not None:
        log.info("budget: replay this fine-tune without the clock with %s", length.replay_hint())
    ran = int(keras.ops.convert_to_numpy(t.model.optimizer.iterations))  # early stopping may end it sooner
    checkpoint.restore_best(t.model)  # the best epoch, not the last
    hist = checkpoint.history()
    recipes.write_history(history_csv, hist)
    monitor = recipes.monitor(t.val is not None, r.select)
    if checkpoint.best_epoch == 0:  # ties of the monitor broken by the lower loss (Checkpoint)
        log.warning("no fine-tune epoch beat the head's %s of %.4f: keeping the weights it started from",
                    monitor, to_beat)
    shutil.rmtree(start.directory)  # done: a later run starts fresh
    metrics = {
        "mode": t.mode,
        f"best_{monitor}": round(checkpoint.state["best_value"], 5),
        "best_epoch": checkpoint.best_epoch,
        "epochs_run": len(hist[monitor]),
        "steps": length.final_steps,
        "warmup_steps": trainer.warmup_steps(r, per_epoch),
        "steps_run": ran,
        "small_steps": length.small_steps,  # progressive resizing: the first ones at small_input_size
        "small_input_size": t.small_size if length.small_steps else 0,
        "finetune_seconds": round(seconds, 2),
        "train_images_per_second": round(ran * t.n_train / per_epoch / seconds, 1),
    }
    if r.select != "accuracy" and t.val is not None:  # the kept weights' accuracy beside what selected them
        best = checkpoint.best_epoch
        metrics["best_val_accuracy"] = round(float(hist["val_accuracy"][best - 1]) if best else
                                             head.get("best_val_accuracy", float("nan")), 5)
    if guard.events:  # collapsed or diverged, and recovered (or stopped): train.guard
        metrics.update(collapses=len(guard.events), collapse_events=guard.events)
    if length.plan is not None:
        metrics["plan"] = length.plan.to_dict()  # as the last re-plan left it
    return metrics


def _length(t: trainer.FineTuning, r: Recipe, f, start: Start, checkpoint, per_epoch: int,
            recipe_steps: int) -> StepBudget:
    """The fine-tune's length: a resumed run's saved plan, a plan to the
    budget (from `start.probed`, or a probe timed now), or `finetune.replans` /
    `finetune.steps` / the recipe's epochs replayed without the clock."""
    if start.saved:
        return StepBudget(plan=budget.Plan(**start.saved), checkpoint=checkpoint)
    if start.clock is not None:
        clock, probed, began = start.clock, start.probed, time.monotonic()
        if probed is None:  # timed now, after the clock was read: its seconds are spent too
            probed = trainer.probe(t, r.batch_size)
        plan = plan_to_budget(
            probed, budget_seconds=clock.budget_seconds, startup_seconds=clock.startup_seconds,
            spent_seconds=clock.spent_seconds + time.monotonic() - began,
            inference_images_per_second=clock.inference_images_per_second,
            n_val=start.n_val, n_test=start.n_test, steps_per_epoch=per_epoch,
            max_steps=recipe_steps,  # the recipe's own length caps the plan: a fast machine finishes early
            small_fraction=f.progressive.fraction, precision=start.precision.precision,
            precision_step_seconds=start.precision.step_seconds)
        return StepBudget(plan=plan, live=True, checkpoint=checkpoint)
    first = f.replans[0][1] if f.replans else schedule.total_steps(
        epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps, steps=f.steps)
    # as the budget planned them: a share of the steps planned before any re-plan
    small = budget.small_steps(first, per_epoch, f.progressive.fraction) if t.small is not None else 0
    return StepBudget(steps=first, replans=f.replans, small_steps=small)
