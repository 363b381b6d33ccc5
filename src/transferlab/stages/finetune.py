"""Stage finetune: the top `finetune.unfreeze` blocks unfrozen and trained with
the head -> models/finetune/model.keras (uint8 images in, probabilities out),
metrics/finetune.json, plots/finetune/history.csv.

    python -m transferlab.stages.finetune    # dvc.yaml's command; `transferlab finetune` alike

An interrupted run resumes from its last completed epoch: its checkpoint lives
in data/checkpoints/finetune-<key>/ until the stage completes (finetune.Checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from transferlab import backbones, config, data, features, finetune, tracking, training
from transferlab.files import write_atomic, write_json
from transferlab.stages import begin, METRICS, MODELS, PLOTS, PREPARED, entry, features_dir, resolved

log = logging.getLogger(__name__)

KEYS = ("seed", "deterministic", "backbone", "finetune", "tracking.experiment")
CHECKPOINTS = Path("data/checkpoints")


def main(params: config.Params, callbacks: list | None = None) -> dict:
    """Returns the metrics written to metrics/finetune.json. `callbacks`: extra
    Keras callbacks for the fit (bench/recipes.py probes test accuracy with one)."""
    prepared = begin(params)
    b, f = params.backbone, params.finetune
    spec = backbones.get(b.name)
    image_size = int(prepared.x["train"].shape[1])
    head_model = keras.saving.load_model(MODELS / "head" / "model.keras", safe_mode=True)
    body = backbones.build_body(b.name, b.input_size, b.weights)
    out_dir = MODELS / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    n_blocks = finetune.n_unfrozen(spec, f.unfreeze)
    values = config.subset(params, *KEYS)
    feats_dir = features_dir(b.name, b.input_size)
    with tracking.stage_run("finetune", experiment=params.tracking.experiment, backbone=b.name,
                            params=config.flatten(values),
                            inputs=[str(PREPARED), str(feats_dir), str(MODELS / "head")]):
        import mlflow

        metrics = {"unfrozen_blocks": n_blocks}
        if n_blocks > 0:
            cached = finetune.uses_cache(spec, f.mode, f.unfreeze)
            if f.mode == "cached" and not cached:
                log.warning("finetune.unfreeze=%r leaves nothing frozen to cache: using the full path",
                            f.unfreeze)
            metrics.update(train(
                spec, body, head_model, prepared, f, seed=params.seed, image_size=image_size,
                input_size=b.input_size, activations=features.load_activations(feats_dir) if cached else None,
                checkpoint_dir=checkpoint_dir(resolved(values)), callbacks=callbacks,
            ))
        else:
            log.info("finetune.unfreeze is 0: the model is the backbone with the trained head")
            (PLOTS / "finetune").mkdir(parents=True, exist_ok=True)
            (PLOTS / "finetune" / "history.csv").write_text("epoch,train_accuracy,val_accuracy\n")
        model = finetune.assemble(spec, body, head_model, image_size, b.input_size)
        model.save(out_dir / "model.keras")
        write_atomic(out_dir / "params.yaml", resolved(values))
        write_json(METRICS / "finetune.json", metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out_dir / "params.yaml"))
    return metrics


def checkpoint_dir(resolved_params: str) -> Path:
    """Where an interrupted fine-tune resumes from. Keyed by the stage's resolved
    params and the trained head, so a checkpoint of another configuration is never
    restored into this one; checkpoints of other keys are stale and removed."""
    key = hashlib.sha256(resolved_params.encode())
    key.update((MODELS / "head" / "model.keras").read_bytes())
    backup = CHECKPOINTS / f"finetune-{key.hexdigest()[:16]}"
    for stale in CHECKPOINTS.glob("finetune*"):
        if stale != backup:
            log.info("removing a checkpoint of another configuration: %s", stale)
            shutil.rmtree(stale)
    if backup.exists():
        log.info("resuming the interrupted fine-tune from %s", backup)
    return backup


def train(spec, body, head_model, prepared: data.Prepared, f: config.FinetuneConfig, *, seed: int,
          image_size: int, input_size: int, activations: dict | None, checkpoint_dir: Path,
          callbacks: list | None = None) -> dict:
    """Fine-tune with resumable checkpoints; the model keeps its best epoch's
    weights, or the head's if no epoch beat it. Returns the metrics."""
    y = prepared.y
    a = f.augment
    t = finetune.prepare(
        spec, body, head_model, unfreeze=f.unfreeze, y_train=y["train"], y_val=y["val"],
        batch_size=f.batch_size, seed=seed, activations=activations, flip=a.flip,
        images=None if activations is not None else (prepared.x["train"], prepared.x["val"]),
        image_size=image_size, input_size=input_size,
        augment={"flip": a.flip, "shift": a.shift, "rotation": a.rotation, "zoom": a.zoom},
    )
    # the head's score on the same validation images is what fine-tuning must beat
    baseline = json.loads((METRICS / "head.json").read_text()).get("best_val_accuracy") if t.val else None
    cbs, checkpoint = finetune.callbacks(checkpoint_dir, patience=f.patience, schedule=f.schedule,
                                         has_val=t.val is not None, baseline=baseline,
                                         extra=[tracking.EpochLogger(), *(callbacks or [])])
    start = time.perf_counter()
    finetune.fit(t, optimizer=f.optimizer, learning_rate=f.learning_rate, weight_decay=f.weight_decay,
                 schedule=f.schedule, warmup_epochs=f.warmup_epochs, epochs=f.epochs,
                 batch_size=f.batch_size, callbacks=cbs, verbose=training.verbosity())
    seconds = time.perf_counter() - start
    checkpoint.restore_best(t.model)  # the best epoch, not the last
    hist = checkpoint.history()
    training.write_history(PLOTS / "finetune" / "history.csv", hist)
    monitor = training.monitor(t.val is not None)
    best = int(np.argmax(hist[monitor]))
    improved = baseline is None or hist[monitor][best] > baseline
    if not improved:
        log.warning("no fine-tune epoch beat the head's %s of %.4f: keeping the weights it started from",
                    monitor, baseline)
    shutil.rmtree(checkpoint_dir)  # done: a later run starts fresh
    return {
        "path": t.path,
        f"best_{monitor}": round(max(hist[monitor][best], baseline or 0.0), 5),
        "best_epoch": best + 1 if improved else 0,
        "epochs_run": len(hist[monitor]),
        "finetune_seconds": round(seconds, 2),
        "train_images_per_second": round(t.n_train * len(hist[monitor]) / seconds, 1),
    }


if __name__ == "__main__":
    entry(main)
