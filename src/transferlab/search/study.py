"""The study: its storage, its creation (with its MLflow parent run and
params.yaml's configuration as trial 0), and one worker running its trials.

Storage is Optuna's RDBStorage: an SQLite file for one worker; an RDB URL
(PostgreSQL) for several workers on one or many machines. A trial records a
heartbeat every tune.heartbeat_seconds; one silent for 3 heartbeats (its worker
was killed) is marked failed by the next worker to look, which closes its MLflow
run FAILED and enqueues it again with the same params
(RetryHeartbeatStaleTrialCallback, the Optuna 4.9+ name of RetryFailedTrialCallback).

A worker runs Optuna's own loop, `study.optimize`, with its timeout
(tune.timeout_minutes) and callbacks: MaxTrialsCallback stops it once the study
holds tune.n_trials trials across all workers (complete, pruned, running or
waiting; a failed trial does not count, its retry does), a progress callback
draws the study's bar and logs a line per trial, and a guard stops the worker on
a configuration error (TuneError) or 3 failed trials in a row; any other error
fails its trial only (`catch`).

One piece of the former hand-written loop stays, in `optimize`: when the study
holds n_trials but another worker's trial still runs, the worker waits (checking
for stale trials) instead of leaving, and runs the retry if that other worker
died. `study.optimize` returns as soon as MaxTrialsCallback stops it, and Optuna
fails stale trials only when a worker asks for its next trial; a worker killed
during the study's last trials would otherwise leave its trial RUNNING and no
one to retry it (tests/test_tune.py: a worker stays for a running trial).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from transferlab import config
from transferlab.errors import TuneError
from transferlab.redact import redact
from transferlab.search.space import (DEFAULT_ATTR, defaults, direction, make_pruner, make_sampler,
                                      with_monitor)

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's MLflow parent run
# the trials that count toward tune.n_trials (a failed trial is replaced by its retry)
HELD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
FAILURES_IN_A_ROW = 3  # a worker whose trials keep failing stops


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def make_storage(url: str, heartbeat_seconds: int = 30):
    """RDB storage with heartbeats: a trial whose worker stops beating for
    3 heartbeats is marked failed, its MLflow run closed, and retried (at most twice)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    from transferlab.search.objective import close_trial_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=2)

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning("trial %d lost its worker (no heartbeat): marked failed and retried", trial.number)
        close_trial_run(trial, "FAIL")
        retry(study, trial)

    engine = {"pool_pre_ping": True} if not is_sqlite(url) else {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds,
                          grace_period=3 * heartbeat_seconds, heartbeat_stale_trial_callback=on_stale)


def open_study(params: config.Params, storage_url: str | None = None, seed_offset: int = 0) -> optuna.Study:
    t = params.tune
    storage = make_storage(storage_url or t.storage, t.heartbeat_seconds)
    return optuna.create_study(
        study_name=t.study, storage=storage, load_if_exists=True, direction=direction(t.monitor),
        sampler=make_sampler(params.seed + seed_offset, t.n_trials),
        pruner=make_pruner(t.pruner, t.finetune_epochs),
    )


def start(params: config.Params, prepared_dir: Path, storage_url: str | None = None,
          outer_run_id: str | None = None) -> optuna.Study:
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


def _states(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def _held(states: Counter) -> int:
    return sum(states[s] for s in HELD)


class _StopOnErrors:
    """The objective, wrapped, and a callback after each trial. Optuna catches
    a trial's exception (`catch=(Exception,)`) and records the trial FAIL; its
    `catch` cannot leave out one subclass, so a configuration error (TuneError:
    every trial would fail the same way) is noted here and raised once Optuna
    has recorded the trial, which ends the worker; so do FAILURES_IN_A_ROW
    failed trials."""

    def __init__(self, objective):
        self.objective = objective
        self.error: TuneError | None = None
        self.failures = 0

    def run(self, trial) -> float:
        try:
            return self.objective(trial)
        except TuneError as exc:
            self.error = exc
            raise

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.error is not None:
            raise self.error
        self.failures = self.failures + 1 if trial.state == TrialState.FAIL else 0
        if self.failures >= FAILURES_IN_A_ROW:
            raise TuneError(f"{FAILURES_IN_A_ROW} trials in a row failed in this worker; "
                            "the log above has their errors")


class Progress:
    """Callback: the study's progress (every worker's trials) as a bar in a
    terminal, and a log line for each trial this worker ran."""

    def __init__(self, study: optuna.Study, n_trials: int, monitor: str, worker_id: int = 0):
        self.n_trials, self.monitor, self.worker_id = n_trials, monitor, worker_id
        self.ran = 0
        self.bar = tqdm(total=n_trials, initial=min(_held(_states(study)), n_trials),
                        desc=f"study {study.study_name}", unit="trial", disable=None)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ran += 1
        held = _held(_states(study))
        self.bar.update(max(0, min(held, self.n_trials) - self.bar.n))
        try:
            self.bar.set_postfix({f"best {self.monitor}": f"{study.best_value:.4f}"})
        except ValueError:  # no complete trial yet
            pass
        log.info("worker %d: trial %d %s; study holds %d of %d", self.worker_id, trial.number,
                 trial.state.name, held, self.n_trials)

    def close(self) -> None:
        self.bar.close()


def optimize(study: optuna.Study, objective, n_trials: int, timeout: float | None = None,
             callbacks: list | tuple = (), poll_seconds: float = 5.0) -> None:
    """Run trials with Optuna's loop until the study holds n_trials across all
    workers, within `timeout` seconds; then stay while other workers' trials
    run, and run the retry of any whose worker died (the module docstring says
    why Optuna's loop alone does not)."""
    guard = _StopOnErrors(objective)
    enough = optuna.study.MaxTrialsCallback(n_trials, states=HELD)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            log.info("tune.timeout_minutes reached")
            return
        states = _states(study)
        if _held(states) < n_trials or states[TrialState.WAITING]:
            study.optimize(guard.run, timeout=left, catch=(Exception,), gc_after_trial=True,
                           callbacks=[guard, *callbacks, enough])
        elif states[TrialState.RUNNING]:
            time.sleep(poll_seconds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, then retried
        else:
            return


def _warn_if_shared_sqlite(study: optuna.Study, url: str) -> None:
    if not is_sqlite(url):
        return
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        log.warning(
            "study %r already has %d running trial(s) in %s: another worker may be using this SQLite "
            "file. SQLite is for one worker; for several, use PostgreSQL (tune.storage: "
            "postgresql+psycopg2://user:password@host/db)", study.study_name, len(running), url)


def work(params: config.Params, storage_url: str | None, prepared_dir: Path, worker_id: int = 0) -> int:
    """One worker: join the study and run trials until it holds tune.n_trials
    (retries first). Returns how many trials this worker ran."""
    import mlflow

    from transferlab import tracking
    from transferlab import data
    from transferlab.search.objective import Objective
    from transferlab.search.proxy import ensure_cache, load_trial_data

    params = with_monitor(params, data.load_prepared(prepared_dir).manifest["counts"]["train"])
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
    trial_data = load_trial_data(params, prepared_dir, ensure_cache(params, prepared_dir))
    objective = Objective(params, trial_data, parent, experiment_id)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    progress = Progress(study, t.n_trials, t.monitor, worker_id)
    try:
        optimize(study, objective, t.n_trials, timeout=t.timeout_minutes * 60 if t.timeout_minutes > 0 else None,
                 callbacks=[progress], poll_seconds=min(5, t.heartbeat_seconds))
    finally:
        progress.close()
    return progress.ran
