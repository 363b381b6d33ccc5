"""MLflow's store, runs, tags, per-epoch metrics and dataset inputs (the Model
Registry: transferlab.registry).

The default store is embedded: an SQLite file, mlflow.db, in the project root, so
that the Model Registry works without a server. MLFLOW_TRACKING_URI overrides it
(an MLflow tracking server, for a team).

Tag vocabulary, used on every run:
    stage         prepare | features | head | ...
    backbone      registry name
    git_commit    HEAD of the project (suffixed "-dirty" with uncommitted changes)
    dvc.dep.<path>  md5 that dvc.lock records for each input the stage reads
and on some runs precision, finetune_collapsed, transfer_paid (docs/tracking.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import keras
import yaml

from transferlab.redact import redact

log = logging.getLogger(__name__)

# Keras history names -> our metric names (train_, val_, test_ prefixes everywhere).
_KERAS_NAMES = {"loss": "train_loss", "accuracy": "train_accuracy", "learning_rate": "learning_rate"}


def metric_name(keras_name: str) -> str:
    return _KERAS_NAMES.get(keras_name, keras_name)


DEFAULT_DB = "mlflow.db"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# Opens the experiment on its training runs rather than MLflow 3's GenAI overview.
EXPERIMENT_KIND = "custom_model_development"


def project_root(cwd: str | Path | None = None) -> Path:
    """The project folder: the working directory, or, where DVC runs an experiment
    in a temporary copy of it (`dvc exp run --temp`, `--queue`: somewhere under
    <project>/.dvc/tmp/exps/), the project it copied."""
    parts = Path(cwd or Path.cwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(*parts)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the project's own store (mlflow.db in its root, also
    from DVC's temporary experiment copies, which DVC deletes afterwards)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DEFAULT_DB}"


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


def sqlite_path(uri: str) -> Path | None:
    """The file of an sqlite:/// store URI; None for any other store."""
    import urllib.parse

    return Path(urllib.parse.unquote(uri[len("sqlite:///"):])) if uri.startswith("sqlite:///") else None


def create_sqlite_store(path: Path) -> None:
    """Build a new SQLite store under a temporary name and rename it into place
    once MLflow's schema migrations are done: a run killed while they ran leaves
    no half-migrated mlflow.db on which every later run would fail ("table ...
    already exists"). Call under the "init" store lock, so that a temporary file
    found here is one a killed creator left."""
    import mlflow

    for stale in path.parent.glob(f"{path.name}.creating-*"):
        stale.unlink(missing_ok=True)
    if path.exists():
        return
    # a new name each time: MLflow keeps an engine per URI, open on a file this may have removed
    partial = path.with_name(f"{path.name}.creating-{uuid.uuid4().hex[:12]}")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{partial}").search_experiments(max_results=1)  # migrates
    os.replace(partial, path)


def setup(experiment: str):
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock("init"):  # a new store's tables, and the experiment, created once
        if (db := sqlite_path(uri)) is not None:
            create_sqlite_store(db)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            mlflow.create_experiment(experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        elif exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(experiment)
    return mlflow


PARENT_ENV = "TRANSFERLAB_PARENT_RUN_ID"


def pipeline_key(params_path: str | Path = "params.yaml") -> str:
    """Stages of one `dvc repro` share the project folder, the params file and the
    commit (two clones on one MLflow store get two parent runs)."""
    import hashlib

    h = hashlib.sha256(Path(params_path).read_bytes() if Path(params_path).exists() else b"")
    h.update(git_commit().encode())
    h.update(str(Path.cwd().resolve()).encode())
    return h.hexdigest()[:16]


def run_name(stage: str, backbone: str | None) -> str:
    """`<stage>-<backbone>`, or the stage alone where it knows no model (prepare)."""
    return f"{stage}-{backbone}" if backbone else stage


def parent_run_id(mlflow, experiment: str, backbone: str | None = None) -> str:
    """The pipeline's parent run: the one `transferlab run` or `mlflow run`
    started (passed down in the environment), or, under a plain `dvc repro`,
    the run tagged with this pipeline's key, created by the first stage (named
    by its backbone when that stage knows one; `summarize_parent` names it at the end)."""
    env_id = os.environ.get(PARENT_ENV) or os.environ.pop("MLFLOW_RUN_ID", None)
    if env_id:
        os.environ[PARENT_ENV] = env_id
        return env_id
    key = pipeline_key()
    exp = mlflow.get_experiment_by_name(experiment)
    found = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.pipeline_key = '{key}'",
        max_results=1, output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(
        exp.experiment_id, run_name=run_name("pipeline", backbone),
        tags={"pipeline_key": key, "stage": "pipeline", "git_commit": git_commit(),
              **({"backbone": backbone} if backbone else {})},
    )
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str, *, experiment: str, params: dict, inputs: list[str], backbone: str | None = None,
    dataset: dict | None = None,
) -> Iterator:
    """One MLflow run for one pipeline stage, nested under the pipeline's parent
    run, with our tags and flattened params; `backbone` None for a stage that
    knows no model (prepare: a new backbone reuses the prepared data).
    `dataset`: the prepared data's manifest, logged as the run's dataset input
    (`log_dataset`)."""
    mlflow = setup(experiment)
    parent = parent_run_id(mlflow, experiment, backbone)
    parent_exp = mlflow.MlflowClient().get_run(parent).info.experiment_id
    tags = {"stage": stage, "git_commit": git_commit(), **({"backbone": backbone} if backbone else {}),
            **dvc_input_state(inputs)}
    with mlflow.start_run(run_name=run_name(stage, backbone), tags=tags, experiment_id=parent_exp,
                          parent_run_id=parent) as run:
        mlflow.log_params({k: redact(v) for k, v in params.items()})
        if dataset is not None:
            log_dataset(dataset, "evaluation" if stage == "evaluate" else "training")
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run.info.run_name,
                 redact(mlflow.get_tracking_uri()))
        yield run


def log_dataset(manifest: dict, context: str) -> None:
    """The prepared data as the active run's dataset input (`mlflow.data`), so
    that the MLflow UI's Dataset column and lineage show which data a run saw:
    named by its source's file or folder, its digest the manifest's checksum
    (of the source as read), its source the path or URL (credentials masked),
    its profile the image counts per split and the classes."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class PreparedImages(MetaDataset):
        @property
        def profile(self):
            return {**manifest.get("totals", {}), "classes": len(manifest.get("classes", []))}

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    source = redact(str(manifest.get("source", "")))
    name, digest = _name_and_digest(manifest)
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    with warnings.catch_warnings():  # a local path matches two registered sources, both the local one
        warnings.simplefilter("ignore", UserWarning)
        origin = resolve_dataset_source(source)  # file, http(s), s3, gs, ... as MLflow's registry knows them
    mlflow.log_input(PreparedImages(origin, name=name, digest=digest or None), context=context)


def _name_and_digest(manifest: dict) -> tuple[str, str]:
    """The data set's name (its source's file or folder) and digest (the first
    16 hex digits of the manifest's checksum)."""
    name = redact(str(manifest.get("source", ""))).rstrip("/").rsplit("/", 1)[-1] or "prepared"
    return name, str(manifest.get("checksum", "")).split(":")[-1][:16]


def dataset_label(manifest: dict) -> str:
    """`name@digest`: the parent run's `dataset` tag, by which `transferlab
    compare` groups runs."""
    return "@".join(part for part in _name_and_digest(manifest) if part)


SUMMARY_METRICS = ("_seconds", "_images_per_second", "input_size")


def summarize_parent(experiment: str, backbone: str, params: dict, metrics: dict, dataset: str | None = None) -> str:
    """Put the pipeline's summary on its parent run, so that the runs table, the
    compare view and `mlflow.search_runs` show it on the top-level row: `params`
    (flattened), `metrics`, and each stage's seconds, images/s and input size as its
    child run logged them; pipeline_seconds is the sum of the stages' wall times
    (`stage_seconds`: start-up included); the tag `dataset` (`dataset_label`).
    Returns the parent's id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    parent = parent_run_id(mlflow, experiment, backbone)
    run = client.get_run(parent)
    stages: dict[str, float] = {}
    wall = 0.0
    for child in mlflow.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                    output_format="list"):
        wall += child.data.metrics.get("stage_seconds", 0.0)
        stages.update({k: v for k, v in child.data.metrics.items()
                       if k.endswith(SUMMARY_METRICS) and k != "stage_seconds"})
    summary = {**stages, **metrics, "pipeline_seconds": round(wall, 2)}
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[mlflow.entities.Metric(k, float(v), now, 0)
                                      for k, v in summary.items() if isinstance(v, (int, float))])
    client.set_tag(parent, "stage", "pipeline")  # the parent `mlflow run` opened has no tags of ours yet
    client.set_tag(parent, "backbone", backbone)
    if dataset:
        client.set_tag(parent, "dataset", dataset)
    if run.info.run_name == run_name("pipeline", None):  # opened by prepare, which knows no backbone
        client.set_tag(parent, "mlflow.runName", run_name("pipeline", backbone))
    for key, value in params.items():
        value = str(redact(value))[:6000]
        if run.data.params.get(key, value) != value:  # params are write-once in MLflow
            log.warning("parent run %s already has %s=%s; %s not logged", parent, key, run.data.params[key], value)
            continue
        try:
            client.log_param(parent, key, value)
        except MlflowException as exc:  # a concurrent writer logged it first
            log.warning("parent run %s: %s not logged: %s", parent, key, exc)
    return parent


def link_study(pipeline_run: str, study_run: str) -> None:
    """Tags both ways between a pipeline's parent run and the tune study whose
    params it trained (`tracking.tuned_by`, written by `transferlab tune --apply`):
    `tuned_by` on the pipeline run, `pipeline_run` (the latest) on the study's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    client.set_tag(pipeline_run, "tuned_by", study_run)
    try:
        client.set_tag(study_run, "pipeline_run", pipeline_run)
    except MlflowException as exc:
        log.warning("tracking.tuned_by in params.yaml names MLflow run %s, which this tracking store does not "
                    "hold (%s); set tracking.tuned_by: null if these params no longer come from that study",
                    study_run, exc)


def end_parent(status: str = "FINISHED") -> None:
    """Close a parent run that the first stage of a plain `dvc repro` created.
    A parent passed down in the environment is closed by whoever started it."""
    import mlflow

    if os.environ.get(PARENT_ENV):
        return
    found = mlflow.search_runs(filter_string=f"tags.pipeline_key = '{pipeline_key()}'",
                               max_results=1, output_format="list", search_all_experiments=True)
    if found:
        mlflow.MlflowClient().set_terminated(found[0].info.run_id, status)


@contextlib.contextmanager
def store_lock(purpose: str) -> Iterator[None]:
    """An exclusive lock between the processes that share a local store (an
    SQLite file or a folder), one per purpose:
    - "init": creating the store's tables and the experiment, which two runs
      starting together on a new SQLite file would otherwise both attempt;
    - "registry": the read-compare-move of the champion alias, so that two runs
      finishing together cannot leave the worse one as champion.
    With a tracking server there is nothing local to lock (and runs on several
    machines are not serialised by this)."""
    import fcntl
    import urllib.parse

    uri = tracking_uri()
    if (db := sqlite_path(uri)) is not None:
        lock = db.with_name(f"{db.name}.{purpose}.lock")
    elif uri.startswith("file:") or "://" not in uri:
        lock = Path(urllib.parse.urlparse(uri).path or uri) / f".{purpose}.lock"
    else:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def to_active_run(method: str, *args, **kwargs) -> None:
    """`mlflow.<method>(*args, **kwargs)` on the active run, if there is one (a
    callback inside a search trial has none of its own)."""
    import mlflow

    if mlflow.active_run() is not None:
        getattr(mlflow, method)(*args, **kwargs)


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, named train_*/val_* (after
    `prefix`), at step `step_offset` + epoch."""

    def __init__(self, step_offset: int = 0, prefix: str = ""):
        super().__init__()
        self.step_offset, self.prefix = step_offset, prefix

    def on_epoch_end(self, epoch, logs=None):
        import mlflow

        metrics = {self.prefix + metric_name(k): float(v) for k, v in (logs or {}).items()}
        mlflow.log_metrics(metrics, step=self.step_offset + epoch)
