import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))  # tests/synth.py

import pytest  # noqa: E402


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh folder, with MLflow pointed at a store inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _mlflow_variables() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def _restore_mlflow_variables(before: dict) -> None:
    for key in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(autouse=True)
def _mlflow_environment_restored():
    """MLflow's fluent API writes MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID into
    os.environ (for child processes): each test leaves the MLFLOW_* variables as
    it found them, so no later test or subprocess inherits another test's store."""
    before = _mlflow_variables()
    yield
    _restore_mlflow_variables(before)


@pytest.fixture(scope="module", autouse=True)
def _file_leaves_mlflow_environment_and_cwd():
    """The same for a test file's module-scoped fixtures (set up before any test's
    own snapshot), and the working directory: pytest-xdist runs a worker's files
    in any order, so no file may hand its store to the next."""
    before, cwd = _mlflow_variables(), os.getcwd()
    yield
    _restore_mlflow_variables(before)
    os.chdir(cwd)
