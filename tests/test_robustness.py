"""Protections that span modules: no secret in what we log or write, a correct
champion when two runs finish together, identical numbers from two seeded
deterministic runs."""

import base64
import functools
import hashlib
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml

import synth
import tinyproject
from transferlab import cli, config, registry, tracking
from transferlab.run import project_lock

SECRET = "s3cretPa55"


@pytest.fixture
def auth_server(tmp_path):
    """An HTTP server that serves files only with user `me` and the secret."""
    served = tmp_path / "served"
    served.mkdir()
    expected = "Basic " + base64.b64encode(f"me:{SECRET}".encode()).decode()
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, server.server_address[1], seen
    server.shutdown()
    server.server_close()


def test_no_secret_reaches_mlflow_the_outputs_or_the_log(in_tmp, auth_server, caplog):
    served, port, seen = auth_server
    archive = synth.make_cifar10_archive(served / "cifar-10-python.tar.gz")
    md5 = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()
    params = {"data": {"source": f"http://me:{SECRET}@127.0.0.1:{port}/cifar-10-python.tar.gz",
                       "checksum": md5, "val_fraction": 0.2},
              "tracking": {"experiment": "secrets"}}
    Path("params.yaml").write_text(yaml.safe_dump(tinyproject.full_params(params)))
    caplog.set_level(logging.DEBUG)  # every line the stage logs, not only warnings
    assert cli.main(["prepare"]) == 0
    assert seen and seen[-1].startswith("Basic "), "the credentials were not used"

    assert "transferlab" in caplog.text and SECRET not in caplog.text
    for path in Path("data/prepared").rglob("*"):
        if path.suffix in (".json", ".yaml"):
            assert SECRET not in path.read_text(), path
    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if SECRET in v], run.info.run_name
        if run.data.tags.get("stage") == "prepare":
            assert run.data.params["data.source"].startswith("http://me:***@127.0.0.1")
        for artifact in client.list_artifacts(run.info.run_id):
            if not artifact.is_dir:
                text = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                artifact_path=artifact.path)).read_text()
                assert SECRET not in text, artifact.path

    # a refused download: the error names the URL, masked
    caplog.clear()
    wrong = params["data"]["source"].replace(SECRET, "wr0ngPa55")
    Path("params.yaml").write_text(yaml.safe_dump(tinyproject.full_params(
        {**params, "data": {**params["data"], "source": wrong}})))
    shutil.rmtree("data/cache", ignore_errors=True)
    assert cli.main(["prepare"]) == 1
    assert "wr0ngPa55" not in caplog.text and "me:***@127.0.0.1" in caplog.text


RACER = r"""
import sys, time
from pathlib import Path
from transferlab import registry

uri, accuracy, delay, me, other = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
read = registry.champion_score

def racing_read(client, name, metric):
    # Both racers read the champion together (when nothing serialises them) ...
    Path(me).touch()
    deadline = time.time() + 5
    while not Path(other).exists() and time.time() < deadline:
        time.sleep(0.05)
    value = read(client, name, metric)
    time.sleep(delay)  # ... and the worse one moves the alias last.
    return value

registry.champion_score = racing_read
print(registry.register_and_promote(uri, "race", {"test_accuracy": accuracy}))
"""


class Killed(BaseException):
    """Stands for a SIGKILL: raised inside MLflow's schema migrations, caught by nothing."""


def test_a_run_killed_while_it_creates_the_store_leaves_no_half_built_store(in_tmp, monkeypatch):
    """A `dvc repro` killed while MLflow migrated a new mlflow.db left one that
    every later run failed on ("table ... already exists"). Killed after the
    migrations' first new table, setup leaves no mlflow.db; the next run builds
    the store, removes the killed run's partial file, and logs to it."""
    from alembic.ddl.impl import DefaultImpl

    create_table = DefaultImpl.create_table

    def create_then_die(self, table, **kw):
        create_table(self, table, **kw)
        raise Killed(table.name)

    monkeypatch.setattr(DefaultImpl, "create_table", create_then_die)
    with pytest.raises(Killed):
        tracking.setup("smoke")
    assert not (in_tmp / "mlflow.db").exists()
    assert list(in_tmp.glob("mlflow.db.creating-*")), "the killed run's partial store"

    monkeypatch.setattr(DefaultImpl, "create_table", create_table)
    store = tracking.setup("smoke")
    with store.start_run():
        store.log_metric("after_the_kill", 1.0)
    assert not list(in_tmp.glob("mlflow.db.creating-*"))
    runs = store.search_runs(experiment_names=["smoke"], output_format="list")
    assert [r.data.metrics for r in runs] == [{"after_the_kill": 1.0}]


def test_two_runs_finishing_together_leave_the_better_champion(in_tmp):
    mlflow.set_tracking_uri(tracking.tracking_uri())
    tracking.setup("race")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    x = np.zeros((1, 2), np.float32)
    uris = []
    for _ in range(2):
        with mlflow.start_run():
            uris.append(registry.log_keras_model(model, x, model.predict(x, verbose=0)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, uris[0], "0.90", "0.5", "a.ready", "b.ready"], env=env),
        subprocess.Popen([sys.executable, "-c", RACER, uris[1], "0.80", "3.0", "b.ready", "a.ready"], env=env),
    ]
    assert [p.wait(timeout=300) for p in racers] == [0, 0]
    champion = mlflow.MlflowClient().get_model_version_by_alias("race", "champion")
    assert float(champion.tags["test_accuracy"]) == pytest.approx(0.90)


TINY = {
    "seed": 5, "deterministic": True, "budget": 0,  # a budget's plan holds measured times
    "precision": "float32",  # and auto's choice too, on a CPU with bfloat16 instructions
    "data": {"source": "tiny-images", "checksum": None, "image_size": 16, "val_fraction": 0.25},
    "backbone": {"name": "vgg16", "weights": "none", "input_size": 32},
    "features": {"train_fraction": 1.0},
    "head": {"units": 16, "epochs": 3, "batch_size": 8},
    "finetune": {"unfreeze": 1, "mode": "full", "epochs": 2, "min_steps": 0, "batch_size": 8},
    "tracking": {"experiment": "determinism"},
}


def _tiny_run(root: Path) -> tuple[dict, list[np.ndarray]]:
    root.mkdir()
    synth.make_image_folder(root / "tiny-images", per_class=8, test_per_class=2, size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(tinyproject.full_params(TINY)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("prepare", "features", "head", "finetune"):  # a process each, as under dvc
            subprocess.run([sys.executable, "-m", "transferlab.cli", stage], check=True,
                           capture_output=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        timing = ("seconds", "per_second")
        metrics = {}
        for name in ("head", "finetune"):
            raw = json.loads(Path(f"metrics/{name}.json").read_text())
            metrics[name] = {k: v for k, v in raw.items() if not k.endswith(timing)}
        weights = keras.saving.load_model("models/finetune/model.keras", safe_mode=True).get_weights()
    finally:
        os.chdir(cwd)
    return metrics, weights


@pytest.mark.heavy
def test_two_seeded_deterministic_runs_give_identical_numbers(in_tmp):
    assert config.from_dict(tinyproject.full_params(TINY)).deterministic
    first, w1 = _tiny_run(in_tmp / "one")
    second, w2 = _tiny_run(in_tmp / "two")
    assert first == second
    assert len(w1) == len(w2) and all(np.array_equal(a, b) for a, b in zip(w1, w2))


# --------------------------------------------------------------------------- one run per project folder


@pytest.fixture
def dvc_project(in_tmp):
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(tinyproject.full_params({"seed": 1, "head": {"epochs": 3}})))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], check=True, cwd=in_tmp,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    return in_tmp


def test_a_second_run_in_the_same_project_is_refused_and_leaves_params_alone(dvc_project, caplog):
    """`mlflow run` twice in one folder: the second would rewrite params.yaml under
    the first one's stages. It is refused, with the holder and the way out."""
    before = (dvc_project / "params.yaml").read_text()
    with project_lock(dvc_project):
        with caplog.at_level("ERROR", logger="transferlab"):
            code = cli.main(["run", "--set", "head.epochs=9"])
    assert code == 1
    assert "another pipeline run is using this project folder" in caplog.text
    assert f"pid {os.getpid()}" in caplog.text and "git worktree" in caplog.text
    assert (dvc_project / "params.yaml").read_text() == before


def test_a_run_is_refused_while_a_dvc_command_holds_the_repository(dvc_project, caplog):
    import zc.lockfile

    before = (dvc_project / "params.yaml").read_text()
    lock = zc.lockfile.LockFile(str(dvc_project / ".dvc" / "tmp" / "lock"))  # what DVC takes
    try:
        with caplog.at_level("ERROR", logger="transferlab"):
            code = cli.main(["run", "--set", "head.epochs=9"])
    finally:
        lock.close()
    assert code == 1
    assert "a DVC command (`dvc repro`?) is running" in caplog.text
    assert (dvc_project / "params.yaml").read_text() == before
