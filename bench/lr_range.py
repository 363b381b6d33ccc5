"""A learning-rate range test (Smith 2017; fastai's `lr_find`) on the fine-tune
each project folder's stage would train: would it tell a data set that wants a
lower peak rate than the shipped one from CIFAR-10, which does not?

    python -m bench lr_range /tmp/sd/run-defects /tmp/sd/run-glyphs ../fresh-main
    python -m bench lr_range --steps 60 --low 1e-6 --high 1e-1 <folders>

Each folder must hold what the fine-tune stage reads (data/prepared, the
features' meta, models/head, params.yaml with a budget, so the stage probes): a
`dvc repro` checkout or a `small_data` run's folder. In a process of its own per
folder, the stage builds its fine-tune as it would (precision float32), and in
place of the budget's probe this script trains `--steps` steps on the training
images, the learning rate rising geometrically from `--low` to `--high` (the
recipe's optimizer, weight decay and label smoothing), each step on the next
batch, stopping once the loss passes 4x its first value; then it exits before
any training. Reports, per folder: the loss curve, the rate at the lowest
smoothed loss and a tenth of it (fastai's rule of thumb), the steepest descent's
rate, against the recipe's peak rate. Writes a run folder (docs/bench/<date>-
<--name>/, or --out) with results.json and a plot; asserts nothing, changes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, cpu_description, output_folder, write_run  # noqa: E402

SMOOTHING = 0.8  # the loss's exponential moving average, bias-corrected (as fastai's)
DIVERGED = 4.0  # stop once a step's loss passes this many times the first step's


def suggestions(rows: list[dict]) -> dict:
    """From the sweep's rows ({lr, loss}): the rate at the lowest smoothed loss,
    a tenth of it, and the rate where the smoothed loss falls fastest against
    log(rate)."""
    smooth, avg = [], 0.0
    for i, r in enumerate(rows):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * r["loss"]
        smooth.append(avg / (1 - SMOOTHING ** (i + 1)))
    finite = [i for i, s in enumerate(smooth) if math.isfinite(s)]
    lowest = min(finite, key=lambda i: smooth[i])
    slopes = {i: (smooth[i + 1] - smooth[i]) / (math.log(rows[i + 1]["lr"]) - math.log(rows[i]["lr"]))
              for i in finite if i + 1 in finite and i + 1 <= lowest}  # row -> slope to the next row
    steepest = min(slopes, key=slopes.get) if slopes else lowest
    return {"lr_at_lowest_loss": rows[lowest]["lr"], "lr_tenth_of_lowest": rows[lowest]["lr"] / 10,
            "lr_steepest": rows[steepest]["lr"], "lowest_smoothed_loss": smooth[lowest],
            "first_loss": rows[0]["loss"], "smoothed": smooth}


def sweep_in_this_folder(steps: int, low: float, high: float, result: Path) -> None:
    """The fine-tune stage in the current folder, the budget's probe replaced by
    the sweep, whose rows go to `result` (JSON)."""
    import keras
    import numpy as np

    from transferlab import cli, config
    from transferlab.train import recipe as recipes
    from transferlab.train import trainer

    f = config.load("params.yaml").finetune

    def sweep(t: trainer.FineTuning, batch_size: int):
        model = t.model
        optimizer = recipes.make_optimizer(f.optimizer, low, f.weight_decay)
        recipes.compile_model(model, optimizer, low, f.weight_decay, f.label_smoothing)
        per_epoch = t.steps_per_epoch(batch_size)
        order = np.random.default_rng(0).permutation(t.n_train)
        rows = []
        for i in range(steps):
            lr = low * (high / low) ** (i / (steps - 1))
            optimizer.learning_rate = lr
            if t.mode == "cached":
                x, y = t.inputs[i % per_epoch]
            else:
                idx = np.sort(order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size])
                x, y = t.inputs[idx], t.fit_kwargs["y"][idx]
            loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
            rows.append({"lr": lr, "loss": loss})
            if not math.isfinite(loss) or loss > DIVERGED * rows[0]["loss"]:
                break
        result.write_text(json.dumps({"mode": t.mode, "train_images": t.n_train, "batch_size": batch_size,
                          "recipe_learning_rate": f.learning_rate, "classes": int(model.output_shape[-1]),
                          "rows": rows}))
        raise SystemExit(0)  # before any training: the model's weights need no restoring

    trainer.probe = sweep
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # --set writes into the params file: a copy's, not the folder's
        copy = Path(tmp) / "params.yaml"
        shutil.copy("params.yaml", copy)
        code = cli.main(["finetune", "--params", str(copy), "--set", "precision=float32"])
    raise SystemExit(f"the fine-tune stage ended ({code}) before the sweep: is a budget set in params.yaml?")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        lrs = [row["lr"] for row in r["rows"]]
        line, = ax.plot(lrs, [s / r["first_loss"] for s in r["smoothed"]], label=name)
        ax.axvline(r["recipe_learning_rate"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss / first step's")
    ax.set_title("LR range test from the head's weights (dotted: the recipe's peak rate)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="*", help="project folders where prepare, features and head have run")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--low", type=float, default=1e-6)
    p.add_argument("--high", type=float, default=1e-1)
    add_output_arguments(p, "lr-range")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # FOLDER RESULT: the sweep there, in this process
    args = p.parse_args(argv)
    if args.one:
        result = Path(args.one[1]).resolve()
        os.chdir(args.one[0])
        sweep_in_this_folder(args.steps, args.low, args.high, result)
    results = {}
    for folder in args.folders:
        name = Path(folder).resolve().name
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "sweep.json"
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--low", str(args.low),
                                   "--high", str(args.high), "--one", folder, str(result)])
            if proc.returncode != 0 or not result.exists():
                print(f"[lr_range] {folder} failed (exit {proc.returncode})", flush=True)
                return proc.returncode or 1
            r = json.loads(result.read_text())
        results[name] = {**r, **suggestions(r["rows"])}
        print(f"[lr_range] {name}: lowest loss at {results[name]['lr_at_lowest_loss']:.2e}, "
              f"steepest at {results[name]['lr_steepest']:.2e}; recipe {r['recipe_learning_rate']:.1e}", flush=True)
    lines = ["| folder | mode | train images | batch | recipe's peak | lowest smoothed loss at | a tenth of it "
             "| steepest descent at | steps run |", "|" + " --- |" * 9]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mode']} | {r['train_images']} | {r['batch_size']} | "
                     f"{r['recipe_learning_rate']:.1e} | {r['lr_at_lowest_loss']:.2e} | {r['lr_tenth_of_lowest']:.2e} | "
                     f"{r['lr_steepest']:.2e} | {len(r['rows'])} |")
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "lr_range.png")
    figures = {n: {k: r[k] for k in ("lr_at_lowest_loss", "lr_tenth_of_lowest", "lr_steepest",
                                     "recipe_learning_rate")} for n, r in results.items()}
    write_run(out, "lr_range", figures, {"folders": results}, "\n".join(lines) + "\n", argv, cpu=cpu_description())
    return 0


if __name__ == "__main__":
    sys.exit(main())
