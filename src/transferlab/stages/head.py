"""Stage head: a Dense+Dropout head on the pooled features -> models/head/,
metrics/head.json, plots/head/ (per-epoch history, validation confusion matrix).

    python -m transferlab.stages.head        # dvc.yaml's command; `transferlab head` alike
"""

from __future__ import annotations

import logging
import time

import numpy as np

from transferlab import config, device, evaluate, features, head, tracking
from transferlab.files import write_atomic, write_json
from transferlab.stages import METRICS, MODELS, PLOTS, PREPARED, entry, features_dir, resolved, end_stage
from transferlab.stages.common import PARAMS_CHECKS, begin  # noqa: F401 (PARAMS_CHECKS: for stages.run)
from transferlab.train import mirror, recipe, selection

log = logging.getLogger(__name__)

KEYS = ("seed", "deterministic", "precision", "distribute", "select", "class_weight", "backbone.name",
        "backbone.input_size", "head", "tracking.experiment")


def main(params: config.Params, callbacks: list | None = None) -> dict:
    """Returns the metrics written to metrics/head.json. `callbacks`: extra Keras
    callbacks for the head's fit (bench/recipes.py probes test accuracy with one)."""
    prepared = begin(params)
    strategy = device.strategy(params.distribute)
    b, h = params.backbone, params.head
    feats_dir = features_dir(b.name, b.input_size)
    feats, meta = features.load_features(feats_dir)
    out_dir = MODELS / "head"
    out_dir.mkdir(parents=True, exist_ok=True)
    values = config.subset(params, *KEYS)
    with tracking.stage_run("head", experiment=params.tracking.experiment, backbone=b.name,
                            params=config.flatten(values), inputs=[str(PREPARED), str(feats_dir)],
                            dataset=prepared.manifest):
        import mlflow

        rows = meta.get("train_index")  # the features stage's share of the training images
        y_train = prepared.y["train"] if rows is None else prepared.y["train"][np.asarray(rows)]
        chosen = selection.resolve(params.select, params.class_weight, prepared.manifest["counts"]["train"])
        log.info("head: %s", chosen.reason)
        start = time.perf_counter()
        with strategy.scope():  # head.batch_size is per replica
            model = head.build_head(meta["feature_dim"], len(prepared.classes), h.units, h.dropout)
            history = head.train_head(
                model, feats["train"], y_train, feats["val"], prepared.y["val"],
                optimizer=h.optimizer, learning_rate=h.learning_rate, epochs=h.epochs,
                batch_size=device.global_batch(h.batch_size, params.distribute), patience=h.patience,
                monitor=chosen.metric, class_weight=chosen.class_weight,
                callbacks=[tracking.EpochLogger(), *(callbacks or [])],
            )
        seconds = time.perf_counter() - start
        has_val = len(prepared.y["val"]) > 0
        split = "val" if has_val else "train"
        y_true = prepared.y[split] if has_val else y_train
        y_pred = model.predict(feats[split], batch_size=1024, verbose=0).argmax(axis=1)
        kept = selection.scores(y_true, y_pred)
        acc = kept["accuracy"]
        hist = history.history
        best = int(np.argmax(hist[recipe.monitor(has_val, chosen.metric)]))
        # The kept (best) model's figures carry a best_ prefix, here and in MLflow, so
        # that they add no point to the per-epoch train_*/val_* curves.
        metrics = {
            **{f"best_{split}_{name}": round(value, 5) for name, value in kept.items()},
            **chosen.record(),
            "best_train_accuracy": round(float(hist["accuracy"][best]), 5),
            "best_epoch": best + 1,
            "epochs_run": len(hist["loss"]),
            "head_seconds": round(seconds, 2),
            "replicas": int(strategy.num_replicas_in_sync),
        }
        if has_val:
            metrics["best_val_loss"] = round(float(hist["val_loss"][best]), 5)
        if "val_flip" in feats:  # does a mirror keep the labels? (finetune.augment.flip, evaluate.tta: auto)
            rows = np.asarray(meta["val_flip_index"])
            check = mirror.check(prepared.y["val"][rows], y_pred[rows],
                                 model.predict(feats["val_flip"], batch_size=1024, verbose=0).argmax(axis=1))
            metrics.update(check.record())
            log.info("head: %s", check.describe())
        model.save(out_dir / "model.keras")
        write_atomic(out_dir / "params.yaml", resolved(values))
        metrics["stage_seconds"] = round(end_stage(), 2)
        write_json(METRICS / "head.json", metrics)
        recipe.write_history(PLOTS / "head" / "history.csv", hist)
        cm = evaluate.confusion(y_true, y_pred, len(prepared.classes))
        png = evaluate.confusion_png(cm, prepared.classes, PLOTS / "head" / f"confusion_{split}.png",
                                     f"head on {b.name} features: {split} accuracy {acc:.3f}")
        mlflow.log_metrics({k: v for k, v in metrics.items() if k not in ("best_train_accuracy", "select_metric")})
        mlflow.set_tag("select_metric", chosen.metric)
        mlflow.log_artifact(str(png), "confusion")
        mlflow.log_dict(evaluate.per_class_report(y_true, y_pred, prepared.classes),
                        f"reports/{split}_per_class.json")
        mlflow.log_dict(cm.tolist(), f"confusion/confusion_{split}.json")
        mlflow.log_artifact(str(out_dir / "params.yaml"))
        log.info("head: %s accuracy %.4f%s (best epoch %d of %d) in %.1f s", split, acc,
                 "" if chosen.metric == "accuracy" else f", {chosen.metric} {kept[chosen.metric]:.4f}",
                 best + 1, len(hist["loss"]), seconds)
    return metrics


if __name__ == "__main__":
    entry(main)
