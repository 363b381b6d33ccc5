"""Our pipeline against the seeds' recipe and fastai's, side by side on the same data and machine.

    python -m bench recipes                       # real CIFAR-10, efficientnet_lite0, default params
    python -m bench recipes --data DIR --weights none --set head.epochs=2 ...   # a smoke run
    python -m bench recipes --recipes ours,fastai # any of ours, seeds, fastai, scratch

Four recipes, each in its own process (so each has its own peak RSS):
- seeds: the classic notebook recipe written plainly with Keras `model.fit`:
  native 32x32 input, frozen backbone + Flatten/Dense(256, relu)/Dropout(0.5)/
  Dense(10, softmax), Adam, 10 epochs, batch 128; then the top registry block
  unfrozen and trained with SGD(lr 1e-4, momentum 0.9) for 10 epochs;
- ours: the pipeline's stages (prepare, features, head, finetune, evaluate) with
  the params file, called in one process in a scratch folder (`--workdir`);
- fastai: `Learner.fine_tune` on the same Lite0 ImageNet weights in PyTorch
  (bench/fastai_peer.py), in its own environment: `--peer-python`, by default
  .peer/bin/python, made with `python -m venv .peer && .peer/bin/pip install -r
  bench/peer-requirements.txt`. Without it the peer is left out, and said so;
- scratch: airbench94 trained from random weights in Keras (bench/scratch.py,
  `python -m bench scratch`), on the same archive, decoded by its own process;
  not in the default --recipes.

After every epoch of either, a probe measures test accuracy with the clock
stopped, so the curve is test accuracy against training wall time. The seeds'
recipe starts from the prepared arrays, scratch from its decoded ones (the JPEG
decoding, our prepare stage, is counted for ours only); fastai's clock starts
before it unpacks the archive.

Writes the run into docs/bench/<date>-<--name>/ (or --out): results.json (the
figures and every recipe's result, points included), README.md (a stub with
the table), lscpu.txt, results.csv, time_to_accuracy.csv and
time_to_accuracy.png. It measures only: bench/report.py judges the targets.
Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, add_output_arguments, cpu_description, output_folder, write_run  # noqa: E402

def probe(clock: Clock, points: list, phase: str, x, y, batch_size: int = 256, deferred: bool = False):
    """A Keras callback: test accuracy after each epoch, clock stopped. `deferred`:
    each epoch's weights are copied (clock stopped) and tested after the fit
    (`finish()`), so that the probes take no time from a budget that the stage
    plans on the wall clock (it re-plans after every epoch)."""
    import keras
    import numpy as np

    class TestProbe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.saved = []

        def on_epoch_end(self, epoch, logs=None):
            t0 = time.perf_counter()
            val = round(float((logs or {}).get("val_accuracy", float("nan"))), 5)
            if deferred:
                weights = [np.array(w) for w in self.model.get_weights()]
                clock.paused += time.perf_counter() - t0
                self.saved.append((epoch, round(clock.now(), 2), val, weights))
                return
            self._record(epoch, round(clock.now(), 2), val, t0)

        def _record(self, epoch, seconds, val, t0):
            probs = self.model.predict(x, batch_size=batch_size, verbose=0)
            acc = float((np.asarray(probs).argmax(axis=1) == y).mean())
            clock.paused += time.perf_counter() - t0
            points.append({"phase": phase, "epoch": epoch + 1, "seconds": seconds,
                           "test_accuracy": round(acc, 5), "val_accuracy": val})
            print(f"[probe] {phase} epoch {epoch + 1}: test {acc:.4f} at {seconds:.0f} s", flush=True)

        def finish(self):
            """The deferred probes, in order (the model's weights are left as the last epoch's)."""
            for epoch, seconds, val, weights in self.saved:
                t0 = time.perf_counter()
                self.model.set_weights(weights)
                self._record(epoch, seconds, val, t0)
            self.saved = []

    return TestProbe()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


# --------------------------------------------------------------------------- ours


def run_ours(workdir: Path, params_path: Path, overrides: list[str]) -> dict:
    import numpy as np

    from transferlab import backbones, config, data
    from transferlab import features as features_lib
    from transferlab.run import apply_overrides
    from transferlab.stages import PREPARED, end_stage, evaluate, features, head, prepare
    from transferlab.stages import finetune as finetune_stage
    from transferlab.train import surgery

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    shutil.copy(params_path, "params.yaml")
    apply_overrides(Path("params.yaml"), overrides)
    params = config.load("params.yaml")
    clock, points, stages = Clock(), [], {}

    def stage(name, fn, *args):
        t0, paused0 = time.perf_counter(), clock.paused
        fn(params, *args)
        stages[name] = round(time.perf_counter() - t0 - (clock.paused - paused0), 2)
        print(f"[ours] {name}: {stages[name]:.1f} s", flush=True)

    stage("prepare", prepare.main)
    stage("features", features.main)
    prepared = data.load_prepared(PREPARED)
    y_test = np.asarray(prepared.y["test"])
    b = params.backbone
    # the head's inputs for its test probe (the features stage skips the test split), clock stopped
    paused = time.perf_counter()
    size = json.loads(Path("metrics/features.json").read_text())["input_size"]  # as the stage resolved it
    extractor = backbones.build_feature_extractor(b.name, int(prepared.x["test"].shape[1]), size, b.weights)
    test_features = features_lib.extract(extractor, prepared.x["test"], params.features.batch_size, "test probe")
    del extractor
    clock.paused += time.perf_counter() - paused
    end_stage()  # nor does the budget's clock count it: the head stage starts now
    stage("head", head.main, [probe(clock, points, "head", test_features, y_test)])
    x_test = np.asarray(prepared.x["test"])
    full_path = not surgery.uses_cache(backbones.get(b.name), params.finetune.mode, params.finetune.unfreeze)
    # the cached path's model takes activations, which are not cached for test: no probe there
    ft_probe = probe(clock, points, "finetune", x_test, y_test, deferred=True)
    stage("finetune", finetune_stage.main, [ft_probe] if full_path else [])
    ft_probe.finish()  # clock stopped
    end_stage()  # nor does evaluate's own stage clock count the probes
    stage("evaluate", evaluate.main)
    wall = clock.now()
    evaluated = json.loads(Path("metrics/evaluate.json").read_text())
    head_m = json.loads(Path("metrics/head.json").read_text())
    ft_m = json.loads(Path("metrics/finetune.json").read_text())
    feat_m = json.loads(Path("metrics/features.json").read_text())
    n_train = len(prepared.y["train"])
    points.append({"phase": "final", "epoch": 0, "seconds": round(wall, 2),
                   "test_accuracy": evaluated["test_accuracy"], "val_accuracy": float("nan")})
    head_points = [p for p in points if p["phase"] == "head"]
    return {
        "recipe": "ours",
        "config": f"{params.backbone.name} {size}px, unfreeze {params.finetune.unfreeze}, "
                  f"{params.finetune.mode} path",
        "after_head": _test_at_best_val(head_points),
        "after_finetune": evaluated["test_accuracy"],
        "wall_seconds": round(wall, 2),
        "budget_seconds": ft_m.get("plan", {}).get("budget_seconds"),  # None: no budget
        "stages": stages,
        "extract_images_per_second": feat_m["features_images_per_second"],
        "train_images_per_second": {
            "head": round(n_train * head_m["epochs_run"] / head_m["head_seconds"], 1),
            "finetune": ft_m.get("train_images_per_second"),
        },
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "points": points,
    }


def _test_at_best_val(points: list) -> float | None:
    """The kept model's test accuracy: early stopping restores the best val epoch."""
    if not points:
        return None
    return max(points, key=lambda p: (p["val_accuracy"], -p["epoch"]))["test_accuracy"]


# --------------------------------------------------------------------------- seeds


def run_seeds(workdir: Path, backbone: str, weights: str, head_epochs: int, ft_epochs: int,
              unfreeze: int, seed: int) -> dict:
    """The seeds' recipe, plain Keras; only the data and the backbone's weights
    and preprocessing come from our package."""
    import keras
    import numpy as np
    from keras import layers

    from transferlab import backbones, data

    keras.utils.set_random_seed(seed)
    clock, points = Clock(), []
    prepared = data.load_prepared(workdir / "data/prepared", mmap=False)
    x_train, y_train = prepared.x["train"], prepared.y["train"]
    x_val, y_val = prepared.x["val"], prepared.y["val"]
    x_test, y_test = prepared.x["test"], np.asarray(prepared.y["test"])
    n_classes = len(prepared.classes)
    size = int(x_train.shape[1])
    spec = backbones.get(backbone)

    base = backbones.build_body(backbone, size, weights)
    inputs = keras.Input((size, size, 3))
    x = backbones.preprocess(spec.preprocess)(inputs)
    x = base(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    val = (x_val, y_val) if len(y_val) else None

    base.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    t0 = clock.now()
    model.fit(x_train, y_train, batch_size=128, epochs=head_epochs, validation_data=val, verbose=2,
              callbacks=[probe(clock, points, "head", x_test, y_test)])
    head_seconds = clock.now() - t0
    after_head = points[-1]["test_accuracy"] if points else None

    # the top block unfrozen, the rest stays frozen
    first = len(spec.blocks) - unfreeze
    base.trainable = True
    for layer in base.layers:
        layer.trainable = backbones.block_index(spec, layer.name) >= first
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-4, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = clock.now()
    model.fit(x_train, y_train, batch_size=128, epochs=ft_epochs, validation_data=val, verbose=2,
              callbacks=[probe(clock, points, "finetune", x_test, y_test)])
    ft_seconds = clock.now() - t0
    n = len(y_train)
    return {
        "recipe": "seeds",
        "config": f"{backbone} {size}px native, Flatten head, unfreeze {unfreeze} ({spec.block_names[first]})",
        "after_head": after_head,
        "after_finetune": points[-1]["test_accuracy"] if points else None,
        "wall_seconds": round(clock.now(), 2),
        "stages": {"head": round(head_seconds, 2), "finetune": round(ft_seconds, 2)},
        "extract_images_per_second": None,  # no separate extraction: every epoch runs the backbone
        "train_images_per_second": {"head": round(n * head_epochs / head_seconds, 1),
                                    "finetune": round(n * ft_epochs / ft_seconds, 1)},
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "points": points,
    }


# --------------------------------------------------------------------------- report


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


def _rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def table(results: list[dict], machine: str) -> str:
    lines = [f"Measured {date.today().isoformat()} on {machine}.", "",
             "| recipe | configuration | test acc. after head | after fine-tune | wall time | "
             "extraction img/s | head training img/s | fine-tune training img/s | peak RSS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        tr = r["train_images_per_second"]
        lines.append(f"| {r['recipe']} | {r['config']} | {_pct(r['after_head'])} | {_pct(r['after_finetune'])} | "
                     f"{r['wall_seconds'] / 60:.1f} min | {_rate(r['extract_images_per_second'])} | "
                     f"{_rate(tr.get('head'))} | {_rate(tr.get('finetune'))} | {r['peak_rss_gb']:.2f} GB |")
    stage_lines = [f"- {r['recipe']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items())
                   for r in results]
    return "\n".join(lines + ["", "Stage times (probe time excluded):", *stage_lines]) + "\n"


def figures(results: list[dict]) -> dict:
    """The run's headline figures: ours unprefixed, the peers' prefixed by their name."""
    out = {}
    for r in results:
        key = "" if r["recipe"] == "ours" else r["recipe"] + "_"
        out[key + "test_accuracy"] = r["after_finetune"]
        out[key + "wall_minutes"] = round(r["wall_seconds"] / 60, 1)
        out[key + "peak_rss_gb"] = r["peak_rss_gb"]
        if r.get("budget_seconds"):
            out[key + "budget_minutes"] = round(r["budget_seconds"] / 60, 2)
    return out


def write_outputs(out: Path, results: list[dict], machine: str, argv: list[str] | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["recipe", "config", "after_head", "after_finetune", "wall_seconds",
                    "extract_images_per_second", "head_images_per_second", "finetune_images_per_second",
                    "peak_rss_gb"])
        for r in results:
            tr = r["train_images_per_second"]
            w.writerow([r["recipe"], r["config"], r["after_head"], r["after_finetune"], r["wall_seconds"],
                        r["extract_images_per_second"], tr.get("head"), tr.get("finetune"), r["peak_rss_gb"]])
    with (out / "time_to_accuracy.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["recipe", "phase", "epoch", "seconds", "test_accuracy", "val_accuracy"])
        for r in results:
            for p in r["points"]:
                w.writerow([r["recipe"], p["phase"], p["epoch"], p["seconds"], p["test_accuracy"],
                            p["val_accuracy"]])
    plot(out / "time_to_accuracy.png", results, machine)
    text = table(results, machine)
    write_run(out, "recipes", figures(results), {"results": results}, text, argv, cpu=machine)
    return text


def plot(path: Path, results: list[dict], machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        pts = [p for p in r["points"] if p["phase"] != "final"]
        ax.plot([p["seconds"] / 60 for p in pts], [100 * p["test_accuracy"] for p in pts], marker="o",
                markersize=3, label=f"{r['recipe']}: {r['config']}")
        ft = [p for p in pts if p["phase"] == "finetune"]
        if ft:
            ax.axvline(ft[0]["seconds"] / 60, color=ax.lines[-1].get_color(), alpha=0.2, linestyle=":")
    ax.set_xlabel("wall time (min; probes excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(f"Time to accuracy ({machine})", 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_name() -> str:
    try:
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    except Exception:  # noqa: BLE001 - a description only
        gpus = []
    return cpu_description() + (f", GPU {', '.join(gpus)}" if gpus else ", no GPU")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"),
                   help="data.source for both recipes")
    p.add_argument("--checksum", default=None, help="data.checksum (default: the params file's, "
                   "or none when --data differs from it)")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--set", action="append", default=[], help="key=value overrides for ours")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--seeds-head-epochs", type=int, default=10)
    p.add_argument("--seeds-finetune-epochs", type=int, default=10)
    p.add_argument("--seeds-unfreeze", type=int, default=1, help="top registry blocks (1: the top block)")
    p.add_argument("--workdir", default=str(ROOT / "bench/work"))
    add_output_arguments(p, "recipes")
    p.add_argument("--recipes", default="ours,seeds,fastai", help="which to run, comma-separated")
    p.add_argument("--peer-python", default=os.environ.get("TRANSFERLAB_PEER_PYTHON", str(ROOT / ".peer/bin/python")),
                   help="the Python of the fastai peer's environment (bench/peer-requirements.txt)")
    p.add_argument("--peer-epochs", type=int, default=1, help="fastai fine_tune's unfrozen epochs")
    p.add_argument("--peer-freeze-epochs", type=int, default=1, help="fastai fine_tune's frozen epochs (its default)")
    p.add_argument("--scratch-epochs", type=float, default=9.9, help="the from-scratch peer's epochs (airbench94's)")
    p.add_argument("--reuse", action="store_true",
                   help="keep --workdir, and report the recipes not run from their <recipe>.json there")
    p.add_argument("--only", choices=["ours", "seeds"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not chosen or set(chosen) - {"ours", "seeds", "fastai", "scratch"}:
        p.error(f"--recipes: a comma-separated choice of ours, seeds, fastai, scratch; received {args.recipes!r}")
    if "seeds" in chosen and "ours" not in chosen and not args.reuse:
        p.error("--recipes: the seeds' recipe reads the arrays ours prepares; add ours (or --reuse its run)")
    workdir = Path(args.workdir).resolve()

    if args.only:
        from transferlab import config

        params = config.load(args.params)
        if args.only == "ours":
            result = run_ours(workdir, Path(args.params).resolve(), args.set)
        else:
            result = run_seeds(workdir, params.backbone.name, args.weights, args.seeds_head_epochs,
                               args.seeds_finetune_epochs, args.seeds_unfreeze, params.seed)
        (workdir / f"{args.only}.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0

    from transferlab import budget, config
    from transferlab.data import is_url

    base = config.load(args.params)
    source = args.data if is_url(args.data) else str(Path(args.data).resolve())
    checksum = args.checksum
    if checksum is None and not is_url(base.data.source) and \
            Path(source).resolve() == (Path(args.params).resolve().parent / base.data.source).resolve():
        checksum = base.data.checksum
    overrides = [f"data.source={source}", f"data.checksum={checksum or 'null'}",
                 f"backbone.weights={args.weights}", *args.set]
    if workdir.exists() and not args.reuse:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if "fastai" in chosen and is_url(source):
        print("[fastai] left out: it reads a local archive or folder, not a URL", flush=True)
        chosen.remove("fastai")
    if "fastai" in chosen and not Path(args.peer_python).exists():
        print(f"[fastai] left out: no {args.peer_python}; make it with `python -m venv .peer && "
              ".peer/bin/pip install -r bench/peer-requirements.txt` (or pass --peer-python)", flush=True)
        chosen.remove("fastai")
    me = [sys.executable, str(Path(__file__).resolve()), "--workdir", str(workdir), "--weights", args.weights]
    if "ours" in chosen:  # first: it prepares the arrays that the seeds' recipe then reads
        subprocess.run([*me, "--params", args.params, "--only", "ours",
                        *[a for o in overrides for a in ("--set", o)]], check=True)
    if "seeds" in chosen:  # the backbone and seed of the same (overridden) params
        subprocess.run([*me, "--params", str(workdir / "params.yaml"), "--only", "seeds",
                        "--seeds-head-epochs", str(args.seeds_head_epochs),
                        "--seeds-finetune-epochs", str(args.seeds_finetune_epochs),
                        "--seeds-unfreeze", str(args.seeds_unfreeze)], check=True)
    ours_params = config.load(workdir / "params.yaml") if (workdir / "params.yaml").exists() else base
    if "fastai" in chosen:  # the same archive or folder, input size and seed as ours
        if args.weights != "imagenet":
            print("[fastai] runs with the Lite0 ImageNet weights whatever --weights says", flush=True)
        subprocess.run([args.peer_python, str(ROOT / "bench/fastai_peer.py"), "--data", source,
                        "--workdir", str(workdir / "fastai"), "--out", str(workdir / "fastai.json"),
                        "--size", str(budget.input_size(ours_params.backbone.input_size, ours_params.budget)),
                        "--seed", str(ours_params.seed),
                        "--valid-pct", str(ours_params.data.val_fraction),
                        "--epochs", str(args.peer_epochs), "--freeze-epochs", str(args.peer_freeze_epochs)],
                       check=True)
    if "scratch" in chosen:  # the same archive or folder and seed as ours
        subprocess.run([sys.executable, "-m", "bench", "scratch", "--data", source, "--seed", str(ours_params.seed),
                        "--epochs", str(args.scratch_epochs), "--workdir", str(workdir / "scratch"),
                        "--result", str(workdir / "scratch.json")], cwd=ROOT, check=True)
    reused = [name for name in ("seeds", "fastai", "scratch", "ours")
              if args.reuse and name not in chosen and (workdir / f"{name}.json").exists()]
    for name in reused:
        print(f"[{name}] reported from {workdir / f'{name}.json'} (an earlier run; --reuse)", flush=True)
    order = [name for name in ("seeds", "fastai", "scratch", "ours") if name in chosen or name in reused]
    results = [json.loads((workdir / f"{name}.json").read_text()) for name in order]
    write_outputs(output_folder(args), results, machine_name(), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
