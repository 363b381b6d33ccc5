"""Optuna search over the recipe's knobs: unfreeze depth, fine-tune and head
learning rates, dropout, weight decay, label smoothing and head width. Command:
`transferlab tune [--apply]` (MLproject entry `tune`); `main` below.

A trial is a cheap, faithful proxy of the pipeline (params.yaml `tune`): the
same recipe, on the full path (augmentation, upscale, backbone, head; the
learning rate decaying to zero at the proxy's last step), on a seeded, stratified
share of the training images, at a smaller input size, for a few fine-tune
epochs. Its head trains on pooled features of that share at the proxy's input
size, extracted once per study and reused by every trial and worker. Every
trial is validated on the whole validation split.

The study's first trial is the params.yaml configuration itself (never pruned),
so the search can only improve on it, and the report says when it did not.
`--apply` writes the winner into params.yaml (comments kept, as `--set` does)
unless the default won. Pruning (Hyperband by default, beside a seeded
multivariate TPE sampler) acts on the fine-tune epochs, each reported after a
full proxy epoch as step 1, 2, ...

Storage is Optuna's: an SQLite file for one worker; an RDB URL (PostgreSQL)
for several workers on one or many machines. Heartbeats mark a killed worker's
trial failed, and RetryHeartbeatStaleTrialCallback enqueues it again.

MLflow: one parent run per study (its id is a study user attribute, so every
worker nests under it), one nested run per trial with params, per-epoch curves
(the head's as head_*), state and number. After the search the best trial's
model is evaluated on the test set and registered under the pipeline's champion
rule, and Optuna's plots go to the parent run.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transferlab import budget, config
from transferlab.errors import TuneError
from transferlab.files import write_json
from transferlab.redact import redact, redact_tree

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
MODEL_ATTR = "model_logged"
STATE_TAG = "state"
TUNE_DIR = Path("data/tune")
STORAGE_ENV = "TRANSFERLAB_TUNE_STORAGE"  # the storage URL, kept off command lines


# --------------------------------------------------------------------------- optuna parts


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def make_storage(url: str, heartbeat_seconds: int = 30):
    """RDB storage with heartbeats: a trial whose worker stops beating for
    3 heartbeats is marked failed, and retried (at most twice)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=2)

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning("trial %d lost its worker (no heartbeat): marked failed and retried", trial.number)
        _close_trial_run(trial, "FAIL")
        retry(study, trial)

    engine = {"pool_pre_ping": True} if not is_sqlite(url) else {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds,
                          grace_period=3 * heartbeat_seconds, heartbeat_stale_trial_callback=on_stale)


def make_sampler(seed: int, n_trials: int):
    """Seeded multivariate TPE; constant_liar so that concurrent workers do not
    all propose the point a running trial is already trying."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True,
            n_startup_trials=max(3, min(10, n_trials // 3)),
        )


def make_pruner(name: str, finetune_epochs: int):
    """Pruning on the fine-tune epochs only, each reported after a full proxy
    epoch as step 1..finetune_epochs: the head phase ranks trials poorly (a head
    that learns slowly often fine-tunes best; measured on CIFAR-10) and is cheap.
    Hyperband runs successive halving over those epochs (reduction factor 3)."""
    import optuna

    if finetune_epochs < 1:
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=finetune_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def direction(monitor: str) -> str:
    return "minimize" if monitor.endswith("loss") else "maximize"


# search parameter -> the params.yaml key it stands for (`--apply` writes them there)
PARAM_KEYS = {
    "unfreeze": "finetune.unfreeze",
    "learning_rate": "finetune.learning_rate",
    "weight_decay": "finetune.weight_decay",
    "label_smoothing": "finetune.label_smoothing",
    "head_learning_rate": "head.learning_rate",
    "dropout": "head.dropout",
    "units": "head.units",
}
DEFAULT_ATTR = "params_yaml"  # user attribute of the enqueued trial that is params.yaml itself


def unfreeze_range(params: config.Params) -> tuple[int, int]:
    from transferlab import backbones

    n = len(backbones.get(params.backbone.name).blocks)
    low, high = (n if u == "all" else int(u) for u in params.tune.space.unfreeze)
    return low, high


def suggest(trial, params: config.Params) -> dict:
    s = params.tune.space
    return {
        "unfreeze": trial.suggest_int("unfreeze", *unfreeze_range(params)),
        "learning_rate": trial.suggest_float("learning_rate", *s.learning_rate, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *s.weight_decay, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", *s.label_smoothing),
        "head_learning_rate": trial.suggest_float("head_learning_rate", *s.head_learning_rate, log=True),
        "dropout": trial.suggest_float("dropout", *s.dropout),
        "units": trial.suggest_categorical("units", list(s.units)),
    }


def defaults(params: config.Params) -> dict:
    """params.yaml's configuration as a point of the space: the study's first
    trial. A value outside its range is an error, not a silent clip: the search
    must contain the configuration it is meant to beat."""
    from transferlab import backbones, finetune

    f, h, s = params.finetune, params.head, params.tune.space
    point = {"unfreeze": finetune.n_unfrozen(backbones.get(params.backbone.name), f.unfreeze),
             "learning_rate": f.learning_rate, "weight_decay": f.weight_decay,
             "label_smoothing": f.label_smoothing, "head_learning_rate": h.learning_rate,
             "dropout": h.dropout, "units": h.units}
    ranges = {"unfreeze": unfreeze_range(params), "learning_rate": s.learning_rate,
              "weight_decay": s.weight_decay, "label_smoothing": s.label_smoothing,
              "head_learning_rate": s.head_learning_rate, "dropout": s.dropout}
    for name, value in point.items():
        inside = value in s.units if name == "units" else ranges[name][0] <= value <= ranges[name][1]
        if not inside:
            held = list(s.units) if name == "units" else list(ranges[name])
            raise config.ConfigError(
                f"params.yaml: {PARAM_KEYS[name]} is {value}, outside tune.space.{name} {held}: widen "
                f"tune.space.{name} (or change {PARAM_KEYS[name]}) so that the study's first trial is the "
                "configuration it must beat")
    return point


def pruning_callback(trial, monitor: str, step_offset: int = 1, prune: bool = True, last_step: int | None = None):
    """optuna-integration's KerasPruningCallback, reporting epoch e as step
    e + step_offset; a monitored metric missing from the epoch logs is an error
    (the library only warns, which would silently never prune). prune=False
    reports without ever pruning (the params.yaml trial). At `last_step` the
    trial has run its whole proxy: it is reported, never pruned (Hyperband's top
    rung sits there; pruning then would save nothing and discard a finished
    result)."""
    from optuna_integration.keras import KerasPruningCallback

    class GlobalStepPruning(KerasPruningCallback):
        def on_epoch_end(self, epoch, logs=None):
            if monitor not in (logs or {}):
                raise TuneError(
                    f"tune.monitor is {monitor!r}, but the epoch logs hold {sorted(logs or {})}: "
                    "set tune.monitor in params.yaml to one of those"
                )
            if prune and (last_step is None or epoch + step_offset < last_step):
                super().on_epoch_end(epoch + step_offset, logs)
            else:
                trial.report(float(logs[monitor]), step=epoch + step_offset)

    return GlobalStepPruning(trial, monitor)


# --------------------------------------------------------------------------- data


@dataclass
class TrialData:
    """What every trial trains on: the proxy's share of the training images and
    the whole validation split, with their pooled features at the proxy's size."""

    features: dict[str, np.ndarray]  # pooled: train (the share), val
    x: dict[str, np.ndarray]  # uint8 images: train (the share), val
    y: dict[str, np.ndarray]
    classes: list[str]
    meta: dict


def proxy_size(params: config.Params) -> int:
    return params.tune.input_size or budget.input_size(params.backbone.input_size, params.budget)


def cache_dir(params: config.Params) -> Path:
    b, t = params.backbone, params.tune
    return TUNE_DIR / "cache" / f"{b.name}-{proxy_size(params)}px-share{t.train_fraction:g}-seed{params.seed}"


def _share(params: config.Params, y_train: np.ndarray) -> np.ndarray:
    from transferlab import data

    if params.tune.train_fraction >= 1:
        return np.arange(len(y_train))
    return data.split_rows(y_train, 1 - params.tune.train_fraction, params.seed)[0]


def ensure_cache(params: config.Params, prepared_dir: Path) -> Path:
    """Pooled features of the proxy's training share and of the validation split,
    at the proxy's input size: made once (atomically) and reused by every trial
    and worker; made again when the data, backbone, size or share change."""
    import hashlib

    import keras

    from transferlab import backbones, data, features

    out = cache_dir(params)
    b = params.backbone
    want = {"backbone": b.name, "input_size": proxy_size(params), "weights": b.weights,
            "train_fraction": params.tune.train_fraction, "seed": params.seed,
            "prepared": hashlib.sha256((prepared_dir / "manifest.json").read_bytes()).hexdigest()[:16]}
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return out
        log.info("%s was made for %s: rebuilding", out, {k: meta.get(k) for k in want})
    keras.utils.set_random_seed(params.seed)
    prepared = data.load_prepared(prepared_dir)
    index = _share(params, np.asarray(prepared.y["train"]))
    image_size = int(prepared.x["train"].shape[1])
    model = backbones.build_feature_extractor(b.name, image_size, proxy_size(params), b.weights)
    x = {"train": data.Rows(prepared.x["train"], index), "val": prepared.x["val"],
         "test": prepared.x["test"][:0]}  # trials never see the test set
    features.extract_splits(model, x, out, params.features.batch_size,
                            {**want, "image_size": image_size, "train_index": index.tolist()})
    keras.backend.clear_session()
    return out


def load_trial_data(params: config.Params, prepared_dir: Path, cache: Path) -> TrialData:
    from transferlab import data, features

    prepared = data.load_prepared(prepared_dir)
    feats, meta = features.load_features(cache)
    index = np.asarray(meta["train_index"])
    y = {"train": np.asarray(prepared.y["train"])[index], "val": np.asarray(prepared.y["val"])}
    if len(y["val"]) == 0:
        raise TuneError("tune needs validation images: set data.val_fraction > 0 in params.yaml")
    x = {"train": np.asarray(prepared.x["train"][index]), "val": np.asarray(prepared.x["val"])}
    return TrialData({s: np.asarray(feats[s], np.float32) for s in ("train", "val")}, x, y,
                     prepared.classes, meta)


# --------------------------------------------------------------------------- one trial


def _close_trial_run(trial, state: str) -> None:
    """Mark the MLflow run of a trial whose worker died."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if not run_id:
        return
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, STATE_TAG, state)
    client.set_terminated(run_id, "FAILED")


class Objective:
    """The trial function: the proxy of the pipeline (head, then full-path fine-tune)."""

    def __init__(self, params: config.Params, data: TrialData, parent_run_id: str, experiment_id: str):
        self.params, self.data = params, data
        self.parent_run_id, self.experiment_id = parent_run_id, experiment_id
        self.monitor = params.tune.monitor
        self.fatal: TuneError | None = None  # a configuration error: stop the worker
        self.sign = -1.0 if direction(self.monitor) == "minimize" else 1.0

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
            mlflow.log_params({**hp, "head_epochs": t.head_epochs, "finetune_epochs": t.finetune_epochs,
                               "input_size": proxy_size(self.params), "train_images": len(self.data.y["train"])})
            start = time.perf_counter()
            pruned = None
            try:
                with device.strategy(self.params.distribute).scope():  # several GPUs: MirroredStrategy
                    value, model_parts = self._train(trial, hp, prune=not is_default)
            except optuna.TrialPruned as exc:  # a normal end: the run finishes, tagged PRUNED
                mlflow.set_tag(STATE_TAG, "PRUNED")
                mlflow.log_metric("trial_seconds", time.perf_counter() - start)
                pruned = exc
            except Exception as exc:  # the run ends FAILED
                mlflow.set_tag(STATE_TAG, "FAIL")
                if isinstance(exc, TuneError):
                    self.fatal = exc
                raise
            else:
                mlflow.log_metrics({f"best_{self.monitor}": value,
                                    "trial_seconds": time.perf_counter() - start})
                mlflow.set_tag(STATE_TAG, "COMPLETE")
                if self._at_least_as_good_as_the_best(trial.study, value):
                    self._log_model(*model_parts)
                    trial.set_user_attr(MODEL_ATTR, True)
        if pruned is not None:
            raise pruned
        return value

    def _at_least_as_good_as_the_best(self, study, value: float) -> bool:
        """Ties log too: every trial that reaches the study's final best value
        has its model, whatever order concurrent workers finish in."""
        try:
            best = study.best_value
        except ValueError:  # no complete trial yet
            return True
        return self.sign * value >= self.sign * best

    def _train(self, trial, hp: dict, prune: bool = True):
        """The head on the share's pooled features, then the pipeline's full-path
        fine-tune (augmentation, schedule to zero at the last proxy step), through
        the pipeline's own functions; returns the best monitored value and the
        parts of the model that reached it."""
        import keras

        from transferlab import backbones, device, finetune, head, tracking, training

        p, t, d = self.params, self.params.tune, self.data

        def batch(per_replica: int) -> int:
            return device.global_batch(per_replica, p.distribute)

        metric = self.monitor.removeprefix("val_")  # tune.monitor is on the validation split
        head_model = head.build_head(d.meta["feature_dim"], len(d.classes), hp["units"], hp["dropout"])
        hist = head.train_head(
            head_model, d.features["train"], d.y["train"], d.features["val"], d.y["val"],
            optimizer=p.head.optimizer, learning_rate=hp["head_learning_rate"], epochs=t.head_epochs,
            batch_size=batch(p.head.batch_size), patience=p.head.patience, monitor=metric, verbose=0,
            callbacks=[tracking.EpochLogger(prefix="head_")],
        )
        value = self._best(hist.history[self.monitor])
        spec = backbones.get(p.backbone.name)
        body = backbones.build_body(p.backbone.name, proxy_size(p), p.backbone.weights)
        if hp["unfreeze"] == 0 or t.finetune_epochs == 0:
            return value, (spec, body, head_model)
        f, a = p.finetune, p.finetune.augment
        run = finetune.prepare(
            spec, body, head_model, unfreeze=hp["unfreeze"], y_train=d.y["train"], y_val=d.y["val"],
            batch_size=batch(f.batch_size), seed=p.seed + trial.number, images=(d.x["train"], d.x["val"]),
            image_size=int(d.meta["image_size"]), input_size=proxy_size(p),
            augment=config.augment_options(a), train_bn=f.train_bn, train_depthwise=f.train_depthwise,
        )
        before = run.model.get_weights()
        keep_best = keras.callbacks.EarlyStopping(monitor=self.monitor, mode=training.mode(self.monitor),
                                                  patience=t.finetune_epochs, restore_best_weights=True)
        hist = finetune.fit(run, optimizer=f.optimizer, learning_rate=hp["learning_rate"],
                            weight_decay=hp["weight_decay"], schedule=f.schedule, warmup_epochs=f.warmup_epochs,
                            steps=t.finetune_epochs * finetune.steps_per_epoch(run, batch(f.batch_size)),
                            batch_size=batch(f.batch_size), label_smoothing=hp["label_smoothing"], ema=f.ema,
                            verbose=0,
                            callbacks=[keep_best, pruning_callback(trial, self.monitor, step_offset=1, prune=prune,
                                                                        last_step=t.finetune_epochs),
                                       tracking.EpochLogger(step_offset=1)])
        tuned = self._best(hist.history[self.monitor])
        if self.sign * tuned <= self.sign * value:
            run.model.set_weights(before)  # fine-tuning did not help: keep the head's result
            return value, (spec, body, head_model)
        return tuned, (spec, body, head_model)

    def _best(self, values: list[float]) -> float:
        return min(values) if self.sign < 0 else max(values)

    def _log_model(self, spec, body, head_model) -> None:
        """The whole classifier (uint8 images -> probabilities) as an artifact of
        the trial's run, for the best trial so far only."""
        import tempfile

        import mlflow

        from transferlab import finetune

        model = finetune.assemble(spec, body, head_model, int(self.data.meta["image_size"]),
                                  proxy_size(self.params))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.keras"
            model.save(path)
            mlflow.log_artifact(str(path), "model")


# --------------------------------------------------------------------------- study


def open_study(params: config.Params, storage_url: str | None = None, seed_offset: int = 0):
    import optuna

    t = params.tune
    storage = make_storage(storage_url or t.storage, t.heartbeat_seconds)
    return optuna.create_study(
        study_name=t.study, storage=storage, load_if_exists=True, direction=direction(t.monitor),
        sampler=make_sampler(params.seed + seed_offset, t.n_trials),
        pruner=make_pruner(t.pruner, t.finetune_epochs),
    )


def _counted(study) -> tuple[int, int, int]:
    """(trials that count toward n_trials or will run, waiting, running)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    live = [tr for tr in trials if tr.state != TrialState.FAIL]
    return (len(live), sum(tr.state == TrialState.WAITING for tr in trials),
            sum(tr.state == TrialState.RUNNING for tr in trials))


def _warn_if_shared_sqlite(study, url: str) -> None:
    from optuna.trial import TrialState

    if not is_sqlite(url):
        return
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        log.warning(
            "study %r already has %d running trial(s) in %s: another worker may be using this SQLite "
            "file. SQLite is for one worker; for several, use PostgreSQL (tune.storage: "
            "postgresql+psycopg2://user:password@host/db)", study.study_name, len(running), url)


def start(params: config.Params, prepared_dir: Path, storage_url: str | None = None,
          outer_run_id: str | None = None):
    """Create or join the study; give it its MLflow parent run (once): the run
    `mlflow run -e tune` opened (`outer_run_id`), or a new one."""
    import mlflow

    from transferlab import tracking

    t, b = params.tune, params.backbone
    first = defaults(params)  # before anything is created: a space without it is an error
    study = open_study(params, storage_url)
    if PARENT_ATTR not in study.user_attrs:
        study.enqueue_trial(first, user_attrs={DEFAULT_ATTR: True}, skip_if_exists=True)
        tracking.setup(params.tracking.experiment)
        client = mlflow.MlflowClient()
        exp = mlflow.get_experiment_by_name(params.tracking.experiment)
        tags = {"stage": "tune", "backbone": b.name, "study": t.study, "git_commit": tracking.git_commit()}
        if outer_run_id:
            run = client.get_run(outer_run_id)
            for key, value in {**tags, "mlflow.runName": f"tune-{t.study}-{b.name}"}.items():
                client.set_tag(run.info.run_id, key, value)
        else:
            run = client.create_run(exp.experiment_id, run_name=f"tune-{t.study}-{b.name}", tags=tags)
        flat = config.flatten({"seed": params.seed, "backbone": config.to_dict(params)["backbone"],
                               "tune": config.to_dict(params)["tune"]})
        for key, value in flat.items():
            client.log_param(run.info.run_id, key, redact(value) if isinstance(value, str) else value)
        study.set_user_attr(PARENT_ATTR, run.info.run_id)
        log.info("study %r: MLflow parent run %s", t.study, run.info.run_id)
    return study


def work(params: config.Params, storage_url: str | None, prepared_dir: Path, worker_id: int = 0) -> int:
    """One worker: run trials until the study holds n_trials (complete, pruned,
    running or waiting), picking up retries first. Returns how many it ran."""
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from transferlab import tracking

    t = params.tune
    url = storage_url or t.storage
    study = open_study(params, url, seed_offset=worker_id)
    _warn_if_shared_sqlite(study, url)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None:
        raise TuneError(f"study {t.study!r} in {redact(url)} has not been started: run "
                        "`transferlab tune` once (it creates the study and its MLflow parent run), "
                        "then add workers with `transferlab tune --worker`")
    tracking.setup(params.tracking.experiment)
    experiment_id = mlflow.MlflowClient().get_run(parent).info.experiment_id
    data = load_trial_data(params, prepared_dir, ensure_cache(params, prepared_dir))
    objective = Objective(params, data, parent, experiment_id)
    deadline = time.monotonic() + t.timeout_minutes * 60 if t.timeout_minutes > 0 else None
    ran = failures = 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the study's progress (every worker's trials), in a terminal; a log line per trial below
    bar = tqdm(total=t.n_trials, initial=min(_counted(study)[0], t.n_trials), desc=f"study {t.study}",
               unit="trial", disable=None)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, then retried
        live, waiting, running = _counted(study)
        if deadline is not None and time.monotonic() > deadline:
            log.info("worker %d: tune.timeout_minutes reached", worker_id)
            break
        if live >= t.n_trials and not waiting:
            if not running:
                break
            # Others are still running: stay until they finish, in case one of them
            # died and its trial comes back as a retry for us to run.
            time.sleep(min(5, t.heartbeat_seconds))
            continue
        finished: list = []
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True,
                       callbacks=[lambda _study, frozen: finished.append(frozen)])
        if objective.fatal is not None:
            raise objective.fatal
        ran += 1
        failed = bool(finished) and finished[-1].state == TrialState.FAIL
        failures = failures + 1 if failed else 0
        if failures >= 3:
            raise TuneError("3 trials in a row failed in this worker; the log above has their errors")
        held = _counted(study)[0]
        bar.update(max(0, min(held, t.n_trials) - bar.n))
        try:
            bar.set_postfix({f"best {t.monitor}": f"{study.best_value:.4f}"})
        except ValueError:  # no complete trial yet
            pass
        log.info("worker %d: trial %s %s; study holds %d of %d", worker_id,
                 finished[-1].number if finished else "?", finished[-1].state.name if finished else "?",
                 held, t.n_trials)
    bar.close()
    return ran


def spawn_workers(n: int, params_path: Path, storage_url: str | None) -> list[subprocess.Popen]:
    """n worker processes on this machine, each `transferlab tune --worker`. The
    storage URL travels in the environment, not on the command line: any user
    can read a process's arguments (`ps`), only its owner its environment."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if storage_url:
        env[STORAGE_ENV] = storage_url
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "transferlab.cli", "tune", "--worker", "--worker-id", str(i),
               "--params", str(params_path)]
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


def finalize(params: config.Params, prepared_dir: Path, storage_url: str | None, seconds: float,
             metrics_path: Path, plots_dir: Path) -> dict:
    """The best trial's model on the test set, registered (champion rule), with
    the study's summary and plots on the parent run."""
    import tempfile

    import keras
    import mlflow
    import optuna
    from optuna.trial import TrialState

    from transferlab import data, evaluate, tracking

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
    prepared = data.load_prepared(prepared_dir)
    x, y = prepared.x["test"], prepared.y["test"]
    e = params.evaluate
    result = evaluate.test_model(model, x, y, prepared.classes, e.batch_size, e.tta, prepared.x["val"],
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
    pngs = _study_plots(study, plots_dir)
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
        summary.update(tracking.log_and_register(
            result["model"], np.asarray(x[:2]), result["probs"][:2], prepared.classes,
            params.tracking.model_name, result["test_accuracy"]))
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


def apply_best(params_path: Path, params: config.Params, summary: dict, parent_run_id: str) -> dict:
    """`tune --apply`: the best trial's params into params.yaml (comments kept),
    with tracking.tuned_by naming the study's MLflow run, so that the pipeline run
    that trains them links back to it. Nothing changes when params.yaml's own
    configuration won. Returns the changes written."""
    from transferlab import backbones
    from transferlab.run import apply_overrides

    if summary.get("default_wins"):
        log.info("tune --apply: %s; params.yaml unchanged", summary["verdict"])
        return {}
    n_blocks = len(backbones.get(params.backbone.name).blocks)
    values = dict(summary["best_params"])
    for key, value in values.items():
        if isinstance(value, float):
            values[key] = float(f"{value:.4g}")  # readable in params.yaml; the proxy cannot tell the rest
    if values.get("unfreeze") == n_blocks:
        values["unfreeze"] = "all"
    overrides = [f"{PARAM_KEYS[k]}={v}" for k, v in values.items()] + [f"tracking.tuned_by={parent_run_id}"]
    changes = apply_overrides(params_path, overrides)
    log.info("tune --apply: %s -> %s; train it at full fidelity with `dvc repro` (or `dvc exp run`)",
             params_path, changes)
    return changes


def _study_plots(study, out_dir: Path) -> list[Path]:
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


# --------------------------------------------------------------------------- command


def main(params_path: Path, overrides: list[str], storage: str | None = None, workers: int = 1,
         worker: bool = False, worker_id: int = 0, apply: bool = False) -> int:
    """Create or join the Optuna study, run trials (in --workers processes),
    then evaluate and register the best trial's model; with --apply, write the
    winner into params.yaml. With --worker: only run trials, joining a study
    another `transferlab tune` started."""
    from transferlab.run import apply_overrides
    from transferlab.stages import METRICS, PLOTS, PREPARED

    changes = apply_overrides(params_path, overrides)
    if changes:
        log.info("params.yaml overrides: %s", redact_tree(changes))
    params = config.load(params_path)
    url = storage or os.environ.get(STORAGE_ENV) or params.tune.storage
    if not (PREPARED / "manifest.json").exists():
        raise FileNotFoundError(f"{PREPARED}: no prepared data; run `dvc repro prepare` first")
    if worker:
        os.environ.pop("MLFLOW_RUN_ID", None)
        work(params, url, PREPARED, worker_id)
        return 0
    if workers > 1 and is_sqlite(url):
        raise config.ConfigError(
            f"--workers {workers} with SQLite storage ({url}): SQLite is for one worker. For several "
            "workers, on this machine or many, use PostgreSQL: --storage "
            "postgresql+psycopg2://user:password@host/db (README: Several workers)"
        )
    # Under `mlflow run -e tune` its run becomes the study's parent run; taken out of
    # the environment so that no trial (nor worker process) resumes it as its own.
    outer = os.environ.pop("MLFLOW_RUN_ID", None)
    began = time.perf_counter()
    defaults(params)  # a space that leaves out params.yaml's configuration: an error before any work
    ensure_cache(params, PREPARED)
    start(params, PREPARED, url, outer)
    if workers > 1:
        procs = spawn_workers(workers, params_path, url)
        codes = [p.wait() for p in procs]
        if any(codes):
            log.error("worker exit codes: %s", codes)
    else:
        work(params, url, PREPARED)
    summary = finalize(params, PREPARED, url, time.perf_counter() - began, METRICS / "tune.json",
                       PLOTS / "tune")
    log.info("tune: best trial %d (%s), test accuracy %.4f; %s; %.1f s", summary["best_trial"],
             summary["best_params"], summary["test_accuracy"], summary["trials"], summary["study_seconds"])
    if apply:
        apply_best(params_path, params, summary, summary["parent_run_id"])
    return 0
