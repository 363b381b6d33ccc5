"""Command line: one short function per pipeline stage.

    transferlab prepare   # data source -> data/prepared/
    transferlab features  # frozen backbone -> data/features/<backbone>-<size>px/
    transferlab head      # head on cached features -> models/head/, metrics/head.json
    transferlab finetune  # unfreeze the top blocks -> models/finetune/
    transferlab evaluate  # test set -> metrics/evaluate.json, registered model
    transferlab run --set backbone.name=vgg16   # overrides -> params.yaml -> dvc repro
    transferlab tune [--workers 4 --storage postgresql+psycopg2://...]  # Optuna search
    transferlab predict photos/ --top-k 3   # the registered champion on image files
    transferlab export --out exports/       # SavedModel + TFLite, checked against Keras
    transferlab ui                          # the MLflow UI on this project's store
    transferlab compare                     # backbones side by side, from MLflow

Each reads params.yaml (or --params), calls the library, writes its outputs and
logs one MLflow run. `dvc repro` runs them in order (dvc.yaml).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import shutil
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
    """The resolved params, as written beside every output (secrets in URLs masked)."""
    from transferlab.redact import redact_tree

    return yaml.safe_dump(redact_tree(config.to_dict(params)), sort_keys=False)


# --------------------------------------------------------------------------- stages


def cmd_prepare(params: config.Params) -> None:
    from transferlab import data, tracking
    from transferlab.redact import redact

    d = params.data
    start = time.perf_counter()
    ds, digest = data.load_source(
        d.source, d.format, Path(d.cache_dir), d.checksum, d.image_size, d.test_fraction, params.seed
    )
    manifest = data.write_prepared(
        ds, PREPARED, d.val_fraction, params.seed,
        {"source": redact(d.source), "checksum": digest, "format": d.format, "seed": params.seed},
    )
    (PREPARED / "params.yaml").write_text(_resolved(params))
    seconds = time.perf_counter() - start
    log.info("prepare: %s in %.1f s; skipped %d file(s)", manifest["totals"], seconds, manifest["num_skipped"])
    with tracking.stage_run(
        "prepare", experiment=params.tracking.experiment, backbone=params.backbone.name,
        params=config.flatten({"seed": params.seed, "data": config.to_dict(params)["data"]}), inputs=[],
    ):
        import mlflow

        mlflow.log_metrics({f"{k}_images": v for k, v in manifest["totals"].items()})
        mlflow.log_metrics({"num_skipped": manifest["num_skipped"], "prepare_seconds": seconds})
        mlflow.set_tag("data.checksum", digest)
        mlflow.log_artifact(str(PREPARED / "manifest.json"))


def uses_activation_cache(params: config.Params) -> bool:
    from transferlab import backbones, finetune

    spec = backbones.get(params.backbone.name)
    n = finetune.n_unfrozen(spec, params.finetune.unfreeze)
    return params.finetune.mode == "cached" and 0 < n < len(spec.blocks)


def cmd_features(params: config.Params) -> None:
    import keras

    from transferlab import backbones, data, features, finetune, tracking

    keras.utils.set_random_seed(params.seed)
    prepared = data.load_prepared(PREPARED)
    b = params.backbone
    spec = backbones.get(b.name)
    image_size = int(prepared.x["train"].shape[1])
    meta = {"backbone": b.name, "input_size": b.input_size, "weights": b.weights, "image_size": image_size}
    if uses_activation_cache(params):
        body = backbones.build_body(b.name, b.input_size, b.weights)
        split = finetune.split_body(spec, body, params.finetune.unfreeze)
        model = finetune.cache_extractor(spec, split, image_size, b.input_size)
        meta.update(boundary=split.boundary, unfreeze=params.finetune.unfreeze)
    else:
        model = backbones.build_feature_extractor(b.name, image_size, b.input_size, b.weights)
    out_dir = features_dir(params)
    start = time.perf_counter()
    meta = features.extract_splits(model, prepared.x, out_dir, params.features.batch_size, meta)
    (out_dir / "params.yaml").write_text(_resolved(params))
    seconds = time.perf_counter() - start
    total = sum(t["images"] for t in meta["timings"].values())
    summary = {"features_seconds": round(seconds, 2), "features_images_per_second": round(total / seconds, 1)}
    _write_json(METRICS / "features.json", summary)
    with tracking.stage_run(
        "features", experiment=params.tracking.experiment, backbone=b.name,
        params=config.flatten({"backbone": config.to_dict(params)["backbone"],
                               "features": config.to_dict(params)["features"],
                               "finetune.unfreeze": params.finetune.unfreeze,
                               "finetune.mode": params.finetune.mode}),
        inputs=[str(PREPARED)],
    ):
        import mlflow

        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(out_dir / "meta.json"))


def cmd_head(params: config.Params, callbacks: list | None = None) -> None:
    """`callbacks`: extra Keras callbacks for the head's fit (bench/recipes.py probes with them)."""
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
            batch_size=h.batch_size, patience=h.patience,
            callbacks=[tracking.EpochLogger(), *(callbacks or [])],
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


def cmd_finetune(params: config.Params, callbacks: list | None = None) -> None:
    """`callbacks`: extra Keras callbacks for the fine-tune's fit."""
    import keras
    import mlflow

    from transferlab import backbones, data, finetune, tracking

    keras.utils.set_random_seed(params.seed)
    prepared = data.load_prepared(PREPARED)
    b, f = params.backbone, params.finetune
    spec = backbones.get(b.name)
    image_size = int(prepared.x["train"].shape[1])
    head_model = keras.saving.load_model(MODELS / "head" / "model.keras", safe_mode=True)
    body = backbones.build_body(b.name, b.input_size, b.weights)
    out_dir = MODELS / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    n_blocks = finetune.n_unfrozen(spec, f.unfreeze)
    with tracking.stage_run(
        "finetune", experiment=params.tracking.experiment, backbone=b.name,
        params=config.flatten({"seed": params.seed, "backbone": config.to_dict(params)["backbone"],
                               "finetune": config.to_dict(params)["finetune"]}),
        inputs=[str(PREPARED), str(features_dir(params)), str(MODELS / "head")],
    ):
        metrics = {"unfrozen_blocks": n_blocks}
        if n_blocks > 0:
            metrics.update(_train_finetune(params, spec, body, head_model, prepared, image_size, callbacks))
        else:
            log.info("finetune.unfreeze is 0: the model is the backbone with the trained head")
            (PLOTS / "finetune").mkdir(parents=True, exist_ok=True)
            (PLOTS / "finetune" / "history.csv").write_text("epoch,train_accuracy,val_accuracy\n")
        model = finetune.assemble(spec, body, head_model, image_size, b.input_size)
        model.save(out_dir / "model.keras")
        (out_dir / "params.yaml").write_text(_resolved(params))
        _write_json(METRICS / "finetune.json", metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out_dir / "params.yaml"))


def _checkpoint_dir(params: config.Params) -> Path:
    """Where an interrupted fine-tune resumes from. Keyed by the resolved params
    and the trained head, so a checkpoint of another configuration is never
    restored into this one; checkpoints of other keys are stale and removed."""
    import hashlib

    key = hashlib.sha256(_resolved(params).encode())
    key.update((MODELS / "head" / "model.keras").read_bytes())
    root = Path("data/checkpoints")
    backup = root / f"finetune-{key.hexdigest()[:16]}"
    for stale in root.glob("finetune*"):
        if stale != backup:
            log.info("removing a checkpoint of another configuration: %s", stale)
            shutil.rmtree(stale)
    if backup.exists():
        log.info("resuming the interrupted fine-tune from %s", backup)
    return backup


def _train_finetune(params, spec, body, head_model, prepared, image_size, extra=None) -> dict:
    import numpy as np

    from transferlab import features, finetune, tracking

    b, f = params.backbone, params.finetune
    cached = uses_activation_cache(params)
    if f.mode == "cached" and not cached:
        log.warning("finetune.unfreeze=%r leaves nothing frozen to cache: using the full path", f.unfreeze)
    n_train, bs = len(prepared.y["train"]), f.batch_size
    steps = -(-n_train // bs)
    trainable = finetune.set_trainable(spec, body, f.unfreeze)
    if cached:
        split = finetune.split_body(spec, body, f.unfreeze)
        acts = features.load_activations(features_dir(params))
        model = finetune.assemble_upper(split, head_model)
        train = finetune.FlipCacheDataset(acts["train"], acts.get("train_flip") if f.augment.flip else None,
                                          prepared.y["train"], bs, params.seed)
        val = (np.asarray(acts["val"], np.float32), prepared.y["val"]) if len(prepared.y["val"]) else None
        fit_kwargs = {}
    else:
        a = f.augment
        augment = finetune.augmentation(a.flip, a.shift, a.rotation, a.zoom, params.seed)
        model = finetune.assemble(spec, body, head_model, image_size, b.input_size, augment)
        train = np.asarray(prepared.x["train"])
        val = (np.asarray(prepared.x["val"]), prepared.y["val"]) if len(prepared.y["val"]) else None
        fit_kwargs = {"y": prepared.y["train"], "batch_size": bs, "shuffle": True}
    lr = finetune.learning_rate(f.schedule, f.learning_rate, f.epochs, steps, f.warmup_epochs)
    finetune.compile_model(model, f.optimizer, lr, f.weight_decay)
    backup = _checkpoint_dir(params)
    # the head's score on the same validation images is what fine-tuning must beat
    baseline = json.loads((METRICS / "head.json").read_text()).get("val_accuracy") if val is not None else None
    cbs, checkpoint = finetune.callbacks(backup, patience=f.patience, schedule=f.schedule,
                                         has_val=val is not None, extra=[tracking.EpochLogger(), *(extra or [])],
                                         baseline=baseline)
    log.info("finetune: %s path, top %s block(s) of %s unfrozen (%d trainable tensors in the body)",
             "cached" if cached else "full", f.unfreeze, spec.name, trainable)
    start = time.perf_counter()
    # verbose=1: a progress bar per epoch (in a log file it writes its updates as lines)
    model.fit(train, validation_data=val, epochs=f.epochs, callbacks=cbs, verbose=1, **fit_kwargs)
    seconds = time.perf_counter() - start
    checkpoint.restore_best(model)  # the best epoch, not the last
    hist = checkpoint.history()
    _write_history(PLOTS / "finetune" / "history.csv", hist)
    monitor = "val_accuracy" if val is not None else "accuracy"
    best = int(np.argmax(hist[monitor]))
    improved = baseline is None or hist[monitor][best] > baseline
    if not improved:
        log.warning("no fine-tune epoch beat the head's %s of %.4f: keeping the weights it started from",
                    monitor, baseline)
    shutil.rmtree(backup)  # done: a later run starts fresh
    return {
        "path": "cached" if cached else "full",
        f"best_{monitor}": round(max(hist[monitor][best], baseline or 0.0), 5),
        "best_epoch": best + 1 if improved else 0,
        "epochs_run": len(hist[monitor]),
        "finetune_seconds": round(seconds, 2),
        "train_images_per_second": round(n_train * len(hist[monitor]) / seconds, 1),
    }


def cmd_evaluate(params: config.Params) -> None:
    import keras
    import mlflow
    import numpy as np

    from transferlab import backbones, data, evaluate, features, tracking

    prepared = data.load_prepared(PREPARED)
    model = keras.saving.load_model(MODELS / "finetune" / "model.keras", safe_mode=True)
    x, y = prepared.x["test"], prepared.y["test"]
    tta = params.evaluate.tta
    start = time.perf_counter()
    probs, single = features.predict_tta(model, x, params.evaluate.batch_size, tta, desc="evaluate test")
    single_view = float((single.argmax(axis=1) == y).mean())
    seconds = time.perf_counter() - start
    model = backbones.with_tta(model, tta)  # the model that is logged and registered
    y_pred = probs.argmax(axis=1)
    result = evaluate.summarize(y, probs, prepared.classes)
    metrics = {"test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
               "test_accuracy_single_view": round(single_view, 5),
               "evaluate_seconds": round(seconds, 2),
               "test_images_per_second": round(len(y) / seconds, 1),
               "parameters": int(model.count_params())}
    _write_json(METRICS / "evaluate.json", metrics)
    evaluate.write_confusion_csv(y, y_pred, prepared.classes, PLOTS / "evaluate" / "confusion.csv")
    png = evaluate.confusion_png(result["confusion"], prepared.classes, PLOTS / "evaluate" / "confusion.png",
                                 f"{params.backbone.name} on test: accuracy {metrics['test_accuracy']:.4f}")
    _write_json(METRICS / "per_class.json", result["per_class"])
    with tracking.stage_run(
        "evaluate", experiment=params.tracking.experiment, backbone=params.backbone.name,
        params=config.flatten({"evaluate": config.to_dict(params)["evaluate"],
                               "tracking.model_name": params.tracking.model_name}),
        inputs=[str(PREPARED), str(MODELS / "finetune")],
    ):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(png), "confusion")
        mlflow.log_artifact(str(PLOTS / "evaluate" / "confusion.csv"), "confusion")
        mlflow.log_dict(result["per_class"], "reports/test_per_class.json")
        mlflow.log_dict(result["confusion"].tolist(), "confusion/confusion_test.json")
        model_uri = tracking.log_keras_model(model, np.asarray(x[:2]), probs[:2], prepared.classes)
        version, promoted, reason = tracking.register_and_promote(
            model_uri, params.tracking.model_name, metrics["test_accuracy"])
        mlflow.set_tags({"registered_version": version, "champion": str(promoted).lower(),
                         "champion_reason": reason})
    tracking.end_parent()
    log.info("evaluate: test accuracy %.4f, loss %.4f (%d images, %.1f s)",
             metrics["test_accuracy"], metrics["test_loss"], len(y), seconds)


# --------------------------------------------------------------------------- run


def _redacted(changes: dict) -> dict:
    from transferlab.redact import redact_tree

    return redact_tree(changes)


def apply_overrides(path: Path, overrides: list[str]) -> dict:
    """Write `key.sub=value` overrides into the params file, keeping its comments
    (ruamel, as `dvc exp run -S` does), so params.yaml stays the one source of
    truth. Empty values are skipped; an invalid result is rolled back."""
    from ruamel.yaml import YAML

    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise config.ConfigError(f"--set expects key=value, received: {item!r}")
        if value.strip() != "":
            changes[key.strip()] = yaml.safe_load(value)
    if not changes:
        return {}
    ryaml = YAML()
    ryaml.preserve_quotes = True
    original = path.read_text()
    doc = ryaml.load(original)
    for key, value in changes.items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    with path.open("w") as fh:
        ryaml.dump(doc, fh)
    try:
        config.load(path)
    except config.ConfigError:
        path.write_text(original)
        raise
    return changes


class ProjectBusy(RuntimeError):
    """Another pipeline run (or DVC command) holds this project folder."""


@contextlib.contextmanager
def project_lock(root: Path = Path(".")):
    """One `transferlab run` (so one `mlflow run`) per project folder at a time,
    and none while another DVC command holds the repository: a second run would
    rewrite params.yaml under the first one's stages. Held until `dvc repro`
    ends. Separate clones are separate folders and may share one MLflow store."""
    import fcntl

    tmp = root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else root
    tmp.mkdir(parents=True, exist_ok=True)
    fh = open(tmp / "transferlab-run.lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise ProjectBusy(
                f"{root.resolve()}: another pipeline run is using this project folder "
                f"({fh.read().strip() or 'unknown'}). Wait for it to end, or start this one in a separate "
                "clone (`git worktree add ../other`); clones may share one MLflow store."
            ) from None
        dvc_lock = root / ".dvc" / "tmp" / "lock"  # DVC's own repository lock (zc.lockfile: flock)
        if dvc_lock.exists():
            with open(dvc_lock, "a+") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ProjectBusy(
                        f"{root.resolve()}: a DVC command (`dvc repro`?) is running in this project; "
                        "params.yaml is left as it is. Wait for it to end, or use a separate clone."
                    ) from None
                fcntl.flock(probe, fcntl.LOCK_UN)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def cmd_run(params_path: Path, overrides: list[str]) -> int:
    """The whole pipeline as one MLflow parent run: overrides -> params.yaml ->
    `dvc repro`, each stage a child run. Under `mlflow run`, the run it started
    is the parent. Refused while another run holds the project (project_lock)."""
    with project_lock(Path.cwd()):
        return _run_pipeline(params_path, overrides)


def _run_pipeline(params_path: Path, overrides: list[str]) -> int:
    import subprocess

    from transferlab import tracking

    changes = apply_overrides(params_path, overrides)
    if changes:
        log.info("params.yaml overrides: %s", _redacted(changes))
    params = config.load(params_path)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    own_parent = None
    if env.get("MLFLOW_RUN_ID"):
        env[tracking.PARENT_ENV] = env.pop("MLFLOW_RUN_ID")
    else:
        mlflow = tracking.setup(params.tracking.experiment)
        own_parent = mlflow.MlflowClient().create_run(
            mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id,
            run_name=f"pipeline-{params.backbone.name}",
            tags={"stage": "pipeline", "backbone": params.backbone.name,
                  "git_commit": tracking.git_commit()},
        ).info.run_id
        env[tracking.PARENT_ENV] = own_parent
    code = subprocess.run(["dvc", "repro"], env=env).returncode
    if own_parent is not None:
        import mlflow

        mlflow.MlflowClient().set_terminated(own_parent, "FINISHED" if code == 0 else "FAILED")
    return code


# --------------------------------------------------------------------------- tune


def cmd_tune(params_path: Path, args: argparse.Namespace) -> int:
    """Create or join the Optuna study, run trials (in --workers processes),
    then evaluate and register the best trial's model. With --worker: only run
    trials, joining a study another `transferlab tune` started."""
    from transferlab import tune

    changes = apply_overrides(params_path, args.set)
    if changes:
        log.info("params.yaml overrides: %s", _redacted(changes))
    params = config.load(params_path)
    url = args.storage or os.environ.get(tune.STORAGE_ENV) or params.tune.storage
    if not (PREPARED / "manifest.json").exists():
        raise FileNotFoundError(f"{PREPARED}: no prepared data; run `dvc repro prepare` first")
    if args.worker:
        os.environ.pop("MLFLOW_RUN_ID", None)
        tune.work(params, url, PREPARED, args.worker_id)
        return 0
    if args.workers > 1 and tune.is_sqlite(url):
        raise config.ConfigError(
            f"--workers {args.workers} with SQLite storage ({url}): SQLite is for one worker. For several "
            "workers, on this machine or many, use PostgreSQL: --storage "
            "postgresql+psycopg2://user:password@host/db (README: Several workers)"
        )
    # Under `mlflow run -e tune` its run becomes the study's parent run; taken out of
    # the environment so that no trial (nor worker process) resumes it as its own.
    outer = os.environ.pop("MLFLOW_RUN_ID", None)
    start = time.perf_counter()
    tune.ensure_cache(params, PREPARED)
    tune.start(params, PREPARED, url, outer)
    if args.workers > 1:
        procs = tune.spawn_workers(args.workers, params_path, url)
        codes = [p.wait() for p in procs]
        if any(codes):
            log.error("worker exit codes: %s", codes)
    else:
        tune.work(params, url, PREPARED)
    summary = tune.finalize(params, PREPARED, url, time.perf_counter() - start,
                            METRICS / "tune.json", PLOTS / "tune")
    log.info("tune: best trial %d (%s), test accuracy %.4f; %s; %.1f s", summary["best_trial"],
             summary["best_params"], summary["test_accuracy"], summary["trials"], summary["study_seconds"])
    return 0


# --------------------------------------------------------------------------- entry

STAGE_HELP = {
    "prepare": "data source -> data/prepared/",
    "features": "frozen backbone -> data/features/<backbone>-<size>px/",
    "head": "head on the cached features -> models/head/",
    "finetune": "unfreeze the top blocks -> models/finetune/",
    "evaluate": "test set -> metrics, registered model",
}
STAGES = {"prepare": cmd_prepare, "features": cmd_features, "head": cmd_head,
          "finetune": cmd_finetune, "evaluate": cmd_evaluate}


# --------------------------------------------------------------------------- use a model


def _load_model(args: argparse.Namespace):
    from transferlab import serve

    if args.model_path:
        return serve.load(path=args.model_path)
    name = args.model or config.load(args.params).tracking.model_name
    return serve.load(name, alias=args.alias, version=args.version)


def cmd_predict(args: argparse.Namespace) -> int:
    from transferlab import serve

    files = serve.image_files(args.inputs)
    if not files:
        raise FileNotFoundError(f"no image files in {args.inputs}")
    loaded = _load_model(args)
    log.info("predict: %d file(s) with %s", len(files), loaded.source)
    rows, skipped = serve.predict(loaded, files, args.top_k, args.batch_size)
    text = serve.format_rows(rows, args.format)
    if args.output:
        Path(args.output).write_text(text)
        log.info("predictions written to %s", args.output)
    else:
        sys.stdout.write(text)
    for item in skipped:
        log.warning("skipped %s (%s)", item["path"], item["error"])
    return 1 if skipped and not rows else 0


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from transferlab import data, serve

    loaded = _load_model(args)
    if (PREPARED / "manifest.json").exists():
        sample = np.asarray(data.load_prepared(PREPARED).x["test"][:args.images])
    else:
        log.warning("no data/prepared: checking the exports on random images")
        sample = np.random.default_rng(0).integers(0, 256, (args.images, loaded.image_size,
                                                              loaded.image_size, 3), dtype=np.uint8)
    report = serve.export(loaded, Path(args.out), sample)
    for name, r in report["formats"].items():
        log.info("export %s: max |p - p_keras| %.2e, top-1 agreement %.4f", name, r["max_abs_diff"],
                 r["top1_agreement"])
    log.info("exported %s to %s", loaded.source, args.out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from transferlab import report

    experiment = args.experiment or config.load(args.params).tracking.experiment
    rows = report.collect(experiment, args.last)
    if not rows:
        log.error("no evaluated pipeline run in experiment %r yet: run `dvc repro` or `mlflow run .`",
                  experiment)
        return 1
    paths = report.write(rows, Path(args.out))
    sys.stdout.write(report.markdown(rows))
    log.info("%d run(s) compared: %s", len(rows), ", ".join(str(p) for p in paths))
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ui_command(host: str, port: int) -> list[str]:
    """`mlflow ui` on the project's store; a warning when it is exposed."""
    from transferlab import tracking

    if host not in LOOPBACK:
        log.warning(
            "--host %s exposes every run, artifact and registered model on port %d to anyone who can "
            "reach it, with no authentication. Keep the default 127.0.0.1 and use an SSH tunnel, or run "
            "an MLflow tracking server with authentication (mlflow server --app-name basic-auth).",
            host, port)
    return [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
            tracking.tracking_uri(), "--host", host, "--port", str(port)]


def ui_url(host: str, port: int, experiment_id: str | None) -> str:
    """The experiment's runs page. MLflow 3.17's UI keeps a GenAI/model-training
    switch in the browser (default GenAI) and opens experiments on the GenAI
    overview whatever their mlflow.experimentKind tag (mlflow/mlflow#24498);
    workflowType=machine_learning in the URL opens the training runs."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"http://{shown}:{port}/#/{page}?workflowType=machine_learning"


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    experiment_id = None
    try:
        import mlflow

        from transferlab import tracking

        if Path(args.params).exists() and (Path(tracking.DEFAULT_DB).exists()
                                           or os.environ.get("MLFLOW_TRACKING_URI")):
            mlflow.set_tracking_uri(tracking.tracking_uri())
            exp = mlflow.get_experiment_by_name(config.load(args.params).tracking.experiment)
            experiment_id = exp.experiment_id if exp else None
    except Exception as exc:  # noqa: BLE001 - the link is a convenience; the UI starts anyway
        log.debug("no experiment id for the link: %s", exc)
    log.info("MLflow UI: %s", ui_url(args.host, args.port, experiment_id))
    return subprocess.run(ui_command(args.host, args.port)).returncode


# --------------------------------------------------------------------------- entry


def _tune_error() -> type:
    from transferlab.tune import TuneError

    return TuneError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="command")
    for name, text in STAGE_HELP.items():
        sub.add_parser(name, parents=[common], help=text)
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="write a params.yaml override first, e.g. --set backbone.name=vgg16")
    sub.add_parser("run", parents=[common, overrides],
                   help="the whole pipeline (dvc repro) as one MLflow parent run")
    tune = sub.add_parser("tune", parents=[common, overrides], help="the Optuna search (params.yaml: tune)")
    tune.add_argument("--workers", type=int, default=1,
                      help="worker processes on this machine (more than 1 needs PostgreSQL storage)")
    tune.add_argument("--storage", help="Optuna storage URL (default: $TRANSFERLAB_TUNE_STORAGE, then "
                      "tune.storage in params.yaml; the variable keeps a password out of `ps`)")
    tune.add_argument("--worker", action="store_true",
                      help="only run trials, joining a study that `transferlab tune` started")
    tune.add_argument("--worker-id", type=int, default=0, help="varies the sampler seed per worker")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="registered model name (default: tracking.model_name)")
    model.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    model.add_argument("--version", help="registry version (instead of the alias)")
    model.add_argument("--model-path", help="a local .keras file instead of the registry")
    predict = sub.add_parser("predict", parents=[common, model], help="classify image files or folders")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders (walked recursively)")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--format", choices=("csv", "json"), default="csv")
    predict.add_argument("--output", help="write here instead of stdout")
    predict.add_argument("--batch-size", type=int, default=64)
    export = sub.add_parser("export", parents=[common, model],
                            help="SavedModel + TFLite (float32, dynamic-range int8), checked against Keras")
    export.add_argument("--out", default="exports", help="output folder (default: exports/)")
    export.add_argument("--images", type=int, default=256, help="test images the check runs on")
    compare = sub.add_parser("compare", parents=[common],
                             help="backbones (and transfer vs scratch) side by side, from MLflow")
    compare.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    compare.add_argument("--last", type=int, help="keep the latest N runs per backbone and weights")
    compare.add_argument("--out", default="reports", help="output folder (default: reports/)")
    ui = sub.add_parser("ui", parents=[common], help="the MLflow UI on the project's store")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, local only)")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from transferlab.backbones import WeightsUnavailable
    from transferlab.data import DataError

    try:
        if args.stage == "run":
            return cmd_run(Path(args.params), args.set)
        if args.stage == "ui":
            return cmd_ui(args)
        if args.stage == "compare":
            return cmd_compare(args)
        if args.stage != "prepare":
            from transferlab.backbones import configure_device

            configure_device()
        if args.stage == "tune":
            return cmd_tune(Path(args.params), args)
        if args.stage == "predict":
            return cmd_predict(args)
        if args.stage == "export":
            return cmd_export(args)
        params = config.load(args.params)
        if params.deterministic and args.stage != "prepare":
            import tensorflow as tf

            tf.config.experimental.enable_op_determinism()
        STAGES[args.stage](params)
    except config.ConfigError as exc:
        log.error("%s", exc)
        return 2
    # LookupError covers serve.ModelNotFound and compare's missing experiment
    except (DataError, WeightsUnavailable, FileNotFoundError, LookupError, ProjectBusy,
            _tune_error()) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
