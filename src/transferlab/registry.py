"""The Model Registry: a model logged with its signature, input example and
class names, registered under `tracking.model_name`, and the alias `champion`
moved to it only where it is better than the current champion and than its
own raw-pixel baseline by the selection metric on test (the move under
`tracking.store_lock`); every version tagged with its test scores."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras

from transferlab.tracking import store_lock

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"


def log_keras_model(model: keras.Model, example, prediction, classes: list[str] | None = None,
                    name: str = "model") -> str:
    """Log `model` with its signature and input example (and its class names,
    as classes.json beside it, for `transferlab predict`); returns a runs:/ URI.

    mlflow.keras.log_model(input_example=...) fails in MLflow 3.17 (it writes the
    example before creating its folder, mlflow/mlflow#16183), so the model is
    saved with mlflow.keras.save_model into a folder of ours and logged from there."""
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.mkdir()
        import tensorflow as tf

        # Given, not inferred: inference imports the model in a subprocess and fails here.
        requirements = [f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"]
        mlflow.keras.save_model(model, str(path), signature=infer_signature(example, prediction),
                                input_example=example, pip_requirements=requirements)
        if classes is not None:
            (path / CLASSES_FILE).write_text(json.dumps(list(classes)) + "\n")
        mlflow.log_artifacts(str(path), name)
    return f"runs:/{mlflow.active_run().info.run_id}/{name}"


CHAMPION = "champion"


def should_promote(new: float, champion: float | None, baseline: float | None = None,
                   metric: str = "test_accuracy") -> tuple[bool, str]:
    """The champion alias moves only to a strictly better test score (`metric`:
    test_ and the selection metric, train.selection), and never to a model that
    does not beat its own raw-pixel baseline on it (transfer did not pay:
    `baseline`, where the evaluate stage measured it)."""
    if baseline is not None and new <= baseline:
        return False, f"{metric} {new:.4f} does not beat the raw-pixel baseline's {baseline:.4f}: transfer did not pay"
    if champion is None:
        return True, "no champion yet"
    if new > champion:
        return True, f"{metric} {new:.4f} beats the champion's {champion:.4f}"
    return False, f"{metric} {new:.4f} does not beat the champion's {champion:.4f}"


def champion_score(client, name: str, metric: str = "test_accuracy") -> float | None:
    """The champion version's `metric` tag (its test_accuracy where it has no
    such tag: registered before the selection metric was recorded); None: no champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    tags = version.tags or {}
    value = tags.get(metric, tags.get("test_accuracy"))
    return float(value) if value is not None else None


def register_and_promote(model_uri: str, name: str, scores: dict[str, float], metric: str = "test_accuracy",
                         baseline: float | None = None) -> tuple[str, bool, str]:
    """Register `model_uri` under `name`, tagged with its test `scores` (name ->
    value: test_accuracy, and the other selection metrics where measured); move
    "champion" to it if it is better by `metric` (`should_promote`)."""
    import mlflow

    client = mlflow.MlflowClient()
    version = mlflow.register_model(model_uri, name).version
    for key, value in scores.items():
        client.set_model_version_tag(name, version, key, f"{value:.6f}")
    client.set_model_version_tag(name, version, "selected_by", metric)
    with store_lock("registry"):
        promote, reason = should_promote(scores[metric], champion_score(client, name, metric), baseline, metric)
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
    log.info("registered %s version %s %s the %s alias: %s", name, version, "with" if promote else "without",
             CHAMPION, reason)  # a model below its baseline: the evaluate stage warns
    return str(version), promote, reason


def log_and_register(model: keras.Model, example, prediction, classes: list[str], model_name: str,
                     scores: dict[str, float], metric: str = "test_accuracy", baseline: float | None = None) -> dict:
    """Log `model` to the active run, register it and move the champion alias if
    it is better by `metric` of its test `scores` (the pipeline's evaluate stage
    and the search's best trial)."""
    import mlflow

    uri = log_keras_model(model, example, prediction, classes)
    version, promoted, reason = register_and_promote(uri, model_name, scores, metric, baseline)
    mlflow.set_tags({"registered_version": version, "champion": str(promoted).lower(),
                     "champion_reason": reason})
    return {"registered_version": version, "champion": promoted}
