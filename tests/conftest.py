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
