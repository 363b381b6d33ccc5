import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))  # tests/synth.py

import pytest  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n logical` (pyproject's addopts): one worker more than the CPUs, at most
    4. The end-to-end tests wait on subprocesses, servers and files, so on two
    cores a third worker keeps them busy (two workers kept them 76 % busy)."""
    return min(4, len(os.sched_getaffinity(0)) + 1)


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


def _stage_clock_restarted() -> None:
    """A stage's clock counts from its process's start (transferlab.stages): in a
    test worker that is whenever the worker imported the stages, minutes of other
    tests ago, which a budget would count as the stages' time. A stage run by a
    test starts its clock where the test (or the fixture running the stages) begins."""
    if "transferlab.stages" in sys.modules:
        sys.modules["transferlab.stages"].end_stage()


@pytest.fixture(autouse=True)
def _stage_clock():
    _stage_clock_restarted()


@pytest.fixture(scope="module", autouse=True)
def _file_leaves_mlflow_environment_and_cwd():
    """The same for a test file's module-scoped fixtures (set up before any test's
    own snapshot), and the working directory: pytest-xdist runs a worker's files
    in any order, so no file may hand its store to the next."""
    before, cwd = _mlflow_variables(), os.getcwd()
    yield
    _restore_mlflow_variables(before)
    os.chdir(cwd)


@pytest.fixture(scope="module")
def stages_done(tmp_path_factory):
    """prepare, features and head on the tiny images, in a scratch folder, once
    per test file that asks (the fine-tune: stagekit.run_finetune)."""
    import synth
    import tinyproject
    from transferlab import config
    from transferlab.stages import features, head, prepare

    folder = tmp_path_factory.mktemp("stages")
    synth.make_image_folder(folder / "tiny-images", per_class=12, test_per_class=2, size=16)
    cwd, uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)
    try:
        params = config.from_dict(tinyproject.full_params(tinyproject.TINY))
        _stage_clock_restarted()
        for stage in (prepare, features, head):
            stage.main(params)
        yield folder
    finally:
        os.chdir(cwd)
        if uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = uri
