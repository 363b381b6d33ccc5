"""A fine-tune that cannot silently collapse (`CollapseGuard`, one Keras callback).

A learning rate too high for the data can knock a fine-tune off the head it
started from into a model that outputs the same distribution for every image:
its loss sits at ln K (K classes), its accuracy at chance, epoch after epoch,
while early stopping waits. On an inspection-like set of 600 images, the
shipped rate did that from the second epoch to the last. The guard watches for
three signs, each measured against what the fine-tune started from (the
head's validation loss, or without one the mean loss of its first `WINDOW`
steps), which must be well below the uniform level (under `HEALTHY` x ln K):

- a non-finite training loss (diverged);
- the training loss of the latest `WINDOW` steps at the uniform level (at
  least `UNIFORM` x ln K): collapsed, seen within the epoch;
- the validation loss at the uniform level at an epoch's end.

Then it puts back the weights and optimizer state of the last good moment (the
start, or the end of the latest healthy epoch), multiplies the learning rate by
`FACTOR` (the schedule's whole curve, so its end stays where the budget put
it) and trains on within the same budget; after `MAX_RECOVERIES` it stops the
fine-tune on those weights. Each event goes to the log (a warning), to the
MLflow run (tag `finetune_collapsed`, metric `collapse_lr_scale` at its step),
to metrics/finetune.json (`collapses`, `collapse_events`) and to the run's
checkpoint, so that a fine-tune resumed after a kill goes on with the events
counted and the rate lowered, from the weights it resumed from.
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np

from transferlab.tracking import to_active_run
from transferlab.train.schedule import WarmupToZero

log = logging.getLogger(__name__)

WINDOW = 20  # steps whose mean training loss is compared
UNIFORM = 0.97  # a loss at least this share of ln K: the output is about uniform
HEALTHY = 0.9  # the first steps' loss under this share of ln K: the start was better than uniform
FACTOR = 0.3  # the learning rate's scale after each recovery
MAX_RECOVERIES = 2


class CollapseGuard(keras.callbacks.Callback):
    """Detects a collapsed or diverged fine-tune and recovers from it (module
    docstring). `n_classes`: K. `start_loss`: the loss the fine-tune starts
    from (the head's validation loss), if known. `checkpoint`: the run's
    train.checkpoint.Checkpoint, which keeps the events for a resume.
    `attach(schedule)`: the learning rate `fit` made."""

    def __init__(self, n_classes: int, start_loss: float | None = None, checkpoint=None):
        super().__init__()
        self.checkpoint = checkpoint  # train.checkpoint.Checkpoint: where events are kept for a resume
        self.uniform = math.log(max(2, n_classes))
        self.events: list[dict] = []
        self.schedule = None
        self.scale = 1.0
        self.recent: list[float] = []  # the latest steps' own losses
        self.running: float | None = None  # the epoch's running mean of the loss, as Keras logged it last
        self.blind = False
        self.start_loss = start_loss
        self.good: list[tuple] | None = None  # (variable, value) of the last good moment
        self.step = 0

    def attach(self, schedule) -> None:
        self.schedule = schedule

    # ------------------------------------------------------------------ Keras hooks
    def on_epoch_begin(self, epoch, logs=None):
        self.running, self.blind = None, False
        if self.good is None:  # the first epoch: every on_train_begin has run, a checkpoint's weights are in
            self._resume()
            self._keep()

    def on_train_batch_end(self, batch, logs=None):
        """Keras logs the epoch's running mean of the loss after each batch: the
        batch's own loss is what that mean moved by."""
        running = float((logs or {}).get("loss", 0.0))
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if self.blind:  # a non-finite loss this epoch keeps the running mean so until the epoch ends
            return None
        if not math.isfinite(running):
            self.blind = True
            return self._recover(f"the training loss is {running} (diverged)")
        loss = running if self.running is None or batch == 0 else (batch + 1) * running - batch * self.running
        self.running = running
        self.recent = [*self.recent[-(WINDOW - 1):], loss]
        if len(self.recent) < WINDOW:
            return None
        mean = float(np.mean(self.recent))
        if self.start_loss is None:
            self.start_loss = mean
        elif self._fell(mean):
            self._recover(f"the training loss of the latest {WINDOW} steps is {mean:.3f}, at the uniform level "
                          f"ln K = {self.uniform:.3f} (it began at {self.start_loss:.3f})")
        return None

    def on_epoch_end(self, epoch, logs=None):
        val_loss = (logs or {}).get("val_loss")
        if val_loss is not None and not math.isfinite(float(val_loss)):
            self._recover(f"the validation loss is {val_loss} (diverged)")
        elif val_loss is not None and self._fell(float(val_loss)):
            self._recover(f"the validation loss after epoch {epoch + 1} is {float(val_loss):.3f}, at the uniform "
                          f"level {self.uniform:.3f}")
        elif not self.model.stop_training:
            self._keep()

    def _fell(self, loss: float) -> bool:
        """A loss at the uniform level, where the start was well below it."""
        return (self.start_loss is not None and self.start_loss < HEALTHY * self.uniform
                and loss >= UNIFORM * self.uniform)

    # ------------------------------------------------------------------ what it does
    def _resume(self) -> None:
        """A resumed fine-tune's earlier events, from its checkpoint: counted
        toward MAX_RECOVERIES, and the schedule scaled as they left it (a
        constant rate is an optimizer variable, restored with the weights)."""
        saved = self.checkpoint.state.get("collapse_events") if self.checkpoint is not None else None
        if not saved:
            return
        self.events = [dict(e) for e in saved]
        self.scale = float(saved[-1]["lr_scale"])
        if isinstance(self.schedule, WarmupToZero):
            self.schedule.scale_by(self.scale)
        log.warning("resumed a fine-tune that collapsed %d time(s): the learning rate stays x%.3g of "
                    "finetune.learning_rate", len(self.events), self.scale)

    def _keep(self) -> None:
        """The weights and optimizer state now: the last good moment. Kept by
        variable, so that progressive resizing's two models (the same variables)
        restore alike; not the step count, which runs on (the schedule and the
        budget with it)."""
        steps = self.model.optimizer.iterations
        self.good = [(v, np.array(v)) for v in [*self.model.weights, *self.model.optimizer.variables]
                     if v is not steps]

    def _recover(self, reason: str) -> None:
        for variable, value in self.good:
            variable.assign(value)
        self.recent = []
        last = len(self.events) >= MAX_RECOVERIES
        if not last:
            self.scale *= FACTOR
            self._scale_learning_rate(FACTOR)
        self.events.append({"step": self.step, "reason": reason, "lr_scale": round(self.scale, 6),
                            "action": "stopped" if last else "restored, learning rate lowered"})
        if self.checkpoint is not None:
            self.checkpoint.note(collapse_events=self.events)
        log.warning("FINE-TUNE COLLAPSED at step %d: %s. %s", self.step, reason,
                    "Stopped on the last good weights after %d recoveries" % MAX_RECOVERIES if last else
                    f"Restored the last good weights and scaled the learning rate by {FACTOR} (now x{self.scale:.3g} "
                    "of finetune.learning_rate); training on")
        to_active_run("set_tag", "finetune_collapsed", "true")
        to_active_run("log_metric", "collapse_lr_scale", self.scale, step=self.step)
        if last:
            self.model.stop_training = True

    def _scale_learning_rate(self, factor: float) -> None:
        if isinstance(self.schedule, WarmupToZero):
            self.schedule.scale_by(factor)
        else:  # a constant rate (the plateau schedule): the optimizer's own variable
            self.model.optimizer.learning_rate.assign(float(self.model.optimizer.learning_rate) * factor)
