"""Stage finetune: the top `finetune.unfreeze` blocks unfrozen and trained with
the head -> models/finetune/model.keras (uint8 images in, probabilities out),
metrics/finetune.json, plots/finetune/history.csv.

    python -m transferlab.stages.finetune    # dvc.yaml's command; `transferlab finetune` alike

Under a budget, a probe of a few steps plans its length and the run plans
again as it trains (transferlab.budget). An interrupted run resumes from its
last completed epoch: its checkpoint lives in data/checkpoints/finetune-<key>/
until the stage completes (transferlab.train.checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras

from transferlab import backbones, budget, config, data, device, features, tracking
from transferlab.files import write_atomic, write_json
from transferlab.stages import (METRICS, MODELS, PLOTS, PREPARED, end_stage, entry, features_dir,
                                recorded_stage_seconds, resolved, stage_seconds)
from transferlab.stages.common import PARAMS_CHECKS, begin  # noqa: F401 (PARAMS_CHECKS: for stages.run)
from transferlab.train import checkpoint as checkpoints
from transferlab.train import mirror, precision, selection, session, surgery, trainer
from transferlab.train.recipe import Recipe

log = logging.getLogger(__name__)

KEYS = ("seed", "deterministic", "precision", "distribute", "select", "class_weight", "budget", "backbone",
        "finetune", "tracking.experiment")
CHECKPOINTS = Path("data/checkpoints")


def main(params: config.Params, callbacks: list | None = None) -> dict:
    """Returns the metrics written to metrics/finetune.json. `callbacks`: extra
    Keras callbacks for the fit (bench/recipes.py probes test accuracy with one)."""
    prepared = begin(params)
    with device.strategy(params.distribute).scope():  # every variable, the optimizer's too, made under it
        return _main(params, prepared, callbacks)


def _main(params: config.Params, prepared: data.Prepared, callbacks: list | None) -> dict:
    b, f = params.backbone, params.finetune
    spec = backbones.get(b.name)
    head_model = keras.saving.load_model(MODELS / "head" / "model.keras", safe_mode=True)
    size = budget.input_size(b.input_size, params.budget)  # as the features stage resolved it
    body = backbones.build_body(b.name, size, b.weights)  # as the features stage built it
    stage_policy = keras.mixed_precision.global_policy().name  # the body's: float32 on a CPU
    unfrozen = surgery.n_unfrozen(spec, f.unfreeze)
    cached = surgery.uses_cache(spec, f.mode, f.unfreeze)
    small_size = surgery.progressive_size(spec, size, f.progressive.scale, f.progressive.fraction, unfrozen,
                                          cached)
    values = config.subset(params, *KEYS)
    feats_dir = features_dir(b.name, b.input_size)
    directory = checkpoints.keyed_directory(CHECKPOINTS, resolved(values), MODELS / "head" / "model.keras")
    with tracking.stage_run("finetune", experiment=params.tracking.experiment, backbone=b.name,
                            params=config.flatten(values),
                            inputs=[str(PREPARED), str(feats_dir), str(MODELS / "head")], dataset=prepared.manifest):
        import mlflow

        metrics = {"input_size": size, "unfrozen_blocks": unfrozen, "replicas": device.replicas(params.distribute)}
        trained = body
        if unfrozen > 0:
            if f.mode == "cached" and not cached:
                log.warning("finetune.unfreeze=%r leaves nothing frozen to cache: using the full mode", f.unfreeze)
            chosen = selection.resolve(params.select, params.class_weight, prepared.manifest["counts"]["train"])
            metrics.update(chosen.record())
            head_metrics = json.loads((METRICS / "head.json").read_text())
            flip, reason = mirror.resolve(f.augment.flip, head_metrics, "finetune.augment.flip")
            log.info("finetune: %s", reason)
            metrics["augment_flip"] = int(flip)
            r = Recipe.from_params(f, seed=params.seed, selection=chosen, flip=flip,  # batch_size per replica
                                   batch_size=device.global_batch(f.batch_size, params.distribute))
            activations = features.load_activations(feats_dir) if cached else None

            def build(policy: str) -> tuple[keras.Model, trainer.FineTuning]:
                """The body that trains and its fine-tune, under `policy`."""
                trains = body
                if small_size or policy != stage_policy:
                    # the same weights in a body for any input size (progressive resizing), or in another policy
                    trains = backbones.build_body(b.name, size, weights=None, any_size=bool(small_size))
                    trains.set_weights(body.get_weights())
                return trains, trainer.build(
                    spec, trains, head_model, r, y_train=prepared.y["train"], y_val=prepared.y["val"],
                    images=None if cached else (prepared.x["train"], prepared.x["val"]),
                    image_size=int(prepared.x["train"].shape[1]), input_size=size, activations=activations,
                    small_size=small_size)

            budget_seconds = budget.parse(params.budget)
            saved = checkpoints.Checkpoint.saved_plan(directory) if budget_seconds else None
            startup = stage_seconds()  # loaded, not yet built or timed: as long as the evaluate stage's start-up
            choice, (trained, t), probed = precision.select(params.precision, device.kind(), saved, build,
                                                            lambda built: trainer.probe(built[1], r.batch_size))
            metrics.update(precision.record(choice))
            mlflow.set_tag("precision", choice.precision)
            start = session.Start(
                directory, head=head_metrics, n_classes=len(prepared.classes),
                n_val=len(prepared.y["val"]), n_test=len(prepared.y["test"]), precision=choice, saved=saved,
                probed=probed, clock=_clock(budget_seconds, startup) if budget_seconds and not saved else None)
            metrics.update(session.run(t, r, f, start, history_csv=PLOTS / "finetune" / "history.csv",
                                       callbacks=[tracking.EpochLogger(), *(callbacks or [])]))
        else:
            log.info("finetune.unfreeze is 0: the model is the backbone with the trained head")
            (PLOTS / "finetune").mkdir(parents=True, exist_ok=True)
            (PLOTS / "finetune" / "history.csv").write_text("epoch,train_accuracy,val_accuracy\n")
        if trained is not body:  # the saved model: the fixed input size and the stage's own policy
            body.set_weights(trained.get_weights())
            surgery.set_trainable(spec, body, f.unfreeze, f.train_bn, f.train_depthwise)
        out_dir = MODELS / "finetune"
        out_dir.mkdir(parents=True, exist_ok=True)
        surgery.assemble(spec, body, head_model, int(prepared.x["train"].shape[1]), size).save(out_dir / "model.keras")
        write_atomic(out_dir / "params.yaml", resolved(values))
        metrics["stage_seconds"] = round(end_stage(), 2)
        write_json(METRICS / "finetune.json", metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if "select_metric" in metrics:
            mlflow.set_tag("select_metric", metrics["select_metric"])
        mlflow.log_artifact(str(out_dir / "params.yaml"))
    return metrics


def _clock(budget_seconds: float, startup_seconds: float) -> session.Clock:
    """The budget as the fine-tune plans with it, now: the earlier stages'
    recorded times and this stage's so far spent. `startup_seconds`: this
    stage's before it built and timed its model (the precision's probe), the
    evaluate stage's start-up reserved alike."""
    feats = json.loads((METRICS / "features.json").read_text())
    return session.Clock(budget_seconds, spent_seconds=recorded_stage_seconds("prepare", "features", "head")
                         + stage_seconds(), startup_seconds=startup_seconds,
                         inference_images_per_second=float(feats["features_images_per_second"]))


if __name__ == "__main__":
    entry(main)
