"""Resumable fine-tunes: the Checkpoint callback (weights, optimizer state, the
best epoch and the epoch log, written then renamed and checked by sha256) and
the callbacks a resumable run trains with."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import keras
import numpy as np

from transferlab import files
from transferlab.train import recipe

log = logging.getLogger(__name__)


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

    `start_score` is the score of the starting weights: an epoch must beat it to
    become the best, so a fine-tune that diverges never yields a worse model than
    it started from. Between epochs of the same score, the lower loss is the
    better one (so, under a schedule to zero, usually the later, annealed epoch)."""

    STATE = "state.json"

    def __init__(self, directory: Path, monitor: str, start_score: float | None = None):
        super().__init__()
        self.dir = Path(directory)
        self.monitor = monitor
        self.tiebreak = "val_loss" if monitor.startswith("val_") else "loss"
        self.state = {"epoch": 0, "latest": None, "best": None, "best_value": start_score, "best_loss": None,
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
        tie = value == best and None not in (loss, best_loss) and loss < best_loss  # never a tie with the start score
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

    @classmethod
    def saved_plan(cls, directory: Path) -> dict | None:
        """The budget's plan an interrupted run saved in `directory` (`note`), if any."""
        path = Path(directory) / cls.STATE
        try:
            return json.loads(path.read_text()).get("plan") if path.exists() else None
        except ValueError:
            return None

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
    start_score: float | None = None, select: str = "accuracy",
) -> tuple[list, Checkpoint]:
    """Keras callbacks for a resumable run: the learning rate into the epoch logs,
    the Checkpoint (state and best weights, see there), early stopping, and
    ReduceLROnPlateau for that schedule, each watching the selection metric
    `select` (train.selection) and `start_score` the score to beat."""
    monitor = recipe.monitor(has_val, select)
    checkpoint = Checkpoint(backup_dir, monitor, start_score)
    cbs = [recipe.LearningRateLogger(), checkpoint,
           keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=patience)]
    if schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode="max", factor=0.3,
                                                     patience=max(1, patience // 2)))
    return cbs + list(extra or []), checkpoint




def keyed_directory(root: Path, resolved_params: str, head_file: Path) -> Path:
    """Where an interrupted fine-tune resumes from, under `root`. Keyed by the
    stage's resolved params, the trained head and the weights files' layout, so
    a checkpoint of another configuration (or one an older version wrote) is
    never restored into this one; checkpoints of other keys are stale and removed."""
    key = hashlib.sha256(resolved_params.encode())
    key.update(Path(head_file).read_bytes())
    key.update(CHECKPOINT_LAYOUT.encode())
    directory = Path(root) / f"finetune-{key.hexdigest()[:16]}"
    for stale in Path(root).glob("finetune*"):
        if stale != directory:
            log.info("removing a checkpoint of another configuration: %s", stale)
            shutil.rmtree(stale)
    if directory.exists():
        log.info("resuming the interrupted fine-tune from %s", directory)
    return directory
