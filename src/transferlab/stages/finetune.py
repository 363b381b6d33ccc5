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
import math
import shutil
import time
from pathlib import Path

import keras

from transferlab import backbones, budget, config, data, device, features, tracking
from transferlab.budget.callback import StepBudget, plan_to_budget
from transferlab.budget.plans import Probe
from transferlab.files import write_atomic, write_json
from transferlab.stages import (METRICS, MODELS, PLOTS, PREPARED, end_stage, entry, features_dir,
                                recorded_stage_seconds, resolved, stage_seconds)
from transferlab.stages.common import PARAMS_CHECKS, begin  # noqa: F401 (PARAMS_CHECKS: for stages.run)
from transferlab.train import checkpoint as checkpoints
from transferlab.train import recipe as recipes
from transferlab.train import precision, schedule, surgery, trainer
from transferlab.train.guard import CollapseGuard
from transferlab.train.recipe import Recipe

log = logging.getLogger(__name__)

KEYS = ("seed", "deterministic", "precision", "distribute", "budget", "backbone", "finetune", "tracking.experiment")
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
            r = Recipe.from_params(f, seed=params.seed,  # batch_size per replica in params
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

            saved = checkpoints.Checkpoint.saved_plan(directory) if budget.parse(params.budget) else None
            choice, (trained, t), probed = precision.select(params.precision, device.kind(), saved, build,
                                                            lambda built: trainer.probe(built[1], r.batch_size))
            metrics.update(precision.record(choice))
            mlflow.set_tag("precision", choice.precision)
            metrics.update(train(t, r, f, prepared, budget.parse(params.budget), directory, callbacks, choice,
                                 saved, probed))
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
        mlflow.log_artifact(str(out_dir / "params.yaml"))
    return metrics


def train(t: trainer.FineTuning, r: Recipe, f: config.FinetuneConfig, prepared: data.Prepared,
          budget_seconds: float | None, directory: Path, callbacks: list | None, choice: precision.Choice,
          saved: dict | None, probed: Probe | None) -> dict:
    """Fine-tune with resumable checkpoints in `directory`; the model keeps its
    best epoch's weights, or the head's if no epoch beat it. Returns the metrics."""
    per_epoch = t.steps_per_epoch(r.batch_size)
    recipe_steps = schedule.total_steps(epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps)
    # the head's score on the same validation images is what fine-tuning must beat
    head = json.loads((METRICS / "head.json").read_text()) if t.val else {}
    head_score = head.get("best_val_accuracy")
    # patience counts epochs of the recipe's length: a schedule that min_steps stretched over more
    # (shorter) epochs waits as many more, so it can reach its low-rate end (a budget's plan does not
    # stretch it: a long budget on a small set still stops)
    patience = math.ceil(f.patience * recipe_steps / max(1, f.epochs * per_epoch))
    cbs, checkpoint = checkpoints.callbacks(directory, patience=patience, schedule=r.schedule,
                                            has_val=t.val is not None, start_score=head_score,
                                            extra=[tracking.EpochLogger(), *(callbacks or [])])
    length = step_budget(t, r, f, prepared, budget_seconds, checkpoint, per_epoch, recipe_steps, choice, saved, probed)
    guard = CollapseGuard(len(prepared.classes), start_loss=head.get("best_val_loss"))
    start = time.perf_counter()
    trainer.fit(t, r, length, callbacks=cbs, verbose=recipes.verbosity(), guard=guard)
    seconds = time.perf_counter() - start
    if length.plan is not None:
        log.info("budget: replay this fine-tune without the clock with %s", length.replay_hint())
    ran = int(keras.ops.convert_to_numpy(t.model.optimizer.iterations))  # early stopping may end it sooner
    checkpoint.restore_best(t.model)  # the best epoch, not the last
    hist = checkpoint.history()
    recipes.write_history(PLOTS / "finetune" / "history.csv", hist)
    monitor = recipes.monitor(t.val is not None)
    if checkpoint.best_epoch == 0:  # ties of the monitor broken by the lower loss (Checkpoint)
        log.warning("no fine-tune epoch beat the head's %s of %.4f: keeping the weights it started from",
                    monitor, head_score)
    shutil.rmtree(directory)  # done: a later run starts fresh
    metrics = {
        "mode": t.mode,
        f"best_{monitor}": round(checkpoint.state["best_value"], 5),
        "best_epoch": checkpoint.best_epoch,
        "epochs_run": len(hist[monitor]),
        "steps": length.final_steps,
        "steps_run": ran,
        "small_steps": length.small_steps,  # progressive resizing: the first ones at small_input_size
        "small_input_size": t.small_size if length.small_steps else 0,
        "finetune_seconds": round(seconds, 2),
        "train_images_per_second": round(ran * t.n_train / per_epoch / seconds, 1),
    }
    if guard.events:  # collapsed or diverged, and recovered (or stopped): train.guard
        metrics.update(collapses=len(guard.events), collapse_events=guard.events)
    if length.plan is not None:
        metrics["plan"] = length.plan.to_dict()  # as the last re-plan left it
    return metrics


def step_budget(t: trainer.FineTuning, r: Recipe, f: config.FinetuneConfig, prepared: data.Prepared,
                budget_seconds: float | None, checkpoint, per_epoch: int, recipe_steps: int,
                choice: precision.Choice, saved: dict | None, probed: Probe | None) -> StepBudget:
    """The fine-tune's length: planned to the budget (an interrupted run resumes
    on the plan it saved, `saved`), or `finetune.replans` / `finetune.steps` /
    the recipe's epochs replayed without the clock. `probed`: the step time the
    precision's choice measured, if it timed one, planned with rather than
    timed again."""
    if budget_seconds:
        if saved:
            return StepBudget(plan=budget.Plan(**saved), checkpoint=checkpoint)
        startup = stage_seconds()
        feats = json.loads((METRICS / "features.json").read_text())
        plan = plan_to_budget(
            probed or trainer.probe(t, r.batch_size), budget_seconds=budget_seconds, startup_seconds=startup,
            spent_seconds=recorded_stage_seconds("prepare", "features", "head") + stage_seconds(),
            # the same network and input size, forward only
            inference_images_per_second=float(feats["features_images_per_second"]),
            n_val=len(prepared.y["val"]), n_test=len(prepared.y["test"]), steps_per_epoch=per_epoch,
            max_steps=recipe_steps,  # the recipe's own length caps the plan: a fast machine finishes early
            small_fraction=f.progressive.fraction, precision=choice.precision,
            precision_step_seconds=choice.step_seconds)
        return StepBudget(plan=plan, live=True, checkpoint=checkpoint)
    first = f.replans[0][1] if f.replans else schedule.total_steps(
        epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps, steps=f.steps)
    # as the budget planned them: a share of the steps planned before any re-plan
    small = budget.small_steps(first, per_epoch, f.progressive.fraction) if t.small is not None else 0
    return StepBudget(steps=first, replans=f.replans, small_steps=small)


if __name__ == "__main__":
    entry(main)
