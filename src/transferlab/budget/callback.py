"""How long a fine-tune trains, owned by one Keras callback handed to `fit`
(`StepBudget`): a number of steps, a recorded plan replayed without the clock,
or a time budget planned from a probe and planned again while it trains.

Under a time budget (`plan_to_budget`, then `StepBudget(plan=..., live=True)`):
- at the warmup's last step and after every epoch, the mean of the fine-tune's
  own latest steps (their batches' fetch included, as the probe times them)
  sizes the rest of the run again (`plans.replan`), and the learning-rate
  schedule's end and the stop move to the new length (`WarmupToZero.set_total`);
- a step that ends past the fine-tune's window, less one validation pass, ends
  the run there (`plans.cut`): a machine that slows down after the last re-plan
  would otherwise overrun the budget, and the steps dropped are the schedule's
  last, at a rate near zero;
- after every epoch, the time left goes to the log and to MLflow
  (`budget_seconds_left`); every re-plan goes to the log, to MLflow
  (`planned_steps` at its step) and into the checkpoint, so that a resumed run
  replays the plan it made;
- `replans` records each [step, steps]: the length as planned after that many
  steps, the probe's at step 0, and a last [step, step] where the deadline
  stopped it. `finetune.replans` with `budget: 0` replays them: the same changes
  at the same steps, so the run is the one that was planned.

With progressive resizing, the small steps are planned once, by the probe: no
re-plan before the fine-tune passed them (`from_step`), so that every re-plan
times steps at the input size of all the steps still to come.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import keras
import numpy as np

from transferlab.budget import plans as budget
from transferlab.budget.plans import Plan, Probe
from transferlab.tracking import to_active_run
from transferlab.train.schedule import WarmupToZero

log = logging.getLogger(__name__)


def plan_to_budget(probe: Probe, *, budget_seconds: float, spent_seconds: float, startup_seconds: float,
                   inference_images_per_second: float, n_val: int, n_test: int, steps_per_epoch: int,
                   max_steps: int, small_fraction: float = 0.0, precision: str = "float32",
                   precision_step_seconds: dict | None = None) -> Plan:
    """The fine-tune's plan: the most steps that fit what is left of the budget
    at the probe's pace, after reserving the evaluate stage (its start-up as long
    as this stage's before its probe, both views of the validation and test
    images at the features stage's inference speed) and capped at the recipe's
    own length.
    `precision` (and the step time of each policy timed to choose it) is
    recorded with the plan, so that a replay trains in it. Logged, and its
    figures go to the MLflow run as `plan.*` params."""
    if probe.small_step_seconds:
        probe = dataclasses.replace(probe, small_fraction=small_fraction)
    p = budget.plan(
        budget_seconds=budget_seconds, spent_seconds=spent_seconds,
        evaluate_seconds=budget.evaluate_reserve(n_val=n_val, n_test=n_test, views=2,
                                                 inference_images_per_second=inference_images_per_second,
                                                 startup_seconds=startup_seconds),
        probe=probe, inference_images_per_second=inference_images_per_second, n_val=n_val,
        steps_per_epoch=steps_per_epoch, max_steps=max_steps)
    p = dataclasses.replace(p, precision=precision, precision_step_seconds=dict(precision_step_seconds or {}))
    log.info("budget %s: %.0f s spent before the fine-tune, %.0f s kept for evaluate; %.0f train img/s "
             "measured -> %d steps (%.2f epochs), about %.0f s; planned again after the warmup and every epoch",
             budget.describe(budget_seconds), p.spent_seconds, p.evaluate_seconds, p.train_images_per_second,
             p.steps, p.epochs, p.finetune_seconds)
    if p.small_steps:
        log.info("budget: the first %d of them at the smaller input size (%.2f s a step against %.2f s)",
                 p.small_steps, p.small_step_seconds, p.step_seconds)
    to_active_run("log_params", {f"plan.{k}": v for k, v in p.to_dict().items() if not isinstance(v, (list, dict))})
    return p


class StepBudget(keras.callbacks.Callback):
    """The fine-tune's length in optimizer steps, and the learning-rate
    schedule's end with it. One of:
    - `steps`: that many (the last epoch partial if need be);
    - `replans` (a budgeted run's record): replayed, the same changes at the
      same steps, without the clock;
    - `plan` with `live`: planned again while it trains, stopped at the
      deadline, its progress logged (module docstring);
    - `plan` without `live` (a resumed run's saved plan): its re-plans replayed
      and its progress logged; it plans no more.
    `small_steps` (progressive resizing; a plan has its own): the first steps
    run at the smaller input size. `checkpoint` (a `train.checkpoint.Checkpoint`):
    where the plan is recorded for a resumed run. Last in fit's callbacks."""

    SKIP = 3  # the first steps of an epoch: tracing, caches warming up
    MIN_TIMED = 20

    def __init__(self, *, steps: int = 0, replans=(), small_steps: int = 0, plan: Plan | None = None,
                 live: bool = False, checkpoint=None):
        super().__init__()
        self.plan, self.checkpoint = plan, checkpoint
        if plan is not None:
            replans, steps, small_steps = plan.replans, plan.steps, plan.small_steps
            if checkpoint is not None:
                checkpoint.state["plan"] = plan.to_dict()
        self.replans = [[int(a), int(b)] for a, b in replans] or [[0, steps]]
        self.first_steps = self.steps = self.max_steps = self.replans[0][1]  # `steps`: where it stops now
        self.small_steps = small_steps
        self.live = plan is not None and live
        # the window's end (a `time.monotonic()` value), from the moment of the plan
        self.window_end = time.monotonic() + plan.window_seconds if self.live else None
        self.schedule, self.replanning, self.stops = None, False, False
        self.per_epoch, self.from_step, self.pending = 1, 0, []
        self.epoch, self.starts, self.warmed, self.begun, self.clock = 0, [], False, False, 0.0

    @property
    def final_steps(self) -> int:
        """The length as last planned (the plan's, or the last recorded one)."""
        return self.plan.steps if self.plan is not None else self.replans[-1][1]

    def attach(self, schedule, steps_per_epoch: int, from_step: int = 0) -> None:
        """What `fit` made: the learning-rate schedule (only a `WarmupToZero`
        can move its end) and the epoch's length. `from_step`: no re-plan
        before it (progressive resizing's small steps)."""
        self.per_epoch, self.from_step = steps_per_epoch, from_step
        self.schedule = schedule if isinstance(schedule, WarmupToZero) else None
        self.replanning = self.schedule is not None and (self.live or len(self.replans) > 1)
        if self.replanning:  # fit's epochs hold the longest plan
            cap = self.plan.max_steps if self.plan is not None else 0
            self.max_steps = max(self.first_steps, cap, *(b for _, b in self.replans))
            self.pending = [r for r in self.replans if r[0] > 0]
        self.stops = bool(self.first_steps % steps_per_epoch) or self.replanning
        if self.plan is None and len(self.replans) > 1:
            log.info("finetune: replaying finetune.replans %s: the schedule's end moves at those steps", self.replans)
        log.info("finetune: %d steps (%.2f epochs of %d steps), the schedule's end at the last",
                 self.final_steps, self.final_steps / steps_per_epoch, steps_per_epoch)
        if self.small_steps:
            log.info("finetune: progressive resizing: the first %d steps (%d epochs) at the smaller input size",
                     self.small_steps, self.small_steps // steps_per_epoch)

    # ------------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs=None):
        if self.begun:  # the next phase of progressive resizing: the same run goes on
            return
        self.begun, self.clock = True, time.monotonic()
        done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        while self.pending and self.pending[0][0] <= done:  # resumed: the changes before the restart
            self._apply(*self.pending.pop(0))
        if done > 0:
            self.live = False  # a resumed run goes on with the plan it saved

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.starts = epoch, []

    def on_train_batch_begin(self, batch, logs=None):
        if self.live:
            self.starts.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        if not self.stops:
            return
        step = self.epoch * self.per_epoch + batch + 1
        if step >= self.steps:
            self.halt()
        if not self.replanning:
            return
        while self.pending and self.pending[0][0] == step:
            self._apply(*self.pending.pop(0))
        # the last validation still has to run inside the window
        if (self.live and step < self.steps
                and time.monotonic() >= self.window_end - self.plan.val_seconds):
            self._cut(step)
        if self.steps <= step:  # the last step (a deadline's stop, live or replayed)
            self.halt()
            return
        if self.live and not self.warmed and step >= max(self.schedule.warmup_steps, self.from_step + 1):
            self.warmed = True
            self._replan(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.plan is not None:
            self._progress(epoch)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if self.live and not self.model.stop_training and self.from_step < step < self.steps:
            self._replan(step)

    def halt(self) -> None:
        """Stop after this step; the partial epoch is still validated and checkpointed."""
        if self.model.stop_training:
            return
        self.model.stop_training = True
        # with a moving average of the weights (the recipe's `ema`), the partial epoch is validated and
        # checkpointed with the average too, as whole epochs are (no-op without one)
        self.model.optimizer.finalize_variable_values(self.model.trainable_variables)

    # ------------------------------------------------------------------ the plan's changes
    def _apply(self, step: int, total: int) -> None:
        self.schedule.set_total(total, step)
        self.steps = total

    def _replan(self, step: int) -> None:
        seconds = list(np.diff(self.starts))[self.SKIP:]  # within this epoch: no validation between
        if len(seconds) < self.MIN_TIMED:
            return
        step_seconds, left = float(np.mean(seconds)), self.window_end - time.monotonic()
        p = self.plan = budget.replan(self.plan, step_seconds=step_seconds, steps_done=step, seconds_left=left)
        self._record(step, step_seconds=step_seconds)
        log.info("budget: after %d steps at %.3f s each lately (the probe: %.3f s), %.0f s left -> %d steps "
                 "(%.2f epochs; the probe's plan: %d)", step, step_seconds, p.step_seconds, left, p.steps,
                 p.epochs, p.probe_steps)
        total = min(self.max_steps, max(step + 1, p.steps))
        self.replans.append([step, total])
        self._apply(step, total)

    def _cut(self, step: int) -> None:
        planned = self.plan.steps
        self.plan = budget.cut(self.plan, steps_done=step)
        self.replans.append([step, step])
        self._apply(step, step)
        self._record(step)
        log.warning("budget: the fine-tune's window is over after %d of the %d steps planned (the machine ran "
                    "slower than the last re-plan timed): it ends here, to finish within the budget", step, planned)

    def _record(self, step: int, **metrics) -> None:
        if self.checkpoint is not None:
            self.checkpoint.note(plan=self.plan.to_dict())  # a resumed run replays it
        to_active_run("log_metrics", {"planned_steps": self.plan.steps, **metrics}, step=step)

    def _progress(self, epoch: int) -> None:
        p = self.plan
        elapsed = time.monotonic() - self.clock
        left = p.budget_seconds - p.spent_seconds - elapsed
        log.info("budget: fine-tune epoch %d of %d done, %.0f s of %.0f s planned; %.0f s of the %s budget left "
                 "(%.0f s of them kept for evaluate)", epoch + 1, math.ceil(p.epochs), elapsed,
                 p.finetune_seconds, left, budget.describe(p.budget_seconds), p.evaluate_seconds)
        to_active_run("log_metric", "budget_seconds_left", left, step=epoch)

    def replay_hint(self) -> str:
        """The params that replay this run without the clock."""
        return (f"budget: 0, precision: {self.plan.precision} and "
                + (f"finetune.replans: {self.plan.replans}" if self.plan.replans else f"finetune.steps: {self.plan.steps}"))
