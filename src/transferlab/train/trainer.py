"""Fine-tuning: build the model of a fine-tune and train it. The finetune stage
(`transferlab.stages.finetune`, through `transferlab.train.session`) and the
search's trials both train through `build` and `fit`; the rules of what trains
are `transferlab.train.surgery`'s.

- the frozen BatchNorm layers train folded into the convolutions before them
  (`transferlab.folding`): the same function and gradients, a faster step;
- `finetune.backprop` < 1: each step trains on the hardest share of the batch
  it reads (`transferlab.train.selective`);
- the model is compiled after `trainable` changes; the learning rate is low:
  linear warmup then a decay to zero at the last step, or ReduceLROnPlateau;
- how long it trains (a number of steps, a replayed plan, or a time budget that
  re-plans as it goes) is one callback, `transferlab.budget.callback.StepBudget`.

Two paths give the same model:
- full: images -> augmentation -> upscale -> whole backbone -> head, every epoch;
- cached: the frozen part runs once (features stage), its activations at the
  unfreeze boundary are cached for both horizontal flips, and only the unfrozen
  blocks and the head train, on a randomly flipped copy per sample and epoch.

Progressive resizing (full path): the first epochs train a second model that
upscales to a smaller input size and shares every weight with the first, and the
same optimizer goes on with the larger one; the step counter, and so the
learning-rate schedule, runs on across the switch. The body is built for any
input size (`backbones.build_body(..., any_size=True)`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import keras
import numpy as np

from transferlab.backbones import BackboneSpec
from transferlab.budget.callback import StepBudget
from transferlab.budget.plans import Probe
from transferlab.folding import fold_batchnorm
from transferlab.train import recipe as recipes
from transferlab.train import selective, surgery
from transferlab.train.guard import CollapseGuard
from transferlab.train.recipe import Recipe
from transferlab.train.schedule import learning_rate_schedule

log = logging.getLogger(__name__)


@dataclass
class FineTuning:
    """One fine-tune, ready for `fit`: the model of its mode and what it trains on."""

    model: keras.Model
    inputs: object  # a FlipCacheDataset (cached mode) or the uint8 training images (full mode)
    val: tuple | None
    fit_kwargs: dict
    n_train: int
    mode: str  # "cached" | "full" (finetune.mode, as it applies here)
    small: keras.Model | None = None  # progressive resizing: the same weights at the smaller input size
    small_size: int = 0

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n_train // batch_size)


def build(spec: BackboneSpec, body: keras.Model, head: keras.Model, r: Recipe, *, y_train: np.ndarray,
          y_val: np.ndarray, images: tuple[np.ndarray, np.ndarray] | None = None, image_size: int = 0,
          input_size: int = 0, activations: dict[str, np.ndarray] | None = None,
          small_size: int = 0) -> FineTuning:
    """Unfreeze the top `r.unfreeze` blocks and build the model of the mode:
    - full (`images` = (train, val) uint8 arrays): augmentation (`r.augment`)
      -> upscale -> whole backbone -> head;
    - cached (`activations`: train, train_flip, val at the boundary of the
      unfrozen blocks): upper blocks -> head, on a randomly flipped copy per
      sample and epoch (`r.flip`).
    `small_size` (full mode): a second model at that input size for progressive
    resizing; `body` must then be built for any input size. The models train
    `body`'s and `head`'s variables with the frozen BatchNorm layers folded into
    their convolutions; a model to save is assembled from `body` and `head`."""
    trainable = surgery.set_trainable(spec, body, r.unfreeze, r.train_bn, r.train_depthwise)
    small = None
    has_val = len(y_val) > 0
    if activations is not None:
        split = surgery.split_body(spec, body, r.unfreeze)
        model = surgery.assemble_upper(split, head)
        inputs = FlipCacheDataset(activations["train"], activations.get("train_flip") if r.flip else None,
                                  y_train, r.batch_size, r.seed)
        val = (np.asarray(activations["val"], np.float32), y_val) if has_val else None
        fit_kwargs, mode = {}, "cached"
    else:
        x_train, x_val = images
        augment = surgery.augmentation(**r.augment, seed=r.seed)
        model = surgery.assemble(spec, body, head, image_size, input_size, augment)
        if small_size:
            if body.input_shape[1] is not None:
                raise ValueError(f"{spec.name}: progressive resizing needs a body built for any input size "
                                 "(backbones.build_body(..., any_size=True))")
            # the same augmentation layers too: their random stream runs on across the switch
            small = surgery.assemble(spec, body, head, image_size, small_size, augment)
        inputs = np.asarray(x_train)
        val = (np.asarray(x_val), y_val) if has_val else None
        fit_kwargs, mode = {"y": y_train, "batch_size": r.batch_size, "shuffle": True}, "full"
    # what trains: the same variables with the frozen BatchNorm folded into the convolutions (faster)
    model = selective.wrap(fold_batchnorm(model, trained=True), r.backprop)
    small = selective.wrap(fold_batchnorm(small, trained=True), r.backprop) if small is not None else None
    log.info("finetune: %s mode, top %s block(s) of %s unfrozen (%d trainable tensors in the body)",
             mode, r.unfreeze, spec.name, trainable)
    return FineTuning(model, inputs, val, fit_kwargs, len(y_train), mode, small, small_size if small else 0)


def warmup_steps(r: Recipe, per_epoch: int) -> int:
    """The schedule's warmup in steps: `r.warmup_epochs` epochs of `per_epoch` steps."""
    return int(round(r.warmup_epochs * per_epoch))


def fit(t: FineTuning, r: Recipe, length: StepBudget, *, callbacks: list, verbose: int = 1,
        guard: CollapseGuard | None = None):
    """Compile and train for `length` (steps, or a plan that moves the
    schedule's end while it trains: `StepBudget`); returns Keras' History of
    every epoch. The last epoch is partial when the length is not a whole number
    of epochs. With progressive resizing (`t.small`, `length.small_steps`), the
    first whole epochs train at the smaller input size, then the rest at the
    larger one with the same optimizer and schedule. `r.ema` > 0: the momentum
    of a moving average of the weights (Keras' `use_ema`), written into them at
    the end of every epoch, so that validation, checkpoints and the next epoch
    see it. The epoch logs hold `r.select` (train.selection) and the loss weighs
    the classes by `r.class_weight`. `guard`: a `CollapseGuard`, which recovers a collapsed or diverged
    run (it comes first of `callbacks`, after the small epochs' full-size validation)."""
    per_epoch = t.steps_per_epoch(r.batch_size)
    lr = learning_rate_schedule(r.schedule, r.learning_rate, length.first_steps, warmup_steps(r, per_epoch))
    opt = recipes.make_optimizer(r.optimizer, lr, r.weight_decay, ema=r.ema, ema_every=per_epoch)
    progressive = t.small is not None and length.small_steps >= per_epoch
    length.attach(lr, per_epoch, from_step=length.small_steps if progressive else 0)
    watch = [] if guard is None else [guard]  # first of the callbacks in every phase
    if guard is not None:
        guard.attach(lr)
    epochs = math.ceil(length.max_steps / per_epoch)
    phases = [(t.model, epochs, [])]  # (model, its last epoch, callbacks of its own)
    if progressive:
        validate = [FullSizeValidation(t.model, t.val, r.batch_size)] if t.val is not None else []
        phases.insert(0, (t.small, length.small_steps // per_epoch, validate))
    for model, _, _ in phases:  # every phase's model before any trains: early stopping may end the first
        recipes.compile_model(model, opt, lr, r.weight_decay, r.label_smoothing, r.select)
    history, start, merged, seen = None, 0, {}, []
    for model, end, own in phases:
        if len(phases) > 1:
            log.info("finetune: epochs %d..%d at %s", start + 1, end,
                     f"{t.small_size} px" if model is t.small else "the full input size")
        history = model.fit(t.inputs, validation_data=None if own else t.val, initial_epoch=start, epochs=end,
                            callbacks=[*own, *watch, *callbacks, length], verbose=verbose,
                            class_weight=r.class_weight, **t.fit_kwargs)
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)
        seen += history.epoch
        if model.stop_training:  # early stopping: done
            break
        start = end
    history.history, history.epoch = merged, seen
    return history


class FullSizeValidation(keras.callbacks.Callback):
    """Progressive resizing's small epochs are validated by the full-size model
    (it shares every weight), so that every epoch's val_* mean the same to the
    best epoch, early stopping and the head's score. Comes before the
    callbacks that read the epoch's logs."""

    def __init__(self, full: keras.Model, val: tuple, batch_size: int):
        super().__init__()
        self.full, self.val, self.batch_size = full, val, batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            x, y = self.val
            result = self.full.evaluate(x, y, batch_size=self.batch_size, verbose=0, return_dict=True)
            logs.update({f"val_{k}": float(v) for k, v in result.items()})


class FlipCacheDataset(keras.utils.PyDataset):
    """Batches of cached activations; each sample comes from the plain or the
    flipped cache at random, reshuffled every epoch (seeded)."""

    def __init__(self, plain: np.ndarray, flipped: np.ndarray | None, y: np.ndarray,
                 batch_size: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.plain, self.flipped, self.y = plain, flipped, y
        self.index = np.arange(len(y))
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.index)

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def __getitem__(self, i: int):
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        x = np.asarray(self.plain[idx], dtype=np.float32)
        if self.flipped is not None:
            flip = self.rng.random(len(idx)) < 0.5
            if flip.any():
                x[flip] = self.flipped[idx[flip]]
        return x, self.y[idx]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(self.index)


class _StepTimer(keras.callbacks.Callback):
    """Wall seconds from one training batch's start to the next one's, so that a
    step counts fetching its batch (on the full path: the augmentation and the
    copy into the graph) as well as computing it; a single batch: its own time."""

    def __init__(self):
        super().__init__()
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> list[float]:
        return list(np.diff(self.starts if len(self.starts) > 1 else [*self.starts, self.end]))


def probe(t: FineTuning, batch_size: int, steps: int = 11) -> Probe:
    """Seconds per training step of this model on this machine (and of the
    smaller one of progressive resizing): up to `steps` full batches of the
    first training images (at least 3, a small set's repeated) at a learning
    rate of zero. Every variable of the model (weights and the augmentation's
    random state) and the cached path's random flips are restored afterwards,
    so a planned run trains exactly as its replay without the probe does."""
    if t.mode == "cached":
        rng_state = t.inputs.rng.bit_generator.state
        batches = [t.inputs[i] for i in range(min(steps, len(t.inputs)))]
        t.inputs.rng.bit_generator.state = rng_state
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
    else:
        x, y = t.inputs, t.fit_kwargs["y"]
    # full batches only: a partial batch's new shape is traced again, and the mean would count that;
    # as many as the set holds (at least 3, a smaller set's repeated: one traced, two timed)
    steps = min(steps, max(len(y) // batch_size, 3))
    take = np.arange(steps * batch_size) % len(y)
    x, y = x[take], y[take]
    step, first = _time_steps(t.model, x, y, batch_size)
    if t.small is None:
        return Probe(step_seconds=step, first_step_seconds=first, batch_size=batch_size)
    small_step, small_first = _time_steps(t.small, x, y, batch_size)
    return Probe(step_seconds=step, first_step_seconds=first, batch_size=batch_size,
                        small_step_seconds=small_step, small_first_step_seconds=small_first)


def _time_steps(model: keras.Model, x, y, batch_size: int) -> tuple[float, float]:
    """(mean step once traced, first step) of `model` on (x, y); its variables restored.
    The mean, not the median: a plan must hold the slow steps too."""
    saved = [np.array(v) for v in model.variables]
    timer = _StepTimer()
    recipes.compile_model(model, "sgd", 0.0)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, callbacks=[timer], verbose=0)
    for variable, value in zip(model.variables, saved):
        variable.assign(value)
    seconds = timer.seconds
    traced = seconds[1:] or seconds
    return float(np.mean(traced)), float(seconds[0])
