"""`tensorflow` against `tensorflow-cpu` (both 2.21.0) on this CPU: what a fresh
virtualenv's install of the project costs with each, and the fine-tune's
training step in each. Each command appends a row to results.json's `rows`
beside this file; run each under the machine's CPU lock, nothing else beside it:

    M=docs/bench/2026-12-04-tensorflow-packages/measure.py
    flock /tmp/transferlab-cpu.lock python $M install --package tensorflow-cpu
    flock /tmp/transferlab-cpu.lock python $M install --package tensorflow
    flock /tmp/transferlab-cpu.lock python $M install --package tensorflow --extra gpu
    flock /tmp/transferlab-cpu.lock python $M steps --rounds 3

`install` copies the committed project (git archive of --commit) to a folder
under --work, swaps the TensorFlow package in its pyproject.toml where asked,
makes a Python 3.11 venv and times `pip install --no-cache-dir <copy>[extra]`
(downloads included). `steps` runs a worker in the two venvs by turns,
alternating which goes first: EfficientNet-Lite0 at 160 px (weights=None), a
small head, the top 2 blocks trainable with BatchNorm frozen, `train_on_batch`
timed step by step after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
RESULTS = HERE / "results.json"
PIN = '"tensorflow==2.21.0"'


def _append(record: dict) -> None:
    """Into results.json's `rows` (the run record bench/report.py reads; its figures are written by hand)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    results["rows"].append(record)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def install(package: str, extra: str | None, commit: str, work: Path, python: str) -> dict:
    name = package + (f"-{extra}" if extra else "")
    dest = work / name
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    project = dest / "project"
    project.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "pyproject.toml", "README.md",
                              "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(project)], input=archive, check=True)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    if PIN not in text:
        raise SystemExit(f"{commit}: pyproject.toml has no {PIN}")
    pyproject.write_text(text.replace(PIN, f'"{package}==2.21.0"', 1))
    venv = dest / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--upgrade", "pip"], check=True)
    empty = _du(venv)
    target = f"{project}[{extra}]" if extra else str(project)
    start = time.perf_counter()
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-cache-dir", target], check=True)
    seconds = time.perf_counter() - start
    site = next((venv / "lib").glob("python3.*/site-packages"))
    version = subprocess.run([str(venv / "bin/python"), "--version"], capture_output=True, text=True).stdout
    record = {"kind": "install", "package": package, "extra": extra, "commit": commit,
              "python": version.split()[1], "pip_install_s": round(seconds, 1),
              "venv_bytes": _du(venv), "venv_bytes_before_install": empty,
              "tensorflow_dir_bytes": _du(site / "tensorflow"),
              "nvidia_dir_bytes": _du(site / "nvidia") if (site / "nvidia").exists() else 0,
              "venv": str(venv)}
    _append(record)
    return record


def steps(venvs: dict[str, Path], rounds: int, batch: int, n: int, warmup: int) -> dict:
    names = list(venvs)
    runs = []
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out = subprocess.run([str(venvs[name] / "bin/python"), __file__, "_worker", "--batch",
                                  str(batch), "--steps", str(n), "--warmup", str(warmup)],
                                 capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if out.returncode:
                raise SystemExit(f"{name} worker failed:\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append({"round": r, "venv": name, **got})
            print(f"round {r} {name}: median step {got['median_step_s']:.3f} s", flush=True)
    def median(key, name):
        return statistics.median(x[key] for x in runs if x["venv"] == name)

    summary = {name: {"median_of_medians_s": median("median_step_s", name),
                      "import_tensorflow_s": median("import_tensorflow_s", name)} for name in names}
    record = {"kind": "steps", "batch": batch, "steps": n, "warmup": warmup, "rounds": rounds,
              "model": "efficientnet_lite0 160 px weights=None, GAP + dense(64) + dense(10), "
                       "top 2 blocks trainable",
              "summary": summary, "runs": runs}
    _append(record)
    return record


def worker(batch: int, n: int, warmup: int) -> None:
    """One package's training step, in its own venv's process."""
    from importlib import metadata

    start = time.perf_counter()
    import tensorflow as tf
    imported = time.perf_counter() - start
    import keras
    import numpy as np
    from keras import layers

    from transferlab import backbones

    spec = backbones.get("efficientnet_lite0")
    body = backbones.build_body("efficientnet_lite0", 160, weights=None)
    top = len(spec.blocks) - 2
    for i, group in enumerate(backbones.layers_by_block(spec, body)):
        for layer in group:  # the fine-tune's rule: the top blocks train, BatchNorm stays frozen
            layer.trainable = i >= top and not isinstance(layer, layers.BatchNormalization)
    inputs = keras.Input((160, 160, 3), name="image")
    x = body(inputs, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(64, activation="relu", name="head_hidden")(x)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", name="head_out")(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    xb = rng.uniform(-1, 1, (batch, 160, 160, 3)).astype("float32")
    yb = rng.integers(0, 10, batch)
    for _ in range(warmup):
        model.train_on_batch(xb, yb)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model.train_on_batch(xb, yb)
        times.append(time.perf_counter() - t)
    dists = {d: metadata.version(d) for d in ("tensorflow", "tensorflow-cpu") if _installed(d)}
    print(json.dumps({"distributions": dists, "tf_version": tf.__version__,
                      "devices": [d.name for d in tf.config.list_physical_devices()],
                      "trainable_weights": len(model.trainable_weights),
                      "import_tensorflow_s": round(imported, 2),
                      "median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
                      "min_step_s": min(times), "max_step_s": max(times)}))


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install")
    p.add_argument("--package", choices=["tensorflow", "tensorflow-cpu"], required=True)
    p.add_argument("--extra")
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--work", type=Path, default=Path("/tmp/tl-tfpkg"))
    p.add_argument("--python", default="python3.11")
    s = sub.add_parser("steps")
    s.add_argument("--work", type=Path, default=Path("/tmp/tl-tfpkg"))
    s.add_argument("--rounds", type=int, default=3)
    for q in (s, sub.add_parser("_worker")):
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--steps", type=int, default=20)
        q.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.cmd == "install":
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.commit], capture_output=True,
                                text=True, check=True).stdout.strip()
        print(json.dumps(install(args.package, args.extra, commit, args.work, args.python), indent=1))
    elif args.cmd == "steps":
        venvs = {name: args.work / name / "venv" for name in ("tensorflow", "tensorflow-cpu")}
        print(json.dumps(steps(venvs, args.rounds, args.batch, args.steps, args.warmup)["summary"], indent=1))
    else:
        worker(args.batch, args.steps, args.warmup)


if __name__ == "__main__":
    main()
