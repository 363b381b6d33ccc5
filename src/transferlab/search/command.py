"""`transferlab tune [--workers N] [--apply]` (MLproject entry `tune`): create
the study, run its trials here or in N worker processes, then evaluate and
register the best trial's model; `--worker` only runs trials, joining a study
another `transferlab tune` started (on this machine or another)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from transferlab import config
from transferlab.config import pipeline
from transferlab.errors import ConfigError
from transferlab.files import write_json
from transferlab.redact import redact_tree
from transferlab.search.proxy import ensure_cache
from transferlab.search.report import apply_best, confirm, finalize
from transferlab.search.space import defaults
from transferlab.search.study import is_sqlite, start, work

log = logging.getLogger(__name__)

STORAGE_ENV = "TRANSFERLAB_TUNE_STORAGE"  # the storage URL, kept off command lines


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


def main(params_path: Path, overrides: list[str], storage: str | None = None, workers: int = 1,
         worker: bool = False, worker_id: int = 0, apply: bool = False) -> int:
    """Create or join the Optuna study, run trials (in --workers processes),
    then evaluate and register the best trial's model; with --apply, write the
    winner into params.yaml. With --worker: only run trials."""
    from transferlab.run import apply_overrides
    from transferlab.stages import METRICS, PLOTS, PREPARED

    changes = apply_overrides(params_path, overrides)
    if changes:
        log.info("params.yaml overrides: %s", redact_tree(changes))
    params = pipeline.check(config.load(params_path))
    url = storage or os.environ.get(STORAGE_ENV) or params.tune.storage
    if not (PREPARED / "manifest.json").exists():
        raise FileNotFoundError(f"{PREPARED}: no prepared data; run `dvc repro prepare` first")
    if worker:
        os.environ.pop("MLFLOW_RUN_ID", None)
        work(params, url, PREPARED, worker_id)
        return 0
    if workers > 1 and is_sqlite(url):
        raise ConfigError(
            f"--workers {workers} with SQLite storage ({url}): SQLite is for one worker. For several "
            "workers, on this machine or many, use PostgreSQL: --storage "
            "postgresql+psycopg2://user:password@host/db (docs/search.md: Several workers)"
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
        if params.tune.confirm and not summary["default_wins"]:
            summary["confirm"] = confirm(params, PREPARED, url, summary)
            write_json(METRICS / "tune.json", summary)
        apply_best(params_path, params, summary, summary["parent_run_id"])
    return 0
