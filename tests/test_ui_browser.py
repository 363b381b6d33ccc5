"""The MLflow UI in a real headless Chromium (Debian's chromium package): the
`transferlab ui` helper serves a store with two runs; the experiment link opens
on its training runs, and a run's page lists the confusion-matrix artifact."""

import re
import shutil
import subprocess
import time
import urllib.request

import mlflow
import numpy as np
import pytest

import pgserver
from transferlab import evaluate, tracking, ui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")]


def page_text(url: str) -> str:
    """The page's visible text once its JavaScript has run."""
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         "--virtual-time-budget=30000", url],
        capture_output=True, text=True, timeout=120,
    ).stdout
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


@pytest.fixture
def store(in_tmp):
    mlflow.set_tracking_uri(tracking.tracking_uri())
    tracking.setup("ui-test")
    ids = []
    for name, acc in (("finetune-vgg16", 0.71), ("finetune-efficientnet_lite0", 0.83)):
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_metric("test_accuracy", acc)
            cm = np.array([[5, 1], [2, 4]])
            png = evaluate.confusion_png(cm, ["cat", "dog"], in_tmp / f"{name}.png", name)
            mlflow.log_artifact(str(png), "confusion")
            ids.append(run.info.run_id)
    return mlflow.get_experiment_by_name("ui-test").experiment_id, ids


def test_the_ui_shows_both_runs_and_the_confusion_artifact(store, in_tmp):
    experiment_id, run_ids = store
    port = pgserver.free_port()
    server = subprocess.Popen(ui.ui_command("127.0.0.1", port), cwd=in_tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        text = page_text(ui.ui_url("127.0.0.1", port, experiment_id))
        assert "finetune-vgg16" in text and "finetune-efficientnet_lite0" in text, text[:2000]
        assert "Token Usage" not in text, "opened on the GenAI overview, not the runs"
        run_page = ui.ui_url("127.0.0.1", port, f"{experiment_id}/runs/{run_ids[0]}/artifacts")
        text = page_text(run_page)
        assert "confusion" in text, text[:2000]
    finally:
        server.terminate()
        server.wait(timeout=30)
