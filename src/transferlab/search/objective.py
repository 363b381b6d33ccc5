"""One trial: a cheap, faithful proxy of the pipeline, with its MLflow run.

The proxy (params.yaml `tune`) is the pipeline's own fine-tune
(`transferlab.train`) on the full path (augmentation, upscale, backbone, head;
the learning rate decaying to zero at the proxy's last step), on the proxy's
share of the training images (search.proxy), at a smaller input size, for a few
fine-tune epochs, validated on the whole validation split. Its head trains on
the share's pooled features first.

Each trial is one MLflow run nested under the study's parent run, with its
params, per-epoch curves (the head's as head_*), state and number; the model of
a trial at least as good as the best so far is logged with it.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np

from transferlab import config
from transferlab.search.proxy import TrialData, proxy_size
from transferlab.search.space import DEFAULT_ATTR, direction, pruning_callback, suggest

RUN_ATTR = "mlflow_run_id"  # trial user attribute: the trial's MLflow run
MODEL_ATTR = "model_logged"  # trial user attribute: its run holds model/model.keras
STATE_TAG = "state"  # MLflow tag: the trial's Optuna state

log = logging.getLogger(__name__)


def close_trial_run(trial, state: str) -> None:
    """Mark the MLflow run of a trial whose worker died."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if not run_id:
        return
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, STATE_TAG, state)
    client.set_terminated(run_id, "FAILED")


class Objective:
    """The trial function: the proxy of the pipeline (head, then full-path
    fine-tune). An exception ends the trial's MLflow run FAILED, tagged FAIL;
    a pruned trial's run finishes, tagged PRUNED."""

    def __init__(self, params: config.Params, trial_data: TrialData, parent_run_id: str, experiment_id: str):
        self.params, self.trial_data = params, trial_data
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id
        from transferlab.train import selection

        self.monitor = params.tune.monitor  # resolved (search.space.with_monitor)
        self.sign = -1.0 if direction(self.monitor) == "minimize" else 1.0
        # the class weights the pipeline trains with (the monitor is what selects here)
        self.class_weight = selection.resolve(params.select, params.class_weight, trial_data.train_counts).class_weight

    def __call__(self, trial) -> float:
        import keras
        import mlflow
        import optuna

        from transferlab import device, tracking

        keras.backend.clear_session()  # each trial starts from an empty graph: memory stays flat
        gc.collect()
        keras.utils.set_random_seed(self.params.seed + trial.number)
        hp = suggest(trial, self.params)
        t, b = self.params.tune, self.params.backbone
        tags = {"stage": "tune-trial", "backbone": b.name, "study": t.study,
                "trial_number": str(trial.number), "git_commit": tracking.git_commit()}
        frozen = next(tr for tr in trial.study.get_trials(deepcopy=False) if tr.number == trial.number)
        retried = frozen.system_attrs.get("failed_trial")  # set by the heartbeat retry
        if retried is not None:
            tags["retry_of_trial"] = str(retried)
        is_default = bool(frozen.user_attrs.get(DEFAULT_ATTR))
        if is_default:
            tags["params_yaml"] = "true"  # the configuration the search must beat
        with mlflow.start_run(run_name=f"trial-{trial.number}-{b.name}-u{hp['unfreeze']}",
                              experiment_id=self.experiment_id, parent_run_id=self.parent_run_id,
                              tags=tags) as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            mlflow.log_params(self._run_params(hp))
            began = time.perf_counter()
            pruned = None
            try:
                with device.strategy(self.params.distribute).scope():  # several GPUs: MirroredStrategy
                    value, model_parts = self._fit_proxy(trial, hp, prune=not is_default)
            except optuna.TrialPruned as exc:  # a normal end: the run finishes, tagged PRUNED
                mlflow.set_tag(STATE_TAG, "PRUNED")
                mlflow.log_metric("trial_seconds", time.perf_counter() - began)
                pruned = exc
            except Exception:  # the run ends FAILED
                mlflow.set_tag(STATE_TAG, "FAIL")
                raise
            else:
                mlflow.log_metrics({f"best_{self.monitor}": value,
                                    "trial_seconds": time.perf_counter() - began})
                mlflow.set_tag(STATE_TAG, "COMPLETE")
                if self._at_least_as_good_as_the_best(trial.study, value):
                    self._log_model(*model_parts)
                    trial.set_user_attr(MODEL_ATTR, True)
        if pruned is not None:
            raise pruned
        return value

    def fit_once(self, hp: dict, run_name: str) -> float:
        """One configuration trained as a trial trains, outside the study (no
        pruning, the seed of trial 0), in its own MLflow run under the study's
        parent run, tagged stage tune-confirm: `tune --apply`'s check at full
        fidelity (search.report.confirm). Returns its best monitored value."""
        import keras
        import mlflow
        import optuna

        from transferlab import device, tracking

        keras.backend.clear_session()
        gc.collect()
        keras.utils.set_random_seed(self.params.seed)
        t, b = self.params.tune, self.params.backbone
        tags = {"stage": "tune-confirm", "backbone": b.name, "study": t.study, "git_commit": tracking.git_commit()}
        with mlflow.start_run(run_name=run_name, experiment_id=self.experiment_id,
                              parent_run_id=self.parent_run_id, tags=tags):
            mlflow.log_params(self._run_params(hp))
            began = time.perf_counter()
            with device.strategy(self.params.distribute).scope():
                value, _ = self._fit_proxy(optuna.trial.FixedTrial(hp), hp, prune=False)
            mlflow.log_metrics({f"best_{self.monitor}": value, "trial_seconds": time.perf_counter() - began})
        return value

    def _run_params(self, hp: dict) -> dict:
        """What a trial's (or a check's) MLflow run logs as its params."""
        t = self.params.tune
        return {**hp, "head_epochs": t.head_epochs, "finetune_epochs": t.finetune_epochs,
                "input_size": proxy_size(self.params), "train_images": len(self.trial_data.y["train"])}

    def _at_least_as_good_as_the_best(self, study, value: float) -> bool:
        """Ties log too: every trial that reaches the study's final best value
        has its model, whatever order concurrent workers finish in."""
        try:
            best = study.best_value
        except ValueError:  # no complete trial yet
            return True
        return self.sign * value >= self.sign * best

    def _fit_proxy(self, trial, hp: dict, prune: bool = True):
        """The head on the share's pooled features, then the pipeline's full-path
        fine-tune (augmentation, schedule to zero at the last proxy step), through
        the pipeline's own functions; returns the best monitored value and the
        parts of the model that reached it."""
        import dataclasses

        import keras

        from transferlab import backbones, device, head, tracking
        from transferlab.budget.callback import StepBudget
        from transferlab.train import trainer
        from transferlab.train.recipe import Recipe, mode

        p, t, d = self.params, self.params.tune, self.trial_data

        def batch(per_replica: int) -> int:
            return device.global_batch(per_replica, p.distribute)

        metric = self.monitor.removeprefix("val_")  # tune.monitor is on the validation split
        head_model = head.build_head(d.meta["feature_dim"], len(d.classes), hp["units"], hp["dropout"])
        hist = head.train_head(
            head_model, d.features["train"], d.y["train"], d.features["val"], d.y["val"],
            optimizer=p.head.optimizer, learning_rate=hp["head_learning_rate"], epochs=t.head_epochs,
            batch_size=batch(p.head.batch_size), patience=p.head.patience, monitor=metric,
            class_weight=self.class_weight, verbose=0,
            callbacks=[tracking.EpochLogger(prefix="head_")],
        )
        value = self._best(hist.history[self.monitor])
        spec = backbones.get(p.backbone.name)
        body = backbones.build_body(p.backbone.name, proxy_size(p), p.backbone.weights)
        if hp["unfreeze"] == 0 or t.finetune_epochs == 0:
            return value, (spec, body, head_model)
        recipe = dataclasses.replace(  # params.yaml's fine-tune, with what this trial tries
            Recipe.from_params(p.finetune, seed=p.seed + trial.number, batch_size=batch(p.finetune.batch_size),
                               flip=self._flip(trial, head_model)),
            unfreeze=hp["unfreeze"], learning_rate=hp["learning_rate"], weight_decay=hp["weight_decay"],
            label_smoothing=hp["label_smoothing"], class_weight=self.class_weight,
            select="accuracy" if metric == "loss" else metric)
        fine_tune = trainer.build(spec, body, head_model, recipe, y_train=d.y["train"], y_val=d.y["val"],
                                  images=(d.x["train"], d.x["val"]), image_size=int(d.meta["image_size"]),
                                  input_size=proxy_size(p))
        before = fine_tune.model.get_weights()
        keep_best = keras.callbacks.EarlyStopping(monitor=self.monitor, mode=mode(self.monitor),
                                                  patience=t.finetune_epochs, restore_best_weights=True)
        steps = t.finetune_epochs * fine_tune.steps_per_epoch(recipe.batch_size)
        hist = trainer.fit(fine_tune, recipe, StepBudget(steps=steps), verbose=0,
                           callbacks=[keep_best, pruning_callback(trial, self.monitor, step_offset=1, prune=prune,
                                                                  last_step=t.finetune_epochs),
                                      tracking.EpochLogger(step_offset=1)])
        tuned = self._best(hist.history[self.monitor])
        if self.sign * tuned <= self.sign * value:
            fine_tune.model.set_weights(before)  # fine-tuning did not help: keep the head's result
            return value, (spec, body, head_model)
        return tuned, (spec, body, head_model)

    def _flip(self, trial, head_model) -> bool:
        """finetune.augment.flip for this trial: auto decided by its own head, as
        the pipeline's head decides it (train.mirror)."""
        from transferlab.train import mirror

        d, setting = self.trial_data, self.params.finetune.augment.flip
        head_metrics = {}
        if setting == "auto" and "val_flip" in d.features:
            rows = np.asarray(d.meta["val_flip_index"])

            def predict(x):
                return head_model.predict(x, batch_size=1024, verbose=0).argmax(axis=1)

            head_metrics = mirror.check(d.y["val"][rows], predict(d.features["val"][rows]),
                                        predict(d.features["val_flip"])).record()
        flip, reason = mirror.resolve(setting, head_metrics, "finetune.augment.flip")
        trial.set_user_attr("augment_flip", int(flip))
        log.debug("trial %d: %s", trial.number, reason)
        return flip

    def _best(self, values: list[float]) -> float:
        return min(values) if self.sign < 0 else max(values)

    def _log_model(self, spec, body, head_model) -> None:
        """The whole classifier (uint8 images -> probabilities) as an artifact of
        the trial's run, for the best trial so far only."""
        import tempfile

        import mlflow

        from transferlab.train.surgery import assemble

        model = assemble(spec, body, head_model, int(self.trial_data.meta["image_size"]), proxy_size(self.params))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            model.save(path)
            mlflow.log_artifact(str(path), "model")
