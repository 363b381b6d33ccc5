"""The fine-tune's learning-rate schedule and its length in steps: warmup, then
a decay that reaches zero exactly at the last step, wherever a budget moves it
(transferlab.budget.callback moves it while the run trains)."""

from __future__ import annotations

import math

import keras


@keras.saving.register_keras_serializable("transferlab")
class WarmupToZero(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from peak/10 to `peak` over `warmup_steps`, then a cosine or
    linear decay that reaches zero exactly at `total_steps` (the schedule
    "Budgeted Training" recommends: wherever the run ends, it ends annealed)."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, shape: str = "cosine"):
        if shape not in ("cosine", "linear"):
            raise ValueError(f"shape must be cosine or linear, received: {shape!r}")
        self.peak, self.shape = float(peak), shape
        total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))
        # variables, read by the traced training step, so that `set_total` moves the end while it trains:
        # the decay's progress runs linearly from `_from_progress` at step `_from` to 1 at `_total`
        self._total = keras.Variable(float(total_steps), dtype="float32", trainable=False, name="total_steps")
        self._from = keras.Variable(float(self.warmup_steps), dtype="float32", trainable=False, name="from_step")
        self._from_progress = keras.Variable(0.0, dtype="float32", trainable=False, name="from_progress")
        # the whole curve's scale: a fine-tune that collapsed goes on at a lower rate (train.guard)
        self._scale = keras.Variable(1.0, dtype="float32", trainable=False, name="scale")

    @property
    def total_steps(self) -> int:
        return int(keras.ops.convert_to_numpy(self._total))

    def set_total(self, total_steps: int, at_step: int = 0) -> None:
        """Move the decay's end to `total_steps`, after `at_step` steps ran (a
        budget's re-plan). Up to the warmup's end, the run is the one a schedule
        made with `total_steps` from the start trains (the warmup's rates do not
        depend on the end); later, the rate goes on from where it is and reaches
        zero at the new end."""
        if at_step > self.warmup_steps:
            self._from_progress.assign(keras.ops.convert_to_numpy(self._progress(float(at_step))))
            self._from.assign(float(at_step))
        self._total.assign(float(max(int(total_steps), self.warmup_steps + 1, int(at_step) + 1)))

    def scale_by(self, factor: float) -> None:
        """Every rate from now on `factor` times what it was (the end stays where it is)."""
        self._scale.assign(float(keras.ops.convert_to_numpy(self._scale)) * factor)

    def _progress(self, step):
        ops = keras.ops
        start, done = ops.convert_to_tensor(self._from), ops.convert_to_tensor(self._from_progress)
        total = ops.convert_to_tensor(self._total)
        return done + (1.0 - done) * ops.clip((step - start) / ops.maximum(total - start, 1.0), 0.0, 1.0)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        warm = float(max(1, self.warmup_steps))
        rise = self.peak * (0.1 + 0.9 * step / warm)
        progress = self._progress(step)
        if self.shape == "cosine":
            fall = self.peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            fall = self.peak * (1.0 - progress)
        return ops.convert_to_tensor(self._scale) * ops.where(step < self.warmup_steps, rise, fall)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "shape": self.shape}


def learning_rate_schedule(schedule: str, base_lr: float, total_steps: int, warmup_steps: int):
    """plateau: a constant (ReduceLROnPlateau lowers it); cosine or linear: warmup,
    then a decay to zero at `total_steps`."""
    if schedule == "plateau":
        return base_lr
    return WarmupToZero(base_lr, warmup_steps, total_steps, schedule)


def total_steps(*, epochs: int, steps_per_epoch: int, min_steps: int = 0, steps: int = 0) -> int:
    """The fine-tune's length in optimizer steps: `steps` when given (a replayed
    budget plan), else `epochs` epochs but at least `min_steps`. A recipe written
    in epochs gives a data set of a few hundred images per class a few dozen
    steps; a floor in steps, as BiT's HyperRule sets by data set size, lets the
    fine-tune move away from the head it starts from."""
    if steps > 0:
        return steps
    return max(epochs * steps_per_epoch, min_steps)
