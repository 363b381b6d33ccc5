"""Command line: one short function per pipeline stage.

    transferlab prepare   # data source -> data/prepared/
    transferlab features  # frozen backbone -> data/features/<backbone>-<size>px/
    transferlab head      # head on cached features -> models/head/, metrics/head.json

Each reads params.yaml (or --params), calls the library, writes its outputs and
logs one MLflow run. `dvc repro` runs them in order (dvc.yaml).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from transferlab import config

log = logging.getLogger("transferlab")

PREPARED = Path("data/prepared")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")


def features_dir(params: config.Params) -> Path:
    return Path("data/features") / f"{params.backbone.name}-{params.backbone.input_size}px"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _resolved(params: config.Params) -> str:
    return yaml.safe_dump(config.to_dict(params), sort_keys=False)


# --------------------------------------------------------------------------- stages


def cmd_prepare(params: config.Params) -> None:
    from transferlab import data, tracking

    d = params.data
    start = time.perf_counter()
    ds, digest = data.load_source(
        d.source, d.format, Path(d.cache_dir), d.checksum, d.image_size, d.test_fraction, params.seed
    )
    manifest = data.write_prepared(
        ds, PREPARED, d.val_fraction, params.seed,
        {"source": d.source, "checksum": digest, "format": d.format, "seed": params.seed},
    )
    (PREPARED / "params.yaml").write_text(_resolved(params))
    seconds = time.perf_counter() - start
    log.info("prepare: %s in %.1f s; skipped %d file(s)", manifest["totals"], seconds, manifest["num_skipped"])
    with tracking.stage_run(
        "prepare", experiment=params.tracking.experiment, backbone=params.backbone.name,
        params=config.flatten({"seed": params.seed, "data": config.to_dict(params)["data"]}), inputs=[],
    ) as run:
        import mlflow

        mlflow.log_metrics({f"{k}_images": v for k, v in manifest["totals"].items()})
        mlflow.log_metrics({"num_skipped": manifest["num_skipped"], "prepare_seconds": seconds})
        mlflow.set_tag("data.checksum", digest)
        mlflow.log_artifact(str(PREPARED / "manifest.json"))


def cmd_features(params: config.Params) -> None:
    import keras

    from transferlab import backbones, data, features, tracking

    keras.utils.set_random_seed(params.seed)
    prepared = data.load_prepared(PREPARED)
    b = params.backbone
    image_size = int(prepared.x["train"].shape[1])
    model = backbones.build_feature_extractor(b.name, image_size, b.input_size, b.weights)
    out_dir = features_dir(params)
    start = time.perf_counter()
    meta = features.extract_splits(
        model, prepared.x, out_dir, params.features.batch_size,
        {"backbone": b.name, "input_size": b.input_size, "weights": b.weights, "image_size": image_size},
    )
    (out_dir / "params.yaml").write_text(_resolved(params))
    seconds = time.perf_counter() - start
    total = sum(t["images"] for t in meta["timings"].values())
    summary = {"features_seconds": round(seconds, 2), "features_images_per_second": round(total / seconds, 1)}
    _write_json(METRICS / "features.json", summary)
    with tracking.stage_run(
        "features", experiment=params.tracking.experiment, backbone=b.name,
        params=config.flatten({"backbone": config.to_dict(params)["backbone"],
                               "features": config.to_dict(params)["features"]}),
        inputs=[str(PREPARED)],
    ):
        import mlflow

        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(out_dir / "meta.json"))


def cmd_head(params: config.Params) -> None:
    import keras
    import mlflow
    import numpy as np

    from transferlab import data, evaluate, features, head, tracking

    keras.utils.set_random_seed(params.seed)
    prepared = data.load_prepared(PREPARED)
    feats, meta = features.load_features(features_dir(params))
    h = params.head
    out_dir = MODELS / "head"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tracking.stage_run(
        "head", experiment=params.tracking.experiment, backbone=params.backbone.name,
        params=config.flatten({"seed": params.seed, "backbone": config.to_dict(params)["backbone"],
                               "head": config.to_dict(params)["head"]}),
        inputs=[str(PREPARED), str(features_dir(params))],
    ):
        model = head.build_head(meta["feature_dim"], len(prepared.classes), h.units, h.dropout)
        start = time.perf_counter()
        history = head.train_head(
            model, feats["train"], prepared.y["train"], feats["val"], prepared.y["val"],
            optimizer=h.optimizer, learning_rate=h.learning_rate, epochs=h.epochs,
            batch_size=h.batch_size, patience=h.patience, callbacks=[tracking.EpochLogger()],
        )
        seconds = time.perf_counter() - start
        has_val = len(prepared.y["val"]) > 0
        eval_split = "val" if has_val else "train"
        y_true = prepared.y[eval_split]
        probs = model.predict(feats[eval_split], batch_size=1024, verbose=0)
        y_pred = probs.argmax(axis=1)
        acc = float((y_pred == y_true).mean())
        hist = history.history
        best = int(np.argmax(hist["val_accuracy" if has_val else "accuracy"]))
        metrics = {
            f"{eval_split}_accuracy": round(acc, 5),
            "train_accuracy": round(float(hist["accuracy"][best]), 5),
            "best_epoch": best + 1,
            "epochs_run": len(hist["loss"]),
            "head_seconds": round(seconds, 2),
        }
        if has_val:
            metrics["val_loss"] = round(float(hist["val_loss"][best]), 5)
        model.save(out_dir / "model.keras")
        (out_dir / "params.yaml").write_text(_resolved(params))
        _write_json(METRICS / "head.json", metrics)
        _write_history(PLOTS / "head" / "history.csv", hist)
        cm = evaluate.confusion(y_true, y_pred, len(prepared.classes))
        png = evaluate.confusion_png(
            cm, prepared.classes, PLOTS / "head" / f"confusion_{eval_split}.png",
            f"head on {params.backbone.name} features: {eval_split} accuracy {acc:.3f}",
        )
        report = evaluate.per_class_report(y_true, y_pred, prepared.classes)
        # Per-epoch curves hold train_*/val_*; the kept (best) model's figures get a
        # best_ prefix so they do not add a point to those curves.
        mlflow.log_metrics({f"best_{eval_split}_accuracy": metrics[f"{eval_split}_accuracy"],
                            "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
                            "head_seconds": metrics["head_seconds"]})
        mlflow.log_artifact(str(png), "confusion")
        mlflow.log_dict(report, f"reports/{eval_split}_per_class.json")
        mlflow.log_dict(cm.tolist(), f"confusion/confusion_{eval_split}.json")
        mlflow.log_artifact(str(out_dir / "params.yaml"))
        log.info("head: %s accuracy %.4f (best epoch %d of %d) in %.1f s",
                 eval_split, acc, best + 1, len(hist["loss"]), seconds)


def _write_history(path: Path, hist: dict) -> None:
    from transferlab.tracking import metric_name

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(hist)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", *[metric_name(n) for n in names]])
        for i in range(len(hist[names[0]])):
            writer.writerow([i + 1, *[f"{float(hist[n][i]):.6g}" for n in names]])


# --------------------------------------------------------------------------- entry

STAGES = {"prepare": cmd_prepare, "features": cmd_features, "head": cmd_head}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        params = config.load(args.params)
    except config.ConfigError as exc:
        log.error("%s", exc)
        return 2
    from transferlab.backbones import WeightsUnavailable
    from transferlab.data import DataError

    try:
        STAGES[args.stage](params)
    except (DataError, WeightsUnavailable, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
