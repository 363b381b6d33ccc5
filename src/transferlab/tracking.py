"""Everything MLflow: the store, runs, tags, per-epoch metrics, artifacts.

The default store is embedded: an SQLite file, mlflow.db, in the project root, so
that the Model Registry works without a server. MLFLOW_TRACKING_URI overrides it
(an MLflow tracking server, for a team).

Tag vocabulary, used on every run:
    stage         prepare | features | head | ...
    backbone      registry name
    git_commit    HEAD of the project (suffixed "-dirty" with uncommitted changes)
    dvc.dep.<path>  md5 that dvc.lock records for each input the stage reads
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

import keras
import yaml

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# Opens the experiment on its training runs rather than MLflow 3's GenAI overview.
EXPERIMENT_KIND = "custom_model_development"
# Keras history names -> our metric names (train_, val_, test_ prefixes everywhere).
_KERAS_NAMES = {"loss": "train_loss", "accuracy": "train_accuracy", "learning_rate": "learning_rate"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def metric_name(keras_name: str) -> str:
    return _KERAS_NAMES.get(keras_name, keras_name)


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_input_state(inputs: list[str], lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """The md5 dvc.lock records for each input (as an upstream stage's output)."""
    known: dict[str, str] = {}
    lock_path = Path(lock_path)
    if lock_path.exists():
        lock = yaml.safe_load(lock_path.read_text()) or {}
        for stage in (lock.get("stages") or {}).values():
            for entry in stage.get("outs", []) + stage.get("deps", []):
                if "md5" in entry:
                    known.setdefault(entry["path"], entry["md5"])
    return {f"dvc.dep.{p}": known.get(p, "not-in-dvc.lock") for p in inputs}


def setup(experiment: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        mlflow.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    elif exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment)
    return mlflow


@contextlib.contextmanager
def stage_run(
    stage: str, *, experiment: str, backbone: str, params: dict, inputs: list[str]
) -> Iterator:
    """One MLflow run for one pipeline stage, with our tags and flattened params."""
    mlflow = setup(experiment)
    tags = {"stage": stage, "backbone": backbone, "git_commit": git_commit(), **dvc_input_state(inputs)}
    with mlflow.start_run(run_name=f"{stage}-{backbone}", tags=tags) as run:
        mlflow.log_params(params)
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run.info.run_name, mlflow.get_tracking_uri())
        yield run


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, named train_*/val_*."""

    def __init__(self, step_offset: int = 0):
        super().__init__()
        self.step_offset = step_offset

    def on_epoch_end(self, epoch, logs=None):
        import mlflow

        metrics = {metric_name(k): float(v) for k, v in (logs or {}).items()}
        mlflow.log_metrics(metrics, step=self.step_offset + epoch)
