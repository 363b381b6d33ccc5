"""A temporary copy of the project (pipeline files, sources, a tiny params.yaml
and tiny images), a git and DVC repository, for the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

import synth
from transferlab import config

ROOT = Path(__file__).resolve().parents[1]

def full_params(overrides: dict) -> dict:
    """The shipped params.yaml with `overrides` merged in, section by section: a
    params file gives every key, and the shipped file is where defaults live."""
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
                else value
        return out

    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)


TINY = {
    "seed": 1,
    "budget": 0,  # the shipped one plans to the clock; the tiny runs train their few epochs
    "precision": "float32",  # auto would time the tiny model in two policies and may pick either
    # two validation images a class (the shipped floor of 5 would take half of the tiny classes)
    "data": {"source": "tiny-images", "checksum": None, "image_size": 16, "val_fraction": 0.25,
             "val_min_per_class": 2, "cache_dir": "data/cache"},
    "backbone": {"name": "efficientnet_lite0", "weights": "none", "input_size": 32},
    "features": {"batch_size": 16, "train_fraction": 1.0},  # a few images a class: no share of them
    "head": {"units": 16, "dropout": 0.1, "epochs": 3, "batch_size": 8, "patience": 2},
    "finetune": {"unfreeze": 2, "epochs": 2, "min_steps": 0, "batch_size": 8, "patience": 2},
    # a few steps from random weights never beat a logistic regression on 16-px shapes, and a model
    # below its baseline is never champion: the registry's tests need one (the baseline: test_budget)
    "evaluate": {"baseline": False},
    "tracking": {"experiment": "smoke", "model_name": "smoke-model"},
}


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for key in [k for k in env if k.startswith("MLFLOW_")]:  # the project's own store, no outer run
        del env[key]
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make(dest: Path, params: dict = TINY, per_class: int = 8, test_per_class: int = 4) -> tuple[Path, dict]:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "MLproject", "conda.yaml"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    full = config.to_dict(config.from_dict(full_params(params)))
    (dest / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    synth.make_image_folder(dest / "tiny-images", per_class=per_class, test_per_class=test_per_class, size=20)
    env = environment()
    (dest / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/mlartifacts/\n/dvc_plots/\n")
    run(["git", "init", "-q"], dest, env)
    run(["dvc", "init", "-q"], dest, env)
    run(["dvc", "config", "core.analytics", "false"], dest, env)
    return dest, env


def input_sizes_callback():
    """A Keras callback that records the input size of the model each epoch
    trains (its upscale layer's output): progressive resizing's two models."""
    import keras

    class InputSizes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def on_epoch_begin(self, epoch, logs=None):
            self.sizes.append(int(self.model.get_layer("upscale").output.shape[1]))

    return InputSizes()
