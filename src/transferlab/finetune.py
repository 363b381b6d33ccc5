"""Fine-tuning: unfreeze the top N registry blocks and train them with the head.
The finetune stage (`transferlab.stages.finetune`) and the search's trials both
train through `prepare` and `fit`.

The rules live here and only here:
- every BatchNormalization layer is frozen (trainable=False), which Keras 3 runs
  in inference mode whatever the training flag, so its moving statistics never
  change (the body's `training=False` alone would not hold: inside `fit` the
  outer model's flag reaches a nested model's layers); with `train_bn` the
  unfrozen blocks' BatchNorm layers train too (batch statistics, gamma and beta,
  moving statistics) and the frozen part's stay as they are;
- the frozen BatchNorm layers train folded into the convolutions before them
  (`folding`): the same function and gradients, a faster step;
- with `train_depthwise` false the unfrozen blocks' depthwise convolutions keep
  their pretrained kernels (gradients still flow through them): the step skips
  their filter gradient;
- blocks are unfrozen by the registry's block names, the same meaning on every
  backbone; the model is compiled after `trainable` changes;
- the learning rate is low: linear warmup then cosine decay, or ReduceLROnPlateau.

Two paths give the same model:
- full: images -> augmentation -> upscale -> whole backbone -> head, every epoch;
- cached: the frozen part runs once (features stage), its activations at the
  unfreeze boundary are cached for both horizontal flips, and only the unfrozen
  blocks and the head train, on a randomly flipped copy per sample and epoch.
Where the frozen part is most of the network (the default: top 3 of 9 blocks of
EfficientNet-Lite0) the cached path is much faster; see bench/finetune_paths.py.

Progressive resizing (full path): the first epochs train a second model that
upscales to a smaller input size and shares every weight with the first, and the
same optimizer goes on with the larger one; the step counter, and so the
learning-rate schedule, runs on across the switch. The body is built for any
input size (`backbones.build_body(..., any_size=True)`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from transferlab import backbones, budget, files, training
from transferlab.backbones import BackboneSpec
from transferlab.folding import fold_batchnorm

log = logging.getLogger(__name__)


def n_unfrozen(spec: BackboneSpec, unfreeze: int | str) -> int:
    return len(spec.blocks) if unfreeze == "all" else int(unfreeze)


def uses_cache(spec: BackboneSpec, mode: str, unfreeze: int | str) -> bool:
    """Whether fine-tuning trains on cached activations: mode "cached" and a
    frozen part left to cache (0 < unfreeze < all blocks)."""
    return mode == "cached" and 0 < n_unfrozen(spec, unfreeze) < len(spec.blocks)


def set_trainable(spec: BackboneSpec, body: keras.Model, unfreeze: int | str, train_bn: bool = False,
                  train_depthwise: bool = True) -> int:
    """Unfreeze the top N blocks of `body`, BatchNorm excepted unless `train_bn`
    and depthwise convolutions excepted unless `train_depthwise`; returns the
    number of trainable weight tensors in the body."""
    first = len(spec.blocks) - n_unfrozen(spec, unfreeze)
    body.trainable = True
    for layer in body.layers:
        kept = ((isinstance(layer, layers.BatchNormalization) and not train_bn)
                or (isinstance(layer, layers.DepthwiseConv2D) and not train_depthwise))
        layer.trainable = backbones.block_index(spec, layer.name) >= first and not kept
    return len(body.trainable_weights)


def boundary_layer(spec: BackboneSpec, body: keras.Model, unfreeze: int | str) -> layers.Layer | None:
    """The last layer of the frozen part, or None when nothing is frozen."""
    first = len(spec.blocks) - n_unfrozen(spec, unfreeze)
    frozen = [layer for layer in body.layers if backbones.block_index(spec, layer.name) < first]
    frozen = [layer for layer in frozen if not isinstance(layer, layers.InputLayer)]
    return frozen[-1] if frozen else None


@dataclass
class Split:
    """The body cut at the unfreeze boundary: lower (frozen) and upper (trainable)."""

    lower: keras.Model
    upper: keras.Model
    boundary: str


def split_body(spec: BackboneSpec, body: keras.Model, unfreeze: int | str) -> Split:
    layer = boundary_layer(spec, body, unfreeze)
    if layer is None:
        raise ValueError(f"{spec.name}: unfreeze={unfreeze!r} leaves no frozen part to cache")
    lower = keras.Model(body.input, layer.output, name=f"{spec.name}_lower")
    upper = keras.Model(layer.output, body.output, name=f"{spec.name}_upper")
    return Split(lower, upper, layer.name)


def augmentation(flip: bool = False, shift: float = 0.0, rotation: float = 0.0, zoom: float = 0.0,
                 erase: float = 0.0, *, seed: int) -> list[layers.Layer]:
    """Keras preprocessing layers: active in training only. `erase`: the share of
    images that get one random patch (2 to 25 % of the image) replaced by noise
    (Random Erasing, Zhong et al. 2017)."""
    out: list[layers.Layer] = []
    if flip:
        out.append(layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
    if shift > 0:
        out.append(layers.RandomTranslation(shift, shift, fill_mode="reflect", seed=seed, name="aug_shift"))
    if rotation > 0:
        out.append(layers.RandomRotation(rotation, fill_mode="reflect", seed=seed, name="aug_rotate"))
    if zoom > 0:
        out.append(layers.RandomZoom(zoom, fill_mode="reflect", seed=seed, name="aug_zoom"))
    if erase > 0:
        # factor (p, p): every image erased with probability p (a single float would draw p from [0, p])
        out.append(layers.RandomErasing(factor=(erase, erase), scale=(0.02, 0.25), value_range=(0, 255),
                                        seed=seed, name="aug_erase"))
    return out


def assemble(
    spec: BackboneSpec, body: keras.Model, head: keras.Model, image_size: int, input_size: int,
    augment: list[layers.Layer] | None = None,
) -> keras.Model:
    """The whole classifier: uint8 images -> class probabilities."""
    inputs, x = backbones.image_input(spec, image_size, input_size, augment)
    x = body(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x), name=f"{spec.name}_classifier")


def cache_extractor(spec: BackboneSpec, split: Split, image_size: int, input_size: int) -> keras.Model:
    """uint8 images -> [boundary activations, pooled features], for the features
    stage to cache both in one pass."""
    inputs, x = backbones.image_input(spec, image_size, input_size)
    acts = split.lower(x, training=False)
    pooled = layers.GlobalAveragePooling2D(name="pool")(split.upper(acts, training=False))
    return keras.Model(inputs, [acts, pooled], name=f"{spec.name}_cache_extractor")


def assemble_upper(split: Split, head: keras.Model) -> keras.Model:
    """Boundary activations -> class probabilities (the cached path's model)."""
    inputs = keras.Input(split.upper.input_shape[1:], name="activations")
    x = split.upper(inputs, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x), name="upper_classifier")


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
        return ops.where(step < self.warmup_steps, rise, fall)

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


class StopAtStep(keras.callbacks.Callback):
    """Ends training after `steps` optimizer steps, mid-epoch if need be; that
    last, partial epoch is still validated and checkpointed."""

    def __init__(self, steps: int, steps_per_epoch: int):
        super().__init__()
        self.steps, self.steps_per_epoch = steps, steps_per_epoch
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch * self.steps_per_epoch + batch + 1 >= self.steps:
            self.halt()

    def halt(self) -> None:
        if self.model.stop_training:
            return
        self.model.stop_training = True
        # with a moving average of the weights (`fit`'s `ema`), the partial epoch is validated and
        # checkpointed with the average too, as whole epochs are (no-op without one)
        self.model.optimizer.finalize_variable_values(self.model.trainable_variables)


class Replan(keras.callbacks.Callback):
    """The run's length, planned again while it trains (a budget), or as such a
    run planned it (its replay, a resumed run).

    Live (`decide(step_seconds, steps_done) -> steps`): at the warmup's last step
    and after every epoch, the mean step of the steps since (their batches' fetch
    included, as the probe times them) goes to `decide`, and the schedule's end
    and the stop move to its answer (`WarmupToZero.set_total`): the plan follows
    the machine's pace as it drifts. `replans` records each [step, steps]: the
    length as planned after that many steps, the first at step 0.

    Replay (`replans` given, no `decide`): the same changes at the same steps,
    so the run is the one that was planned. A resumed run replays what its plan
    saved and plans no more.

    `from_step` (progressive resizing: its small steps, planned once): no plan
    before the fine-tune passed it, so that every plan times steps at the input
    size of all the steps still to come. One instance serves every phase of a
    progressive fit.

    `deadline` (live only; a `time.monotonic()` value): a step that ends past it
    ends the run there, whatever the plan said: a machine that slows down after
    the last re-plan would otherwise overrun the budget, and the steps it drops
    are the schedule's last, at a rate near zero. The stop is recorded as
    [step, step] (and `halted(step)` told), so a replay stops there too."""

    SKIP = 3  # the first steps of an epoch: tracing, caches warming up
    MIN_TIMED = 20

    def __init__(self, schedule: WarmupToZero, stop: StopAtStep, steps_per_epoch: int, max_steps: int,
                 decide=None, replans=(), from_step: int = 0, deadline: float | None = None, halted=None):
        super().__init__()
        self.schedule, self.stop, self.decide = schedule, stop, decide
        self.deadline, self.halted = deadline, halted
        self.from_step, self.begun = from_step, False
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps
        self.replans = [[int(a), int(b)] for a, b in replans] or [[0, stop.steps]]
        self.pending = [r for r in self.replans if r[0] > 0]
        self.starts: list[float] = []
        self.epoch, self.warmed = 0, False

    def on_train_begin(self, logs=None):
        if self.begun:  # the next phase of progressive resizing: the same run goes on
            return
        self.begun = True
        done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        while self.pending and self.pending[0][0] <= done:  # resumed: the changes before the restart
            self._apply(*self.pending.pop(0))
        if done > 0:
            self.decide = None  # a resumed run goes on with the plan it saved

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.starts = epoch, []

    def on_train_batch_begin(self, batch, logs=None):
        if self.decide is not None:
            self.starts.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * self.steps_per_epoch + batch + 1
        while self.pending and self.pending[0][0] == step:
            self._apply(*self.pending.pop(0))
        if (self.decide is not None and self.deadline is not None and step < self.stop.steps
                and time.monotonic() >= self.deadline):
            self.replans.append([step, step])
            self._apply(step, step)
            if self.halted is not None:
                self.halted(step)
        if self.stop.steps <= step:  # the last step (a deadline's stop, live or replayed: StopAtStep ran first)
            self.stop.halt()
            return
        if self.decide is not None and not self.warmed and step >= max(self.schedule.warmup_steps,
                                                                         self.from_step + 1):
            self.warmed = True
            self._plan(step)

    def on_epoch_end(self, epoch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if self.decide is not None and not self.model.stop_training and self.from_step < step < self.stop.steps:
            self._plan(step)

    def _plan(self, step: int) -> None:
        seconds = list(np.diff(self.starts))[self.SKIP:]  # within this epoch: no validation between
        if len(seconds) >= self.MIN_TIMED:
            total = min(self.max_steps, max(step + 1, int(self.decide(float(np.mean(seconds)), step))))
            self.replans.append([step, total])
            self._apply(step, total)

    def _apply(self, step: int, total: int) -> None:
        self.schedule.set_total(total, step)
        self.stop.steps = total


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


# --------------------------------------------------------------------------- resume


# The layout of the weights files a Checkpoint writes (the training model's: BatchNorm
# folded); the stage keys its checkpoints by it, so one of another layout is never loaded.
CHECKPOINT_LAYOUT = "batchnorm folded"


class Checkpoint(keras.callbacks.Callback):
    """Resumable training state, written so that a kill at any instant leaves the
    previous checkpoint or the new one, never a partial one.

    At the start and after every epoch: the weights (optimizer state included)
    go to a temporary file, are flushed to disk and renamed to epoch-N.weights.h5;
    then state.json, which names the latest and the best weights files with their
    sha256, the best monitored value and the history of completed epochs, is
    written the same way. Renaming state.json is the commit. On resume, a file
    whose digest does not match state.json is never loaded: the checkpoint is
    discarded with a warning and training starts again from the beginning.

    (Keras' BackupAndRestore and ModelCheckpoint write in place, so a kill during
    a write leaves a truncated file at the name they load from.)

    `baseline` is the score of the starting weights: an epoch must beat it to
    become the best, so a fine-tune that diverges never yields a worse model than
    it started from. Between epochs of the same score, the lower loss is the
    better one (so, under a schedule to zero, usually the later, annealed epoch)."""

    STATE = "state.json"

    def __init__(self, directory: Path, monitor: str, baseline: float | None = None):
        super().__init__()
        self.dir = Path(directory)
        self.monitor = monitor
        self.tiebreak = "val_loss" if monitor.startswith("val_") else "loss"
        self.state = {"epoch": 0, "latest": None, "best": None, "best_value": baseline, "best_loss": None,
                      "history": []}
        self.begun = False  # a fit in this process began: the model holds the state's weights

    # files
    def _write_weights(self, name: str) -> dict:
        tmp = self.dir / f".tmp-{os.getpid()}-{name}"
        self.model.save_weights(tmp)  # Keras writes the file: fsync and rename it here
        files.fsync(tmp)
        digest = files.file_digest(tmp)
        os.replace(tmp, self.dir / name)
        return {"file": name, "sha256": digest}

    def _commit(self) -> None:
        files.write_atomic(self.dir / self.STATE, json.dumps(self.state, indent=1), durable=True)
        keep = {self.STATE} | {self.state[k]["file"] for k in ("latest", "best") if self.state[k]}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink()

    def _verified(self, entry: dict | None) -> bool:
        path = self.dir / entry["file"] if entry else None
        return entry is None or (path.is_file() and files.file_digest(path) == entry["sha256"])

    def _load_state(self) -> dict | None:
        path = self.dir / self.STATE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = None
        if state is None or not all(self._verified(state.get(k)) for k in ("latest", "best")):
            log.warning("%s: the checkpoint does not match its recorded sha256 (a damaged or partial "
                        "file); it is discarded and fine-tuning starts from the beginning", self.dir)
            return None
        return state

    # callback
    def on_train_begin(self, logs=None):
        if self.begun:  # the next phase of progressive resizing: same weights, same optimizer
            self.model._initial_epoch = self.params["epochs"] if self.state.get("stopped") else self.state["epoch"]
            return
        self.begun = True
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._load_state()
        if state is None:
            for path in self.dir.iterdir():
                path.unlink()
            self.state["best"] = self._write_weights("start.weights.h5")
            self._commit()
            return
        self.state = state
        if state["latest"]:
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(self.dir / state["latest"]["file"])
            # what fit() resumes from (as BackupAndRestore does); past the end if early stopping ended it
            self.model._initial_epoch = self.params["epochs"] if state.get("stopped") else state["epoch"]
            log.info("resumed from %s after epoch %d", self.dir, state["epoch"])
        self._commit()  # removes what an interrupted write left behind

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
        entry = self._write_weights(f"epoch-{epoch + 1}.weights.h5")
        value, best = logs.get(self.monitor), self.state["best_value"]
        loss, best_loss = logs.get(self.tiebreak), self.state.get("best_loss")
        self.state.update(epoch=epoch + 1, latest=entry)
        tie = value == best and None not in (loss, best_loss) and loss < best_loss  # never a tie with the baseline
        if value is not None and (best is None or value > best or tie):
            self.state.update(best=entry, best_value=value, best_loss=loss)
        self.state["history"].append({"epoch": epoch + 1, **logs})
        self._commit()

    def on_train_end(self, logs=None):
        if self.model.stop_training and not self.state.get("stopped"):  # early stopping: done
            self.state["stopped"] = True
            self._commit()

    def note(self, **values) -> None:
        """Add `values` to the saved state (a re-planned budget), committed now."""
        self.state.update(values)
        self._commit()

    # results
    @property
    def best_epoch(self) -> int:
        """The epoch whose weights are the best (1-based); 0: the starting weights."""
        name = self.state["best"]["file"] if self.state["best"] else ""
        return int(name.split("-")[1].split(".")[0]) if name.startswith("epoch-") else 0

    def history(self) -> dict[str, list[float]]:
        rows = self.state["history"]
        keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
        return {k: [r.get(k, float("nan")) for r in rows] for k in keys}

    def restore_best(self, model: keras.Model) -> None:
        """Load the best weights (verified) into `model`."""
        entry = self.state["best"]
        if not self._verified(entry):
            raise RuntimeError(f"{self.dir / entry['file']}: does not match its recorded sha256")
        with warnings.catch_warnings():  # the model's weights are wanted here, not the optimizer's
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(self.dir / entry["file"])


def callbacks(
    backup_dir: Path, *, patience: int, schedule: str, has_val: bool, extra: list | None = None,
    baseline: float | None = None,
) -> tuple[list, Checkpoint]:
    """Keras callbacks for a resumable run: the learning rate into the epoch logs,
    the Checkpoint (state and best weights, see there), early stopping, and
    ReduceLROnPlateau for that schedule."""
    monitor = training.monitor(has_val)
    checkpoint = Checkpoint(backup_dir, monitor, baseline)
    cbs = [training.LearningRateLogger(), checkpoint,
           keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience)]
    if schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.3,
                                                     patience=max(1, patience // 2)))
    return cbs + list(extra or []), checkpoint


# --------------------------------------------------------------------------- training


STRIDE = 32  # every registered backbone's total stride


def small_input_size(spec: BackboneSpec, input_size: int, scale: float, fraction: float) -> int:
    """Progressive resizing's smaller input size: `scale` x `input_size` rounded
    down to a multiple of 32, at least the backbone's smallest; 0 (off) where
    that is not smaller, no step runs there, or `input_size` is no multiple of
    32. Keras' MobileNetV2 and EfficientNet pad by the feature map's parity
    (`correct_pad`), which a body built for any size cannot know: at multiples
    of the total stride every parity is even, so both bodies compute the same."""
    size = max(spec.min_size, int(input_size * scale) // STRIDE * STRIDE)
    return size if size < input_size and fraction > 0 and input_size % STRIDE == 0 else 0


@dataclass
class Training:
    """One fine-tune, ready for `fit`: the model of its path and what it trains on."""

    model: keras.Model
    train: object  # a FlipCacheDataset (cached path) or the uint8 training images (full path)
    val: tuple | None
    fit_kwargs: dict
    n_train: int
    path: str  # "cached" | "full"
    small: keras.Model | None = None  # progressive resizing: the same weights at the smaller input size
    small_size: int = 0


def prepare(
    spec: BackboneSpec, body: keras.Model, head: keras.Model, *, unfreeze: int | str,
    y_train: np.ndarray, y_val: np.ndarray, batch_size: int, seed: int,
    images: tuple[np.ndarray, np.ndarray] | None = None, image_size: int = 0, input_size: int = 0,
    augment: dict | None = None,
    activations: dict[str, np.ndarray] | None = None, flip: bool = True, small_size: int = 0,
    train_bn: bool = False, train_depthwise: bool = True,
) -> Training:
    """Unfreeze the top `unfreeze` blocks and build the model of the path:
    - full (`images` = (train, val) uint8 arrays): augmentation (`augment`: the
      keywords of `augmentation`) -> upscale -> whole backbone -> head;
    - cached (`activations`: train, train_flip, val at the boundary of
      `unfreeze` blocks): upper blocks -> head, on a randomly flipped copy per
      sample and epoch (`flip`).
    `small_size` (full path): a second model at that input size for progressive
    resizing; `body` must then be built for any input size. `train_bn`,
    `train_depthwise`: what of the unfrozen blocks trains (`set_trainable`).
    The models train `body`'s and `head`'s variables with the frozen BatchNorm
    layers folded into their convolutions (`folding.fold_batchnorm`); a model
    to save is assembled from `body` and `head` afterwards."""
    trainable = set_trainable(spec, body, unfreeze, train_bn, train_depthwise)
    small = None
    has_val = len(y_val) > 0
    if activations is not None:
        split = split_body(spec, body, unfreeze)
        model = assemble_upper(split, head)
        train = FlipCacheDataset(activations["train"], activations.get("train_flip") if flip else None,
                                 y_train, batch_size, seed)
        val = (np.asarray(activations["val"], np.float32), y_val) if has_val else None
        fit_kwargs, path = {}, "cached"
    else:
        x_train, x_val = images
        a = augment or {}
        layers_ = augmentation(**a, seed=seed)
        model = assemble(spec, body, head, image_size, input_size, layers_)
        if small_size:
            if body.input_shape[1] is not None:
                raise ValueError(f"{spec.name}: progressive resizing needs a body built for any input size "
                                 "(backbones.build_body(..., any_size=True))")
            # the same augmentation layers too: their random stream runs on across the switch
            small = assemble(spec, body, head, image_size, small_size, layers_)
        train = np.asarray(x_train)
        val = (np.asarray(x_val), y_val) if has_val else None
        fit_kwargs, path = {"y": y_train, "batch_size": batch_size, "shuffle": True}, "full"
    # what trains: the same variables with the frozen BatchNorm folded into the convolutions (faster)
    model = fold_batchnorm(model, trained=True)
    small = fold_batchnorm(small, trained=True) if small is not None else None
    n_train = len(y_train)
    log.info("finetune: %s path, top %s block(s) of %s unfrozen (%d trainable tensors in the body)",
             path, unfreeze, spec.name, trainable)
    return Training(model, train, val, fit_kwargs, n_train, path, small, small_size if small else 0)


def steps_per_epoch(t: Training, batch_size: int) -> int:
    return -(-t.n_train // batch_size)


def fit(t: Training, *, optimizer: str, learning_rate: float, weight_decay: float, schedule: str,
        warmup_epochs: float, steps: int, batch_size: int, callbacks: list, label_smoothing: float = 0.0,
        verbose: int = 1, small_steps: int = 0, replan=None, replans=(), max_steps: int = 0, ema: float = 0.0,
        deadline: float | None = None, halted=None):
    """Compile with the schedule sized to `steps` optimizer steps (see
    `total_steps`) and train; returns Keras' History (every epoch's). The last
    epoch is partial when `steps` is not a whole number of epochs. `small_steps`
    (whole epochs, with `t.small`): the first steps at the smaller input size,
    then the rest at the larger one with the same optimizer and schedule.
    `replan(step_seconds, steps_done) -> steps`: a budget's plan again at the
    warmup's end and after every epoch (`Replan`; a schedule to zero; with
    progressive resizing, only once the larger size trains), at most
    `max_steps`; `replans`: what such a run recorded (then `steps` is its first
    entry's), replayed; `deadline`, `halted`: the live plan's hard stop (`Replan`).
    Returns the History; the Replan
    callback, if any, is `history.replan`. `ema` > 0: the momentum of a moving
    average of the weights (Keras' `use_ema`), written into them at the end of
    every epoch, so that validation, checkpoints and the next epoch see it."""
    per_epoch = steps_per_epoch(t, batch_size)
    lr = learning_rate_schedule(schedule, learning_rate, steps, int(round(warmup_epochs * per_epoch)))
    opt = training.make_optimizer(optimizer, lr, weight_decay, ema=ema, ema_every=per_epoch)
    progressive = t.small is not None and small_steps >= per_epoch
    replanning = (replan is not None or len(replans) > 1) and isinstance(lr, WarmupToZero)
    if replanning:  # fit's epochs hold the longest plan
        max_steps = max(steps, max_steps, *(b for _, b in replans))
    else:
        max_steps = steps
    epochs = math.ceil(max_steps / per_epoch)
    length = [StopAtStep(steps, per_epoch)] if steps % per_epoch or replanning else []
    if replanning:
        length.append(Replan(lr, length[0], per_epoch, max_steps, decide=replan, replans=replans,
                             from_step=small_steps if progressive else 0, deadline=deadline, halted=halted))
    phases = [(t.model, epochs, [])]  # (model, its last epoch, callbacks of its own)
    if progressive:
        validate = [FullSizeValidation(t.model, t.val, batch_size)] if t.val is not None else []
        phases.insert(0, (t.small, small_steps // per_epoch, validate))
    for model, _, _ in phases:  # every phase's model before any trains: early stopping may end the first
        training.compile_model(model, opt, lr, weight_decay, label_smoothing)
    history, start, merged, seen = None, 0, {}, []
    for model, end, own in phases:
        if len(phases) > 1:
            log.info("finetune: epochs %d..%d at %s", start + 1, end,
                     f"{t.small_size} px" if model is t.small else "the full input size")
        history = model.fit(t.train, validation_data=None if own else t.val, initial_epoch=start, epochs=end,
                            callbacks=[*own, *callbacks, *length], verbose=verbose, **t.fit_kwargs)
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)
        seen += history.epoch
        if model.stop_training:  # early stopping: done
            break
        start = end
    history.history, history.epoch = merged, seen
    history.replan = length[-1] if replanning else None
    return history


class FullSizeValidation(keras.callbacks.Callback):
    """Progressive resizing's small epochs are validated by the full-size model
    (it shares every weight), so that every epoch's val_* mean the same to the
    best epoch, early stopping and the head's baseline. Comes before the
    callbacks that read the epoch's logs."""

    def __init__(self, full: keras.Model, val: tuple, batch_size: int):
        super().__init__()
        self.full, self.val, self.batch_size = full, val, batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            x, y = self.val
            result = self.full.evaluate(x, y, batch_size=self.batch_size, verbose=0, return_dict=True)
            logs.update({f"val_{k}": float(v) for k, v in result.items()})


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


def probe(t: Training, batch_size: int, steps: int = 11) -> budget.Probe:
    """Seconds per training step of this model on this machine (and of the
    smaller one of progressive resizing): `steps` steps on the first training
    batches at a learning rate of zero. Every variable of the model (weights and
    the augmentation's random state) and the cached path's random flips are
    restored afterwards, so a planned run trains exactly as its replay without
    the probe does."""
    if t.path == "cached":
        rng_state = t.train.rng.bit_generator.state
        batches = [t.train[i] for i in range(min(steps, len(t.train)))]
        t.train.rng.bit_generator.state = rng_state
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
    else:
        x, y = t.train[:steps * batch_size], t.fit_kwargs["y"][:steps * batch_size]
    step, first = _time_steps(t.model, x, y, batch_size)
    if t.small is None:
        return budget.Probe(step_seconds=step, first_step_seconds=first, batch_size=batch_size)
    small_step, small_first = _time_steps(t.small, x, y, batch_size)
    return budget.Probe(step_seconds=step, first_step_seconds=first, batch_size=batch_size,
                        small_step_seconds=small_step, small_first_step_seconds=small_first)


def _time_steps(model: keras.Model, x, y, batch_size: int) -> tuple[float, float]:
    """(mean step once traced, first step) of `model` on (x, y); its variables restored.
    The mean, not the median: a plan must hold the slow steps too."""
    saved = [np.array(v) for v in model.variables]
    timer = _StepTimer()
    training.compile_model(model, "sgd", 0.0)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, callbacks=[timer], verbose=0)
    for variable, value in zip(model.variables, saved):
        variable.assign(value)
    seconds = timer.seconds
    traced = seconds[1:] or seconds
    return float(np.mean(traced)), float(seconds[0])
