"""After the search: the best trial's model on the test set, registered under
the pipeline's champion rule, with the study's summary (metrics/tune.json), its
verdict against params.yaml's configuration and Optuna's plots on the parent
run; and `tune --apply`, which checks the verdict at full fidelity (`confirm`)
and writes the winner into params.yaml."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

from transferlab import config
from transferlab.errors import TuneError
from transferlab.files import write_json
from transferlab.search.objective import MODEL_ATTR, RUN_ATTR
from transferlab.search.space import DEFAULT_ATTR, PARAM_KEYS, defaults, direction, with_monitor
from transferlab.search.study import PARENT_ATTR, open_study

log = logging.getLogger(__name__)


def finalize(params: config.Params, prepared_dir: Path, storage_url: str | None, seconds: float,
             metrics_path: Path, plots_dir: Path) -> dict:
    """The best trial's model on the test set, registered (champion rule), with
    the study's summary and plots on the parent run."""
    import tempfile

    import keras
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from transferlab import data, evaluate, registry, tracking
    from transferlab.train import selection

    prepared = data.load_prepared(prepared_dir)
    params = with_monitor(params, prepared.manifest["counts"]["train"])
    metric = selection.resolve(params.select, params.class_weight, prepared.manifest["counts"]["train"]).metric
    study = open_study(params, storage_url)
    states = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    if not states["complete"]:
        raise TuneError(f"study {params.tune.study!r}: no trial completed ({states}); nothing to register")
    with_model = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if t.user_attrs.get(MODEL_ATTR)]
    if not with_model:
        raise TuneError(f"study {params.tune.study!r}: no complete trial logged its model")
    sign = -1.0 if direction(params.tune.monitor) == "minimize" else 1.0
    best = max(with_model, key=lambda t: (sign * t.value, -t.number))
    parent = study.user_attrs[PARENT_ATTR]
    tracking.setup(params.tracking.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=best.user_attrs[RUN_ATTR],
                                                       artifact_path="model/model.keras", dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds
            raise TuneError(f"best trial {best.number}: its model artifact could not be read "
                            f"from MLflow run {best.user_attrs.get(RUN_ATTR)}: {exc}") from exc
        model = keras.saving.load_model(path, safe_mode=True)
    x, y = prepared.x["test"], prepared.y["test"]
    e = params.evaluate
    # test-time flips as the pipeline's evaluate: none where the best trial's head saw a mirror change the labels
    tta = "none" if e.tta == "auto" and best.user_attrs.get("augment_flip") == 0 else e.tta
    result = evaluate.evaluate_model(model, x, y, prepared.classes, e.batch_size, tta, prepared.x["val"],
                                 prepared.y["val"], calibrate=e.calibrate, desc="tune: best trial on test")
    summary = {
        "best_trial": best.number, f"best_{params.tune.monitor}": round(best.value, 5),
        "best_params": best.params, "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"], "test_ece": result["test_ece"], "temperature": result["temperature"],
        "trials": states, "study_seconds": round(seconds, 1), "parent_run_id": parent,
        **verdict(study, best, params.tune.monitor),
    }
    log.info("tune: %s", summary["verdict"])
    plots_dir.mkdir(parents=True, exist_ok=True)
    pngs = study_plots(study, plots_dir)
    png = evaluate.confusion_png(result["confusion"], prepared.classes, plots_dir / "confusion_test.png",
                                 f"tune best trial {best.number}: test accuracy {result['test_accuracy']:.4f}")
    with mlflow.start_run(run_id=parent):
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.set_tag("verdict", summary["verdict"])
        mlflow.log_metrics({f"best_{params.tune.monitor}": best.value, "best_trial": best.number,
                            "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
                            "study_seconds": seconds, **{f"trials_{k}": v for k, v in states.items()}})
        for p in [*pngs, png]:
            mlflow.log_artifact(str(p), "plots")
        mlflow.log_dict(result["per_class"], "reports/test_per_class.json")
        summary.update(registry.log_and_register(
            result["model"], np.asarray(x[:2]), result["probs"][:2], prepared.classes,
            params.tracking.model_name, {f"test_{m}": result[f"test_{m}"] for m in selection.METRICS},
            metric=f"test_{metric}"))
    write_json(metrics_path, summary)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    return summary


def verdict(study, best, monitor: str) -> dict:
    """Whether the search beat params.yaml's configuration (the study's first
    trial), on the proxy's validation metric: `default_wins` and a sentence."""
    sign = -1.0 if direction(monitor) == "minimize" else 1.0
    default = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(DEFAULT_ATTR)), None)
    if default is None or default.value is None:
        state = "missing" if default is None else default.state.name.lower()
        return {"default_trial": None if default is None else default.number, "default_wins": False,
                "verdict": f"the params.yaml trial is {state}: no comparison with it"}
    wins = best.number == default.number or sign * default.value >= sign * best.value
    margin = sign * (best.value - default.value)
    text = (f"params.yaml's configuration (trial {default.number}, {monitor} {default.value:.4f}) is the best "
            "found: nothing to apply" if wins else
            f"trial {best.number} beats params.yaml's configuration (trial {default.number}) by "
            f"{margin:+.4f} {monitor} ({best.value:.4f} vs {default.value:.4f}) on the proxy")
    return {"default_trial": default.number, f"default_{monitor}": round(default.value, 5),
            "default_wins": wins, "verdict": text}


def confirm(params: config.Params, prepared_dir: Path, storage_url: str | None, summary: dict) -> dict:
    """The verdict at full fidelity, before `--apply` writes a winner: the best
    trial's configuration and params.yaml's train again as a trial trains (head,
    then tune.finetune_epochs fine-tune epochs, one seed for both), but on all
    the training images at the pipeline's input size, and are compared on the
    validation split. A proxy's win can be noise (a small validation split) or
    an artefact of its share and size; it stands only if it wins here too.
    Logged as two runs under the study's parent run (stage tune-confirm) and on
    the parent (`confirm_*` metrics, a `confirm` tag)."""
    import dataclasses

    import mlflow

    from transferlab import data, tracking
    from transferlab.search.objective import Objective
    from transferlab.search.proxy import ensure_cache, load_trial_data, proxy_size

    began = time.perf_counter()
    counts = data.load_prepared(prepared_dir).manifest["counts"]["train"]
    params = with_monitor(params, counts)
    full = dataclasses.replace(params, tune=dataclasses.replace(
        params.tune, train_fraction=1.0, min_per_class=0, input_size=0))  # input size 0: the pipeline's
    monitor, sign = params.tune.monitor, -1.0 if direction(params.tune.monitor) == "minimize" else 1.0
    study = open_study(params, storage_url)
    best = study.trials[summary["best_trial"]]
    tracking.setup(params.tracking.experiment)
    parent = study.user_attrs[PARENT_ATTR]
    experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
    log.info("tune --apply: checking trial %d against params.yaml's configuration at full fidelity "
             "(all %d training images, %d px, %d fine-tune epochs each)", best.number, sum(counts.values()),
             proxy_size(full), params.tune.finetune_epochs)
    objective = Objective(full, load_trial_data(full, prepared_dir, ensure_cache(full, prepared_dir)),
                          parent, experiment_id)
    default_value = objective.fit_once(defaults(params), "confirm-params-yaml")
    best_value = objective.fit_once(best.params, f"confirm-trial-{best.number}")
    wins = sign * best_value > sign * default_value
    text = (f"at full fidelity trial {best.number} {'beats' if wins else 'does not beat'} params.yaml's "
            f"configuration: {monitor} {best_value:.4f} vs {default_value:.4f}")
    result = {"best_wins": wins, f"best_{monitor}": round(best_value, 5),
              f"default_{monitor}": round(default_value, 5), "train_images": len(objective.trial_data.y["train"]),
              "input_size": proxy_size(full), "seconds": round(time.perf_counter() - began, 1), "verdict": text}
    client = mlflow.MlflowClient()
    client.set_tag(parent, "confirm", text)
    client.log_metric(parent, f"confirm_best_{monitor}", best_value)
    client.log_metric(parent, f"confirm_default_{monitor}", default_value)
    log.info("tune --apply: %s", text)
    return result


def apply_best(params_path: Path, params: config.Params, summary: dict, parent_run_id: str) -> dict:
    """`tune --apply`: the best trial's params into params.yaml (comments kept),
    with tracking.tuned_by naming the study's MLflow run, so that the pipeline run
    that trains them links back to it. Nothing changes when params.yaml's own
    configuration won, on the proxy or in the full-fidelity check (`confirm`,
    where it ran). Returns the changes written."""
    from transferlab import backbones
    from transferlab.run import apply_overrides

    if summary.get("default_wins"):
        log.info("tune --apply: %s; params.yaml unchanged", summary["verdict"])
        return {}
    if "confirm" in summary and not summary["confirm"]["best_wins"]:
        log.warning("tune --apply: %s; params.yaml unchanged", summary["confirm"]["verdict"])
        return {}
    all_blocks = len(backbones.get(params.backbone.name).blocks)
    values = dict(summary["best_params"])
    for key, value in values.items():
        if isinstance(value, float):
            values[key] = float(f"{value:.4g}")  # readable in params.yaml; the proxy cannot tell the rest
    if values.get("unfreeze") == all_blocks:
        values["unfreeze"] = "all"
    overrides = [f"{PARAM_KEYS[k]}={v}" for k, v in values.items()] + [f"tracking.tuned_by={parent_run_id}"]
    changes = apply_overrides(params_path, overrides)
    log.info("tune --apply: %s -> %s; train it at full fidelity with `dvc repro` (or `dvc exp run`)",
             params_path, changes)
    return changes


def study_plots(study, out_dir: Path) -> list[Path]:
    """Optimization history, intermediate values (the pruner's view), parallel
    coordinates and parameter importances, from Optuna's own visualization
    module (matplotlib backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    out = []
    for name, fn in (("optimization_history", vis.plot_optimization_history),
                     ("intermediate_values", vis.plot_intermediate_values),
                     ("parallel_coordinate", vis.plot_parallel_coordinate),
                     ("param_importances", vis.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = fn(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ complete trials
            log.warning("no %s plot: %s", name, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out
