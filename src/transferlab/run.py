"""`transferlab run`: the whole pipeline as one MLflow parent run.

    transferlab run --set backbone.name=vgg16 --set finetune.epochs=3

Overrides are written into params.yaml (comments kept), which stays the one
source of truth; then `dvc repro` runs the stages, each a child run. Under
`mlflow run` (MLproject `main`) the run MLflow started is the parent. One run per
project folder at a time (`project_lock`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path

import yaml

from transferlab import config
from transferlab.config import pipeline
from transferlab.errors import ProjectBusy
from transferlab.redact import redact_tree

log = logging.getLogger(__name__)


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_value(text: str):
    """A --set value as YAML, with 1e-5 a float (YAML 1.1 wants 1.0e-5)."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) else value


def _yaml11_float(value: float):
    """The float as ruamel will write it, readable as a float by YAML 1.1 readers
    (PyYAML: config.load and DVC): ruamel writes 1e-05, which they read as a string."""
    from ruamel.yaml import YAML

    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return YAML().load(text)


def apply_overrides(path: Path, overrides: list[str]) -> dict:
    """Write `key.sub=value` overrides into the params file, keeping its comments
    (ruamel, as `dvc exp run -S` does), so params.yaml stays the one source of
    truth. Empty values are skipped; an invalid result is rolled back."""
    from ruamel.yaml import YAML

    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise config.ConfigError(f"--set expects key=value, received: {item!r}")
        if value.strip() != "":
            changes[key.strip()] = _parse_value(value)
    if not changes:
        return {}
    ryaml = YAML()
    ryaml.preserve_quotes = True
    ryaml.width = 4096  # long values (a checksum, a URL) stay on their line
    original = path.read_text()
    doc = ryaml.load(original)
    for key, value in changes.items():
        if isinstance(value, float):
            value = _yaml11_float(value)
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    with path.open("w") as fh:
        ryaml.dump(doc, fh)
    try:
        pipeline.check(config.load(path))
    except config.ConfigError:
        path.write_text(original)
        raise
    return changes


@contextlib.contextmanager
def project_lock(root: Path = Path(".")):
    """One `transferlab run` (so one `mlflow run`) per project folder at a time,
    and none while another DVC command holds the repository: a second run would
    rewrite params.yaml under the first one's stages. Held until `dvc repro`
    ends. Separate clones are separate folders and may share one MLflow store."""
    import fcntl

    tmp = root / ".dvc" / "tmp" if (root / ".dvc").is_dir() else root
    tmp.mkdir(parents=True, exist_ok=True)
    fh = open(tmp / "transferlab-run.lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise ProjectBusy(
                f"{root.resolve()}: another pipeline run is using this project folder "
                f"({fh.read().strip() or 'unknown'}). Wait for it to end, or start this one in a separate "
                "clone (`git worktree add ../other`); clones may share one MLflow store."
            ) from None
        dvc_lock = root / ".dvc" / "tmp" / "lock"  # DVC's own repository lock (zc.lockfile: flock)
        if dvc_lock.exists():
            with open(dvc_lock, "a+") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ProjectBusy(
                        f"{root.resolve()}: a DVC command (`dvc repro`?) is running in this project; "
                        "params.yaml is left as it is. Wait for it to end, or use a separate clone."
                    ) from None
                fcntl.flock(probe, fcntl.LOCK_UN)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def main(params_path: Path, overrides: list[str]) -> int:
    """The whole pipeline as one MLflow parent run: overrides -> params.yaml ->
    `dvc repro`, each stage a child run. Under `mlflow run`, the run it started
    is the parent. Refused while another run holds the project (project_lock),
    and for a params file other than the project's params.yaml, which is the
    one dvc.yaml's stages read."""
    if Path(params_path).resolve() != (Path.cwd() / "params.yaml").resolve():
        raise config.ConfigError(
            f"--params {params_path}: `transferlab run` runs `dvc repro`, whose stages read the project's "
            "params.yaml; copy the file over params.yaml, or give its changes with --set KEY=VALUE")
    with project_lock(Path.cwd()):
        return _run_pipeline(params_path, overrides)


def _run_pipeline(params_path: Path, overrides: list[str]) -> int:
    import subprocess

    from transferlab import tracking

    changes = apply_overrides(params_path, overrides)
    if changes:
        log.info("params.yaml overrides: %s", redact_tree(changes))
    params = pipeline.check(config.load(params_path))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    own_parent = None
    if env.get("MLFLOW_RUN_ID"):
        env[tracking.PARENT_ENV] = env.pop("MLFLOW_RUN_ID")
    else:
        mlflow = tracking.setup(params.tracking.experiment)
        own_parent = mlflow.MlflowClient().create_run(
            mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id,
            run_name=f"pipeline-{params.backbone.name}",
            tags={"stage": "pipeline", "backbone": params.backbone.name,
                  "git_commit": tracking.git_commit()},
        ).info.run_id
        env[tracking.PARENT_ENV] = own_parent
    code = subprocess.run(["dvc", "repro"], env=env).returncode
    if own_parent is not None:
        import mlflow

        mlflow.MlflowClient().set_terminated(own_parent, "FINISHED" if code == 0 else "FAILED")
    return code
