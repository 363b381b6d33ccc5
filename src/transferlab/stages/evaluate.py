"""Stage evaluate: the fine-tuned model on the test split -> metrics/evaluate.json,
metrics/per_class.json, plots/evaluate/ (confusion matrix as CSV and PNG, the
reliability diagram, the most confident mistakes, each class's recall); a
temperature fitted on the validation split where it lowers the validation NLL;
test-time flips where a mirror keeps the labels (the head's check, train.mirror)
and they lower it too (evaluate.tta: auto);
a raw-pixel logistic regression baseline beside the model (evaluate.baseline: a
model that does not beat it says so, `beats_baseline` 0 and the tag
`transfer_paid`, and is not made champion); the model (test-time augmentation
and temperature inside) logged to MLflow and registered, the alias `champion`
moved to it only if it beats the current champion.

    python -m transferlab.stages.evaluate    # dvc.yaml's command; `transferlab evaluate` alike
"""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import yaml

from transferlab import config, evaluate, registry, tracking
from transferlab.files import write_json
from transferlab.stages import METRICS, MODELS, PLOTS, PREPARED, entry, end_stage
from transferlab.stages.common import PARAMS_CHECKS, begin  # noqa: F401 (PARAMS_CHECKS: for stages.run)
from transferlab.train import mirror, selection

log = logging.getLogger(__name__)

KEYS = ("seed", "deterministic", "precision", "select", "class_weight", "backbone.name", "evaluate", "tracking")
CALIBRATION = ("test_accuracy_before_calibration", "test_accuracy_single_view", "temperature", "test_ece",
               "test_ece_before_calibration", "val_nll", "val_nll_before_calibration", "val_nll_single_view",
               "val_nll_flip")


def main(params: config.Params) -> dict:
    """Returns the metrics written to metrics/evaluate.json."""
    prepared = begin(params)
    model = keras.saving.load_model(MODELS / "finetune" / "model.keras", safe_mode=True)
    x, y = prepared.x["test"], prepared.y["test"]
    e = params.evaluate
    tta = e.tta
    if tta == "auto":  # test-time flips only where a mirror keeps the labels, then where they lower val NLL
        flips, reason = mirror.resolve(tta, json.loads((METRICS / "head.json").read_text()), "evaluate.tta")
        log.info("evaluate: %s", reason)
        tta = tta if flips else "none"
    result = evaluate.evaluate_model(model, x, y, prepared.classes, e.batch_size, tta,
                                 prepared.x["val"], prepared.y["val"], calibrate=e.calibrate)
    parameters = int(model.count_params())
    model = result["model"]  # what is logged and registered: test-time augmentation and temperature inside
    seconds = result["seconds"]
    metrics = {key: result[key] for key in CALIBRATION if key in result}
    chosen = selection.resolve(params.select, params.class_weight, prepared.manifest["counts"]["train"])
    key = f"test_{chosen.metric}"  # what the baseline and the champion rule compare
    metrics.update(test_accuracy=result["test_accuracy"], test_balanced_accuracy=result["test_balanced_accuracy"],
                   test_macro_f1=result["test_macro_f1"], test_loss=result["test_loss"],
                   tta_flip=int(result["tta"] == "flip"),
                   evaluate_seconds=round(seconds, 2), test_images_per_second=round(len(y) / seconds, 1),
                   parameters=parameters)
    if e.baseline:  # did transfer pay off? the trivial model beside ours
        metrics.update(evaluate.pixel_baseline(prepared.x["train"], prepared.y["train"], x, y, params.seed,
                                               chosen.class_weight))
        metrics["beats_baseline"] = int(metrics[key] > metrics[f"baseline_{key}"])
    metrics["stage_seconds"] = round(end_stage(), 2)
    write_json(METRICS / "evaluate.json", metrics)
    reliability = evaluate.reliability_png(
        {"before calibration": (result["raw_probs"], y), f"T = {result['temperature']:.3f}": (result["probs"], y)},
        PLOTS / "evaluate" / "reliability.png")
    y_pred = result["probs"].argmax(axis=1)
    evaluate.write_confusion_csv(y, y_pred, prepared.classes, PLOTS / "evaluate" / "confusion.csv")
    png = evaluate.confusion_png(result["confusion"], prepared.classes, PLOTS / "evaluate" / "confusion.png",
                                 f"{params.backbone.name} on test: accuracy {metrics['test_accuracy']:.4f}")
    write_json(METRICS / "per_class.json", result["per_class"])
    mistakes = evaluate.mistakes_png(x, y, result["probs"], prepared.classes, PLOTS / "evaluate" / "mistakes.png")
    recall = evaluate.recall_png(result["per_class"], prepared.classes, PLOTS / "evaluate" / "recall.png")
    values = config.subset(params, *KEYS)
    with tracking.stage_run("evaluate", experiment=params.tracking.experiment, backbone=params.backbone.name,
                            params=config.flatten(values), inputs=[str(PREPARED), str(MODELS / "finetune")],
                            dataset=prepared.manifest):
        import mlflow

        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(png), "confusion")
        mlflow.log_artifact(str(PLOTS / "evaluate" / "confusion.csv"), "confusion")
        mlflow.log_artifact(str(reliability), "calibration")
        mlflow.log_artifact(str(mistakes), "mistakes")
        mlflow.log_artifact(str(recall), "per_class")
        mlflow.log_dict(result["per_class"], "reports/test_per_class.json")
        mlflow.log_dict(result["confusion"].tolist(), "confusion/confusion_test.json")
        if not metrics.get("beats_baseline", 1):
            mlflow.set_tag("transfer_paid", "false")
        registry.log_and_register(model, np.asarray(x[:2]), result["probs"][:2], prepared.classes,
                                  params.tracking.model_name,
                                  {f"test_{m}": metrics[f"test_{m}"] for m in selection.METRICS},
                                  metric=key, baseline=metrics.get(f"baseline_{key}"))
        mlflow.set_tag("select_metric", chosen.metric)
    # the pipeline's summary on its parent run: the knobs of the model evaluated (the
    # params its fine-tune stage wrote beside it), the test metrics, each stage's time
    trained = yaml.safe_load((MODELS / "finetune" / "params.yaml").read_text())
    parent = tracking.summarize_parent(params.tracking.experiment, params.backbone.name,
                                       config.flatten({**trained, "evaluate": values["evaluate"]}), metrics,
                                       dataset=tracking.dataset_label(prepared.manifest))
    if params.tracking.tuned_by:
        tracking.link_study(parent, params.tracking.tuned_by)
    tracking.end_parent()
    log.info("evaluate: test balanced accuracy %.4f, macro-F1 %.4f; the champion rule compares %s",
             metrics["test_balanced_accuracy"], metrics["test_macro_f1"], key)
    log.info("evaluate: test accuracy %.4f, loss %.4f, ECE %.4f -> %.4f (T = %.3f, test-time flips %s) "
             "(%d images, %.1f s)", metrics["test_accuracy"], metrics["test_loss"],
             metrics["test_ece_before_calibration"], metrics["test_ece"], metrics["temperature"],
             "on" if metrics["tta_flip"] else "off", len(y), seconds)
    if "baseline_test_accuracy" in metrics:
        log.info("evaluate: the raw-pixel logistic regression baseline scores %.4f on test (%d training images)",
                 metrics["baseline_test_accuracy"], metrics["baseline_train_images"])
        if not metrics["beats_baseline"]:
            log.warning("evaluate: TRANSFER DID NOT PAY: the model's %s %.4f does not beat the raw-pixel "
                        "baseline's %.4f, so it is registered without the champion alias. Compare the head's and "
                        "the fine-tune's validation curves (plots/), and try a lower finetune.learning_rate or "
                        "fewer unfrozen blocks (finetune.unfreeze)", key, metrics[key], metrics[f"baseline_{key}"])
    return metrics


if __name__ == "__main__":
    entry(main)
