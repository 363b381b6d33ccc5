"""`transferlab ui`: the MLflow UI on this project's store, bound to 127.0.0.1.

    transferlab ui [--host 127.0.0.1] [--port 5000]
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from transferlab import config

log = logging.getLogger(__name__)


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


def main(params_path: str | Path, host: str, port: int) -> int:
    import subprocess

    from transferlab import tracking

    # a new SQLite store is built here, atomically (tracking.create_sqlite_store), not by the
    # UI server's migrations, which a Ctrl-C at start-up would leave half done
    uri = tracking.tracking_uri()
    if (db := tracking.sqlite_path(uri)) is not None and not db.exists():
        with tracking.store_lock("init"):
            tracking.create_sqlite_store(db)
    experiment_id = None
    try:
        import mlflow

        if Path(params_path).exists() and (Path(tracking.DEFAULT_DB).exists()
                                           or os.environ.get("MLFLOW_TRACKING_URI")):
            mlflow.set_tracking_uri(uri)
            exp = mlflow.get_experiment_by_name(config.load(params_path).tracking.experiment)
            experiment_id = exp.experiment_id if exp else None
    except Exception as exc:  # noqa: BLE001 - the link is a convenience; the UI starts anyway
        log.debug("no experiment id for the link: %s", exc)
    log.info("MLflow UI: %s", ui_url(host, port, experiment_id))
    return subprocess.run(ui_command(host, port)).returncode
