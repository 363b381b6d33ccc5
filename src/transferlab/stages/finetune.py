"""Stage finetune: the top `finetune.unfreeze` blocks unfrozen and trained with
the head -> models/finetune/model.keras (uint8 images in, probabilities out),
metrics/finetune.json, plots/finetune/history.csv.

    python -m transferlab.stages.finetune    # dvc.yaml's command; `transferlab finetune` alike

An interrupted run resumes from its last completed epoch: its checkpoint lives
in data/checkpoints/finetune-<key>/ until the stage completes (finetune.Checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import keras

from transferlab import backbones, budget, config, data, device, features, finetune, tracking, training
from transferlab.files import write_atomic, write_json
from transferlab.stages import (begin, METRICS, MODELS, PLOTS, PREPARED, entry, features_dir, resolved,
                                stage_seconds)

log = logging.getLogger(__name__)

KEYS = ("seed", "deterministic", "distribute", "budget", "backbone", "finetune", "tracking.experiment")
CHECKPOINTS = Path("data/checkpoints")


def main(params: config.Params, callbacks: list | None = None) -> dict:
    """Returns the metrics written to metrics/finetune.json. `callbacks`: extra
    Keras callbacks for the fit (bench/recipes.py probes test accuracy with one)."""
    prepared = begin(params)
    strategy = device.strategy(params.distribute)
    with strategy.scope():  # every variable, the optimizer's too, made and trained under it
        return _main(params, prepared, callbacks)


def _main(params: config.Params, prepared: data.Prepared, callbacks: list | None) -> dict:
    b, f = params.backbone, params.finetune
    spec = backbones.get(b.name)
    image_size = int(prepared.x["train"].shape[1])
    head_model = keras.saving.load_model(MODELS / "head" / "model.keras", safe_mode=True)
    size = budget.input_size(b.input_size, params.budget)  # as the features stage resolved it
    body = backbones.build_body(b.name, size, b.weights)  # as the features stage built it
    out_dir = MODELS / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    n_blocks = finetune.n_unfrozen(spec, f.unfreeze)
    cached = finetune.uses_cache(spec, f.mode, f.unfreeze)
    small_size = progressive_size(spec, size, f, n_blocks, cached)
    trained = body
    if small_size:  # the same weights in a body for any input size (Keras' own load by input size)
        trained = backbones.build_body(b.name, size, weights=None, any_size=True)
        trained.set_weights(body.get_weights())
    values = config.subset(params, *KEYS)
    feats_dir = features_dir(b.name, b.input_size)
    with tracking.stage_run("finetune", experiment=params.tracking.experiment, backbone=b.name,
                            params=config.flatten(values),
                            inputs=[str(PREPARED), str(feats_dir), str(MODELS / "head")]):
        import mlflow

        metrics = {"input_size": size, "unfrozen_blocks": n_blocks,
                   "replicas": device.replicas(params.distribute)}
        if n_blocks > 0:
            if f.mode == "cached" and not cached:
                log.warning("finetune.unfreeze=%r leaves nothing frozen to cache: using the full path",
                            f.unfreeze)
            metrics.update(train(
                spec, trained, head_model, prepared, f, seed=params.seed, image_size=image_size,
                input_size=size, small_size=small_size,
                activations=features.load_activations(feats_dir) if cached else None,
                checkpoint_dir=checkpoint_dir(resolved(values)), callbacks=callbacks,
                budget_seconds=budget.parse(params.budget),
                batch_size=device.global_batch(f.batch_size, params.distribute),  # per replica in params
            ))
        else:
            log.info("finetune.unfreeze is 0: the model is the backbone with the trained head")
            (PLOTS / "finetune").mkdir(parents=True, exist_ok=True)
            (PLOTS / "finetune" / "history.csv").write_text("epoch,train_accuracy,val_accuracy\n")
        if small_size:  # the saved model's body has the fixed input size, as without progressive resizing
            body.set_weights(trained.get_weights())
            finetune.set_trainable(spec, body, f.unfreeze, f.train_bn, f.train_depthwise)
        model = finetune.assemble(spec, body, head_model, image_size, size)
        model.save(out_dir / "model.keras")
        write_atomic(out_dir / "params.yaml", resolved(values))
        metrics["stage_seconds"] = round(stage_seconds(end=True), 2)
        write_json(METRICS / "finetune.json", metrics)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(out_dir / "params.yaml"))
    return metrics


def progressive_size(spec, input_size: int, f: config.FinetuneConfig, n_blocks: int, cached: bool) -> int:
    """finetune.progressive's smaller input size, or 0 where it does not apply (said in the log)."""
    size = finetune.small_input_size(spec, input_size, f.progressive.scale, f.progressive.fraction)
    wanted = f.progressive.scale < 1 and f.progressive.fraction > 0
    if wanted and n_blocks and (cached or not size):
        log.info("finetune.progressive: one input size here (%s)", "the cached path caches activations at one size"
                 if cached else f"{input_size} px is no multiple of 32, or none lies from {spec.min_size} px below it")
    return size if n_blocks and not cached else 0


def checkpoint_dir(resolved_params: str) -> Path:
    """Where an interrupted fine-tune resumes from. Keyed by the stage's resolved
    params, the trained head and the weights files' layout, so a checkpoint of
    another configuration (or one an older version wrote) is never restored into
    this one; checkpoints of other keys are stale and removed."""
    key = hashlib.sha256(resolved_params.encode())
    key.update((MODELS / "head" / "model.keras").read_bytes())
    key.update(finetune.CHECKPOINT_LAYOUT.encode())
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
          budget_seconds: float | None = None, callbacks: list | None = None, batch_size: int = 0,
          small_size: int = 0) -> dict:
    """Fine-tune with resumable checkpoints; the model keeps its best epoch's
    weights, or the head's if no epoch beat it. Under a budget, the length is
    planned first (`plan_steps`). `batch_size`: of one step, over every replica
    (default finetune.batch_size). `small_size`: progressive resizing's smaller
    input size (full path only; `body` built for any size), 0: off. Returns the metrics."""
    batch_size = batch_size or f.batch_size
    y = prepared.y
    a = f.augment
    t = finetune.prepare(
        spec, body, head_model, unfreeze=f.unfreeze, y_train=y["train"], y_val=y["val"],
        batch_size=batch_size, seed=seed, activations=activations, flip=a.flip,
        images=None if activations is not None else (prepared.x["train"], prepared.x["val"]),
        image_size=image_size, input_size=input_size,
        augment=config.augment_options(a),
        small_size=small_size, train_bn=f.train_bn, train_depthwise=f.train_depthwise,
    )
    per_epoch = finetune.steps_per_epoch(t, batch_size)
    plan = deadline = resumed = None
    replans = f.replans  # a budgeted run's re-plans, replayed without the clock
    if budget_seconds:
        # an interrupted run resumes on the plan it started with and the re-plans it made, not a new one
        resumed = resumed_plan(checkpoint_dir)
        plan = resumed or plan_steps(t, f, prepared, budget_seconds, batch_size)
        deadline = time.monotonic() + plan.window_seconds
        replans = plan.replans
        steps = plan.steps
    else:
        steps = finetune.total_steps(epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps,
                                     steps=f.steps)
    first = replans[0][1] if replans else steps  # the schedule's length until the first re-plan
    if plan is not None:
        small = plan.small_steps
    else:
        # as the budget planned them: a share of the steps planned before any re-plan
        small = budget.small_steps(first, per_epoch, f.progressive.fraction) if t.small is not None else 0
    if plan is None and replans:  # a replay: its first plan's length, then what it recorded
        steps = replans[-1][1]
        log.info("finetune: replaying finetune.replans %s: the schedule's end moves at those steps", replans)
    log.info("finetune: %d steps (%.2f epochs of %d steps), %s schedule to zero at the last step",
             steps, steps / per_epoch, per_epoch, f.schedule)
    if small:
        log.info("finetune: progressive resizing: the first %d steps (%d epochs) at %d px, the other %d at %d px",
                 small, small // per_epoch, t.small_size, steps - small, input_size)
    # the head's score on the same validation images is what fine-tuning must beat
    baseline = json.loads((METRICS / "head.json").read_text()).get("best_val_accuracy") if t.val else None
    extra = [tracking.EpochLogger(), *(callbacks or [])]
    progress = BudgetProgress(plan) if plan is not None else None
    if progress is not None:
        extra.append(progress)
    # patience counts epochs of the recipe's length: a schedule that min_steps stretched
    # over more (shorter) epochs waits as many more, so it can reach its low-rate end
    # (a budget's plan does not stretch it: a long budget on a small set still stops)
    recipe = finetune.total_steps(epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps)
    patience = math.ceil(f.patience * recipe / max(1, f.epochs * per_epoch))
    cbs, checkpoint = finetune.callbacks(checkpoint_dir, patience=patience, schedule=f.schedule,
                                         has_val=t.val is not None, baseline=baseline, extra=extra)
    replan = halted = None
    if plan is not None:
        checkpoint.state["plan"] = plan.to_dict()
    if plan is not None and resumed is None:
        def replan(step_seconds: float, steps_done: int) -> int:
            """The budget's plan again, from the fine-tune's own latest steps (finetune.Replan)."""
            nonlocal plan
            left = deadline - time.monotonic()
            plan = budget.replan(plan, step_seconds=step_seconds, steps_done=steps_done, seconds_left=left)
            progress.plan = plan
            checkpoint.note(plan=plan.to_dict())  # a resumed run replays it
            log.info("budget: after %d steps at %.3f s each lately (the probe: %.3f s), %.0f s left -> %d steps "
                     "(%.2f epochs; the probe's plan: %d)", steps_done, step_seconds, plan.step_seconds, left,
                     plan.steps, plan.epochs, plan.probe_steps)
            import mlflow

            mlflow.log_metrics({"planned_steps": plan.steps, "step_seconds": step_seconds}, step=steps_done)
            return plan.steps

        def halted(steps_done: int) -> None:
            """The fine-tune's window is over (finetune.Replan's deadline): it ends at this step."""
            nonlocal plan
            planned = plan.steps
            plan = budget.cut(plan, steps_done=steps_done)
            progress.plan = plan
            checkpoint.note(plan=plan.to_dict())
            log.warning("budget: the fine-tune's window is over after %d of the %d steps planned (the machine "
                        "ran slower than the last re-plan timed): it ends here, to finish within the budget",
                        steps_done, planned)
            import mlflow

            mlflow.log_metric("planned_steps", steps_done, step=steps_done)

    start = time.perf_counter()
    finetune.fit(t, optimizer=f.optimizer, learning_rate=f.learning_rate, weight_decay=f.weight_decay,
                 schedule=f.schedule, warmup_epochs=f.warmup_epochs, steps=first, batch_size=batch_size,
                 label_smoothing=f.label_smoothing, callbacks=cbs, verbose=training.verbosity(), small_steps=small,
                 replan=replan, replans=replans, max_steps=plan.max_steps if plan is not None else 0, ema=f.ema,
                 # the last validation still has to run inside the window
                 deadline=deadline - plan.val_seconds if replan is not None else None,
                 halted=halted)
    seconds = time.perf_counter() - start
    if plan is not None:
        steps = plan.steps
        log.info("budget: replay this fine-tune without the clock with budget: 0 and %s",
                 f"finetune.replans: {plan.replans}" if plan.replans else f"finetune.steps: {plan.steps}")
    ran = int(keras.ops.convert_to_numpy(t.model.optimizer.iterations))  # early stopping may end it sooner
    checkpoint.restore_best(t.model)  # the best epoch, not the last
    hist = checkpoint.history()
    training.write_history(PLOTS / "finetune" / "history.csv", hist)
    monitor = training.monitor(t.val is not None)
    best = checkpoint.best_epoch  # ties of the monitor broken by the lower loss (finetune.Checkpoint)
    improved = best > 0
    if not improved:
        log.warning("no fine-tune epoch beat the head's %s of %.4f: keeping the weights it started from",
                    monitor, baseline)
    shutil.rmtree(checkpoint_dir)  # done: a later run starts fresh
    metrics = {
        "path": t.path,
        f"best_{monitor}": round(checkpoint.state["best_value"], 5),
        "best_epoch": best,
        "epochs_run": len(hist[monitor]),
        "steps": steps,
        "steps_run": ran,
        "small_steps": small,  # progressive resizing: the first ones at small_input_size
        "small_input_size": t.small_size if small else 0,
        "finetune_seconds": round(seconds, 2),
        "train_images_per_second": round(ran * t.n_train / per_epoch / seconds, 1),
    }
    if plan is not None:
        metrics["plan"] = plan.to_dict()  # as the last re-plan left it
    return metrics


def resumed_plan(directory: Path) -> budget.Plan | None:
    state = directory / finetune.Checkpoint.STATE
    try:
        saved = json.loads(state.read_text()).get("plan") if state.exists() else None
    except ValueError:
        return None
    return budget.Plan(**saved) if saved else None


def stage_budget_spent() -> float:
    """Wall seconds the stages before the fine-tune took, as they recorded them
    (`stage_seconds`), whether they ran now or DVC restored them from its cache."""
    spent = 0.0
    for name in ("prepare", "features", "head"):
        path = METRICS / f"{name}.json"
        recorded = json.loads(path.read_text()).get("stage_seconds") if path.exists() else None
        if recorded is None:
            raise budget.BudgetError(f"{path}: no stage_seconds recorded, so the budget cannot count the "
                                     f"{name} stage; run `dvc repro --force {name}` (or `budget: 0`)")
        spent += float(recorded)
    return spent


def plan_steps(t: finetune.Training, f: config.FinetuneConfig, prepared: data.Prepared,
               budget_seconds: float, batch_size: int = 0) -> budget.Plan:
    """Size the fine-tune to what is left of the budget (transferlab.budget)."""
    batch_size = batch_size or f.batch_size
    startup = stage_seconds()
    measured = finetune.probe(t, batch_size)
    if t.small is not None:
        measured = dataclasses.replace(measured, small_fraction=f.progressive.fraction)
    feats = json.loads((METRICS / "features.json").read_text())
    infer = float(feats["features_images_per_second"])  # the same network and input size, forward only
    per_epoch = finetune.steps_per_epoch(t, batch_size)
    n_val, n_test = len(prepared.y["val"]), len(prepared.y["test"])
    plan = budget.plan(
        budget_seconds=budget_seconds, spent_seconds=stage_budget_spent() + stage_seconds(),
        evaluate_seconds=budget.evaluate_reserve(n_val=n_val, n_test=n_test, views=2,
                                                 inference_images_per_second=infer, startup_seconds=startup),
        probe=measured, inference_images_per_second=infer, n_val=n_val,
        steps_per_epoch=per_epoch,
        # the recipe's own length caps the plan: a fast machine finishes early
        max_steps=finetune.total_steps(epochs=f.epochs, steps_per_epoch=per_epoch, min_steps=f.min_steps),
    )
    log.info("budget %s: %.0f s spent before the fine-tune, %.0f s kept for evaluate; %.0f train img/s "
             "measured -> %d steps (%.2f epochs), about %.0f s; planned again after the warmup and every epoch",
             budget.describe(budget_seconds), plan.spent_seconds, plan.evaluate_seconds,
             plan.train_images_per_second, plan.steps, plan.epochs, plan.finetune_seconds)
    if plan.small_steps:
        log.info("budget: the first %d of them at the smaller input size (%.2f s a step against %.2f s)",
                 plan.small_steps, plan.small_step_seconds, plan.step_seconds)
    import mlflow

    mlflow.log_params({f"plan.{k}": v for k, v in plan.to_dict().items() if k != "replans"})
    return plan


class BudgetProgress(keras.callbacks.Callback):
    """Under a budget: after every epoch, the time left of it, in the log and
    (`budget_seconds_left`) on the MLflow run."""

    def __init__(self, plan: budget.Plan):
        super().__init__()
        self.plan = plan
        self.start, self.started = time.monotonic(), False

    def on_train_begin(self, logs=None):
        if not self.started:  # progressive resizing fits twice: the clock runs on
            self.start, self.started = time.monotonic(), True

    def on_epoch_end(self, epoch, logs=None):
        import mlflow

        p = self.plan
        elapsed = time.monotonic() - self.start
        left = p.budget_seconds - p.spent_seconds - elapsed
        log.info("budget: fine-tune epoch %d of %d done, %.0f s of %.0f s planned; %.0f s of the %s budget left "
                 "(%.0f s of them kept for evaluate)", epoch + 1, math.ceil(p.epochs), elapsed,
                 p.finetune_seconds, left, budget.describe(p.budget_seconds), p.evaluate_seconds)
        mlflow.log_metric("budget_seconds_left", left, step=epoch)


if __name__ == "__main__":
    entry(main)
