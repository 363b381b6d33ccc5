"""A wall-time budget for the whole pipeline (`budget: 20m` in params.yaml,
`transferlab run --budget 20m`, `mlflow run . -P budget=20m`): the arithmetic.
How the fine-tune applies it while it trains is `transferlab.budget.callback`.

The budget picks the input size where `backbone.input_size` is "auto"
(`input_size`): a short budget trains at 128 px, where its fine-tune sees more
epochs, a longer one at 160. The features and fine-tune stages resolve it alike.

The fine-tune is the one stage whose length is free, so it is the one planned:
- the stages before it recorded how long they took (`stage_seconds` in
  metrics/prepare.json, features.json, head.json), so the clock counts them
  even when DVC restored them from its cache;
- the evaluate stage still to come is reserved for (`evaluate_reserve`), from
  the inference speed the features stage measured on the same network;
- a probe times a few training steps on this machine (`Probe`), at both input
  sizes when progressive resizing trains the first whole epochs at a smaller
  one (`small_steps`);
- the rest, less a safety margin, sizes the fine-tune in steps (`plan`), and
  the learning rate decays to zero exactly at the last one (Li et al.,
  "Budgeted Training", ICLR 2020);
- the fine-tune's own steps, timed, size it again as it goes (`replan`): a few
  steps on the first batches miss the real run's pace by 5 to 15 % either way,
  and a shared machine's pace drifts by as much within the hour;
- a step past the fine-tune's window ends it there (`cut`).

The plan (steps, sizes, the measured throughput, the re-plans) goes to
metrics/finetune.json and the MLflow run; `budget: 0` with
`finetune.replans: <plan.replans>` (or `finetune.steps: <plan.steps>` where
there were none) replays it without the clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

from transferlab.errors import BudgetError

MARGIN = 0.03  # of the budget, kept free for what the estimates miss (DVC's hashing, logging)
# Long fine-tunes on CIFAR-10 here took 5 to 18 % longer than planned from the probe's few steps
# (docs/budget.md): the data pipeline over the whole set, checkpoints, the machine's own
# drift from epoch to epoch. The plan counts each step this much longer than the probe measured.
SLOWDOWN = 1.10
# Once the fine-tune's own steps are timed (`replan`, after the warmup and every epoch), what is left
# to miss is the epochs' ends (checkpoints, the reshuffle) and the drift until the next re-plan.
REPLAN_SLOWDOWN = 1.03
FINISH_SECONDS = 10.0  # the fine-tune stage's own end: the model saved, MLflow logged
BASELINE_SECONDS = 30.0  # the evaluate stage's raw-pixel baseline (capped in evaluate.baseline)
MIN_USEFUL_STEPS = 50  # fewer fine-tune steps than this (or than one epoch) are not worth running
# `backbone.input_size: auto`: a budget under SHORT_SECONDS trains at SHORT_SIZE, a longer one (or
# none) at LONG_SIZE. On this project's 2-core CPUs (RESULTS.md), 20 minutes reached 90.9 to
# 91.6 % at 128 px (two to three epochs) against 90.0 % at 160 (one); the hour 93.2 % at 160 (five)
# against 92.6 % at 128 (seven and a half). Interpolated linearly, the differences cross at 42 to 47
# minutes (over the three 20-minute runs at 128 px); nothing was measured in between, so the line
# sits at 40.
SHORT_SECONDS, SHORT_SIZE, LONG_SIZE = 40 * 60, 128, 160

_UNITS = {"h": 3600, "m": 60, "s": 1}


def parse(value: str | int | float | None) -> float | None:
    """'20m', '1h30m', '90s', '1200' (seconds) -> seconds; 0, '0', 'none' or None -> no budget."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"budget: must be >= 0, received: {value!r}")
        return float(value) or None
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "0", "none", "off"):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) or None
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"budget: expected a duration such as 20m, 1h30m, 900s or 0 (none), "
                         f"received: {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts) or None


def input_size(size: int | str, budget: str | int | float | None) -> int:
    """`backbone.input_size`, with "auto" resolved by the budget: fewer pixels
    for a short one, so that its fine-tune sees more epochs."""
    if size != "auto":
        return int(size)
    seconds = parse(budget)
    return SHORT_SIZE if seconds and seconds < SHORT_SECONDS else LONG_SIZE


def describe(seconds: float) -> str:
    """Seconds -> the shortest whole-minute duration at least that long ('21m', '1h05m')."""
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


@dataclass(frozen=True)
class Probe:
    """What a few training steps measured on this machine. With progressive
    resizing, the same at the smaller input size, and the share of steps run there."""

    step_seconds: float  # the mean step once traced, its batch's fetch included
    first_step_seconds: float  # the first step: tracing the training function included
    batch_size: int
    small_step_seconds: float = 0.0
    small_first_step_seconds: float = 0.0
    small_fraction: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.step_seconds

    def small_steps_of(self, steps: int, steps_per_epoch: int) -> int:
        """How many of `steps` run at the smaller size (0 without progressive resizing)."""
        return small_steps(steps, steps_per_epoch, self.small_fraction) if self.small_step_seconds else 0


def small_steps(steps: int, steps_per_epoch: int, fraction: float) -> int:
    """Progressive resizing: how many of `steps` run at the smaller input size.
    Whole epochs, so that each epoch sees every image once at one size; at most
    `fraction` of the steps, so the larger size always has the last ones."""
    return int(fraction * steps // steps_per_epoch) * steps_per_epoch if fraction > 0 else 0


@dataclass(frozen=True)
class Plan:
    budget_seconds: float
    spent_seconds: float  # stages before the fine-tune, and the fine-tune stage up to the plan
    evaluate_seconds: float  # reserved for the evaluate stage
    margin_seconds: float
    step_seconds: float
    train_images_per_second: float
    inference_images_per_second: float
    steps_per_epoch: int
    steps: int
    epochs: float  # steps / steps_per_epoch
    finetune_seconds: float  # what the planned steps, validations and tracing should take
    small_steps: int = 0  # progressive resizing: the first ones, at the smaller input size
    small_step_seconds: float = 0.0
    val_seconds: float = 0.0  # one validation pass
    max_steps: int = 0  # the recipe's own length (0: none)
    probe_steps: int = 0  # re-planned (`replan`): the steps the probe's plan chose; 0: not re-planned
    trained_step_seconds: float = 0.0  # re-planned: the mean step the latest re-plan timed
    # re-planned: [step, steps] for each plan, the probe's at step 0: finetune.replans replays them
    replans: list = field(default_factory=list)
    precision: str = "float32"  # the dtype policy the fine-tune trains in (transferlab.train.precision)
    precision_step_seconds: dict = field(default_factory=dict)  # each policy timed to choose it; empty: none

    @property
    def window_seconds(self) -> float:
        """The fine-tune's share of the budget, from the moment of the plan."""
        return (self.budget_seconds - self.spent_seconds - self.evaluate_seconds - self.margin_seconds
                - FINISH_SECONDS)

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def finetune_seconds(steps: int, steps_per_epoch: int, probe: Probe, val_seconds: float) -> float:
    """The fine-tune's wall time for `steps`: tracing once (per input size), the
    steps, and one validation pass after each (possibly partial) epoch."""
    epochs = math.ceil(steps / steps_per_epoch)
    trace = max(0.0, probe.first_step_seconds - probe.step_seconds)
    small = probe.small_steps_of(steps, steps_per_epoch)
    if small:
        trace += max(0.0, probe.small_first_step_seconds - probe.small_step_seconds)
    steps_seconds = small * probe.small_step_seconds + (steps - small) * probe.step_seconds
    return trace + SLOWDOWN * steps_seconds + epochs * val_seconds


def plan(*, budget_seconds: float, spent_seconds: float, evaluate_seconds: float, probe: Probe,
         inference_images_per_second: float, n_val: int, steps_per_epoch: int, max_steps: int = 0) -> Plan:
    """The most fine-tune steps that fit what is left of the budget, and at most
    `max_steps` (the recipe's own length; 0: no cap): a budget is a limit, so a
    machine fast enough for the whole recipe finishes early rather than training
    on. Raises BudgetError naming the smallest budget that holds one useful fine-tune."""
    margin = MARGIN * budget_seconds
    val_seconds = n_val / inference_images_per_second
    left = budget_seconds - spent_seconds - evaluate_seconds - margin - FINISH_SECONDS
    fastest = SLOWDOWN * min(probe.step_seconds, probe.small_step_seconds or probe.step_seconds)
    steps = max(0, int(left // fastest))
    if max_steps:
        steps = min(steps, max_steps)
    while steps > 0 and finetune_seconds(steps, steps_per_epoch, probe, val_seconds) > left:
        steps -= 1
    useful = min(MIN_USEFUL_STEPS, steps_per_epoch, max_steps or steps_per_epoch)
    if steps < useful:
        need = (spent_seconds + evaluate_seconds + FINISH_SECONDS
                + finetune_seconds(useful, steps_per_epoch, probe, val_seconds)) / (1 - MARGIN)
        raise BudgetError(
            f"budget {describe(budget_seconds)} is too small: the stages before the fine-tune took "
            f"{spent_seconds:.0f} s, evaluate needs about {evaluate_seconds:.0f} s, and {useful} fine-tune "
            f"steps (the fewest worth running) about "
            f"{finetune_seconds(useful, steps_per_epoch, probe, val_seconds):.0f} s at the measured "
            f"{probe.images_per_second:.0f} img/s. The smallest budget that fits is {describe(need)}: "
            f"set `budget: {describe(need)}` in params.yaml (or `transferlab run --budget {describe(need)}`), "
            "or `budget: 0` to train for finetune.epochs"
        )
    return Plan(
        budget_seconds=budget_seconds, spent_seconds=spent_seconds, evaluate_seconds=evaluate_seconds,
        margin_seconds=margin, step_seconds=probe.step_seconds,
        train_images_per_second=probe.images_per_second,
        inference_images_per_second=inference_images_per_second, steps_per_epoch=steps_per_epoch,
        steps=steps, epochs=steps / steps_per_epoch,
        finetune_seconds=finetune_seconds(steps, steps_per_epoch, probe, val_seconds),
        small_steps=probe.small_steps_of(steps, steps_per_epoch),
        small_step_seconds=probe.small_step_seconds, val_seconds=val_seconds, max_steps=max_steps,
    )


def _planned_again(p: Plan, steps_done: int, steps: int, **changes) -> Plan:
    """`p` now `steps` long, as planned after `steps_done` steps, recorded in `replans`."""
    return replace(p, steps=steps, epochs=steps / p.steps_per_epoch, probe_steps=p.probe_steps or p.steps,
                   replans=[*(p.replans or [[0, p.steps]]), [steps_done, steps]], **changes)


def cut(p: Plan, *, steps_done: int) -> Plan:
    """The plan ended at `steps_done`: the fine-tune reached its deadline
    (`callback.StepBudget`) before the steps planned, so it stops there; recorded as
    [steps_done, steps_done], which a replay stops at too."""
    return _planned_again(p, steps_done, steps_done)


def replan(p: Plan, *, step_seconds: float, steps_done: int, seconds_left: float) -> Plan:
    """The plan again once `steps_done` steps of the fine-tune itself ran, the
    latest at `step_seconds` each, with `seconds_left` of its window
    (`Plan.window_seconds`): the most steps whose rest and validations fit, at
    most the recipe's length and at least one more step. Every step to come is
    timed as the latest: with progressive resizing, plan again only past its
    small steps (`Plan.small_steps`, which stay as the probe planned them)."""
    if steps_done < p.small_steps:
        raise ValueError(f"replan: {steps_done} steps done, before the {p.small_steps} at the smaller input size "
                         "end; the steps to come are not all timed alike")
    per = p.steps_per_epoch

    def rest(steps: int) -> float:  # the steps to come and the validations of the epochs not yet ended
        return (REPLAN_SLOWDOWN * (steps - steps_done) * step_seconds
                + (math.ceil(steps / per) - steps_done // per) * p.val_seconds)

    steps = steps_done + max(0, int(seconds_left // (REPLAN_SLOWDOWN * step_seconds)))
    if p.max_steps:
        steps = min(steps, p.max_steps)
    while steps > steps_done + 1 and rest(steps) > seconds_left:
        steps -= 1
    tail = steps % per
    if tail and tail < min(MIN_USEFUL_STEPS, per // 4) and steps - tail > steps_done:
        steps -= tail  # a last epoch of a few steps costs a whole validation, at a rate near zero
    steps = max(steps, steps_done + 1)
    return _planned_again(p, steps_done, steps, trained_step_seconds=step_seconds,
                          finetune_seconds=p.window_seconds - seconds_left + rest(steps))


def evaluate_reserve(*, n_val: int, n_test: int, views: int, inference_images_per_second: float,
                     startup_seconds: float) -> float:
    """Seconds the evaluate stage needs: its start-up (as long as the fine-tune
    stage's before its probe), every validation and test image through the
    model once per view, and the raw-pixel baseline."""
    return startup_seconds + views * (n_val + n_test) / inference_images_per_second + BASELINE_SECONDS
