"""The machine misbehaving: a SIGKILL in every stage, then `dvc repro` again;
two pipelines at once on one MLflow store. Heavy (minutes): `pytest -m heavy`,
which .ci/run runs after the default suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import yaml

import tinyproject

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

STAGES = ("prepare", "features", "head", "finetune", "evaluate")
TIMING = ("seconds", "per_second")
# deterministic, and long enough a fine-tune that a kill can land after a completed epoch
# (vgg16: its random-weight features still separate the tiny classes; Lite0's do not)
PARAMS = {**tinyproject.TINY, "deterministic": True,
          "backbone": {"name": "vgg16", "weights": "none", "input_size": 32},
          "finetune": {**tinyproject.TINY["finetune"], "unfreeze": 1, "epochs": 8, "patience": 8}}


def stage_process(proc: subprocess.Popen, stage: str, log: Path, timeout: float = 300) -> psutil.Process:
    """The `python -m transferlab.stages.<stage>` process that `dvc repro` (proc) started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if f"transferlab.stages.{stage}" in cmd:
                return child
        if proc.poll() is not None:
            raise AssertionError(f"dvc repro ended before {stage} started:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{stage} did not start within {timeout} s")


def checkpoint_epoch(project: Path) -> int:
    states = list((project / "data" / "checkpoints").glob("*/state.json"))
    return max((json.loads(p.read_text())["epoch"] for p in states), default=0)


def locked_stages(project: Path) -> set[str]:
    lock = project / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


def changed_stages(project: Path, env: dict) -> set[str]:
    proc = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def without_timing(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith(TIMING)}


def arrays(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.load(p) for p in sorted(folder.rglob("*.npy"))}


def test_sigkill_in_every_stage_then_repro_gives_the_same_result(tmp_path):
    """Kill -9 the whole `dvc repro` in the middle of each stage in turn. After
    every kill, dvc.lock records only stages whose outputs are complete (`dvc
    status` finds none of them changed); the killed fine-tune resumes from its
    last completed epoch; the final `dvc repro` gives the uninterrupted run's
    data, features and head exactly, and its test accuracy within seed noise."""
    ref, env = tinyproject.make(tmp_path / "reference", PARAMS, per_class=12, test_per_class=8)
    durations = {}
    for stage in STAGES:
        start = time.perf_counter()
        tinyproject.run(["dvc", "repro", "--single-item", stage], ref, env)
        durations[stage] = time.perf_counter() - start

    proj, _ = tinyproject.make(tmp_path / "killed", PARAMS, per_class=12, test_per_class=8)
    for stage in STAGES:
        log = proj / f"repro-{stage}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(["dvc", "repro"], cwd=proj, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            child = stage_process(proc, stage, log)
            if stage == "finetune":  # as soon as an epoch completed: in the middle of the next one
                while checkpoint_epoch(proj) < 1:
                    assert child.is_running(), log.read_text()[-3000:]
                    time.sleep(0.02)
            else:  # the stage's process started: kill it part-way through its usual time
                time.sleep(0.5 * durations[stage])
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        locked = locked_stages(proj)
        changed = changed_stages(proj, env)
        assert not locked & changed, f"after a kill in {stage}, dvc.lock points at changed outputs: {locked & changed}"
        assert proc.returncode == -signal.SIGKILL, f"dvc repro ended before the kill in {stage}"
        if stage == "finetune":
            killed_at = checkpoint_epoch(proj)
            assert 1 <= killed_at < PARAMS["finetune"]["epochs"]

    tinyproject.run(["dvc", "repro"], proj, env)
    # the run after the fine-tune's kill (the one killed in evaluate) resumed it
    resumed = (proj / "repro-evaluate.log").read_text()
    assert "resumed from data/checkpoints/" in resumed and f"after epoch {killed_at}" in resumed
    assert not changed_stages(proj, env)
    for folder in ("data/prepared", "data/features"):
        a, b = arrays(ref / folder), arrays(proj / folder)
        assert a.keys() == b.keys() and a
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert without_timing(proj / "metrics/head.json") == without_timing(ref / "metrics/head.json")
    ft_ref, ft = without_timing(ref / "metrics/finetune.json"), without_timing(proj / "metrics/finetune.json")
    assert ft["epochs_run"] == ft_ref["epochs_run"] == PARAMS["finetune"]["epochs"]
    # the resumed epochs see other shuffles and augmentations than the uninterrupted
    # ones: equal within noise, not bit for bit (24 test images: 1/24 each)
    acc_ref = json.loads((ref / "metrics/evaluate.json").read_text())["test_accuracy"]
    acc = json.loads((proj / "metrics/evaluate.json").read_text())["test_accuracy"]
    assert abs(acc - acc_ref) <= 0.2, (acc, acc_ref)


def test_two_pipelines_at_once_on_one_store_lose_nothing(tmp_path):
    """Two clones run `transferlab run` (what `mlflow run` calls) at the same time
    against one SQLite MLflow store, and a second run is tried in the first
    clone: that one is refused with a message, the other two log everything."""
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    a, env = tinyproject.make(tmp_path / "a")
    b, _ = tinyproject.make(tmp_path / "b")
    env = {**env, "MLFLOW_TRACKING_URI": store}
    params_a = (a / "params.yaml").read_text()
    procs = {}
    for name, folder, extra in (("a", a, []), ("b", b, ["--set", "head.epochs=4"])):
        procs[name] = subprocess.Popen(["transferlab", "run", *extra], cwd=folder, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = a / ".dvc" / "tmp" / "transferlab-run.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert time.time() < deadline and procs["a"].poll() is None
        time.sleep(0.05)
    second = subprocess.run(["transferlab", "run", "--set", "head.epochs=9"], cwd=a, env=env,
                            capture_output=True, text=True)
    outputs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    assert second.returncode == 1
    assert "another pipeline run is using this project folder" in second.stderr
    assert all(p.returncode == 0 for p in procs.values()), outputs
    assert (a / "params.yaml").read_text() == params_a

    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(tinyproject.TINY["tracking"]["experiment"])
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    by_clone = {}
    for parent in parents:
        children = {r.data.tags["stage"]: r for r in client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
        assert set(children) == set(STAGES) and all(r.info.status == "FINISHED" for r in children.values())
        by_clone[{"3": a, "4": b}[children["head"].data.params["head.epochs"]]] = children
    assert set(by_clone) == {a, b}
    accuracies = []
    for folder, children in by_clone.items():
        evaluated = json.loads((folder / "metrics/evaluate.json").read_text())
        head = json.loads((folder / "metrics/head.json").read_text())
        finetune = json.loads((folder / "metrics/finetune.json").read_text())
        assert children["evaluate"].data.metrics["test_accuracy"] == evaluated["test_accuracy"]
        head_curve = client.get_metric_history(children["head"].info.run_id, "val_accuracy")
        assert len(head_curve) == head["epochs_run"]
        ft_curve = client.get_metric_history(children["finetune"].info.run_id, "val_accuracy")
        assert len(ft_curve) == finetune["epochs_run"]
        accuracies.append(evaluated["test_accuracy"])
    name = tinyproject.TINY["tracking"]["model_name"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias(name, "champion")
    assert float(client.get_run(champion.run_id).data.metrics["test_accuracy"]) == max(accuracies)
