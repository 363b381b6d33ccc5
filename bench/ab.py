"""A recipe part measured on the validation set: the pipeline once up to the head,
then the fine-tune and evaluate stages once per arm, back to back, from the same
prepared data, features and head.

    python -m bench ab --data ../shared/data/cifar10-jpeg.tar.gz --set backbone.input_size=128 \\
        --set budget=0 --set 'finetune.replans=[[0,669],[106,637],[352,599]]' \\
        --arm off:finetune.ema=0 --arm ema:finetune.ema=0.99

An arm is `name:key=value[,key=value...]`; it may change only what the stages
before the fine-tune do not read (`finetune.*`, `evaluate.*`). To compare arms
step for step, fix the fine-tune's length (`budget: 0` with `finetune.steps` or
a budgeted run's `finetune.replans`, as its metrics/finetune.json recorded them):
under a budget each arm plans its own length on the clock. The decision is the
validation accuracy (what the pipeline's best epoch is chosen by); test accuracy
is reported beside it. With 5,000 validation images at 91 % a single run's
accuracy has a standard error of about 0.4 points: say so when an arm wins by less.

Writes the run into docs/bench/<date>-<--name>/ (or --out): results.json (each
arm's figures and the script's report), README.md (a stub with the table, also
printed) and lscpu.txt; each arm's metrics stay in --workdir. Asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, cpu_description, output_folder, write_run  # noqa: E402

SHARED = ("finetune.", "evaluate.")  # what an arm may change: read by no stage before the fine-tune


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    overrides = [item for item in rest.split(",") if item.strip()]
    if not sep or not name or not overrides:
        raise SystemExit(f"--arm expects name:key=value[,key=value], received: {text!r}")
    for item in overrides:
        if not item.strip().startswith(SHARED):
            raise SystemExit(f"--arm {name}: {item!r} changes a stage before the fine-tune, which the arms "
                             f"share; an arm may change {' and '.join(k + '*' for k in SHARED)} only")
    return name, overrides


def run(workdir: Path, params_path: Path, base: list[str], arms: list[tuple[str, list[str]]]) -> dict:
    from transferlab import config
    from transferlab.run import apply_overrides
    from transferlab.stages import evaluate, features, head, prepare
    from transferlab.stages import finetune as finetune_stage

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    shutil.copy(params_path, "base.yaml")
    apply_overrides(Path("base.yaml"), base)
    shutil.copy("base.yaml", "params.yaml")
    params = config.load("params.yaml")
    shared = {}
    for name, stage in (("prepare", prepare), ("features", features), ("head", head)):
        stage.main(params)
        shared[name] = json.loads(Path(f"metrics/{name}.json").read_text())["stage_seconds"]  # as it recorded
        print(f"[ab] {name}: {shared[name]:.1f} s", flush=True)
    results = []
    for name, overrides in arms:
        shutil.copy("base.yaml", "params.yaml")
        apply_overrides(Path("params.yaml"), overrides)
        params = config.load("params.yaml")
        finetune_stage.main(params)
        evaluate.main(params)
        ft = json.loads(Path("metrics/finetune.json").read_text())
        ev = json.loads(Path("metrics/evaluate.json").read_text())
        with open("plots/finetune/history.csv") as fh:
            val = [round(float(r["val_accuracy"]), 4) for r in csv.DictReader(fh)]
        row = {"arm": name, "overrides": overrides, "best_val_accuracy": ft.get("best_val_accuracy"),
               "best_epoch": ft.get("best_epoch"), "val_accuracy_by_epoch": val, "steps_run": ft.get("steps_run"),
               "test_accuracy": ev["test_accuracy"], "single_view_test_accuracy": ev.get("test_accuracy_single_view"),
               "val_nll": ev.get("val_nll"),
               "finetune_seconds": ft["stage_seconds"]}
        results.append(row)
        shutil.copytree("metrics", f"arms/{name}/metrics", dirs_exist_ok=True)
        print(f"[ab] {name}: {json.dumps(row)}", flush=True)
    return {"cpu": cpu_description(), "base": base, "shared_seconds": shared, "arms": results}


def figures(report: dict) -> dict:
    """Each arm's headline figures (validation decides, test beside it)."""
    keys = ("best_val_accuracy", "test_accuracy", "single_view_test_accuracy", "steps_run", "finetune_seconds")
    return {"arms": {r["arm"]: {k: r[k] for k in keys if r.get(k) is not None} for r in report["arms"]}}


def table(report: dict) -> str:
    lines = [f"CPU: {report['cpu']}", f"base: {' '.join(report['base']) or '(params.yaml)'}", "",
             "| arm | overrides | best val acc (epoch) | val acc by epoch | test acc (single view) | steps | "
             "fine-tune s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["arms"]:
        single = "-" if r["single_view_test_accuracy"] is None else f"{100 * r['single_view_test_accuracy']:.2f} %"
        lines.append(
            f"| {r['arm']} | {' '.join(r['overrides'])} | {100 * r['best_val_accuracy']:.2f} % ({r['best_epoch']}) | "
            f"{', '.join(f'{100 * v:.2f}' for v in r['val_accuracy_by_epoch'])} | {100 * r['test_accuracy']:.2f} % "
            f"({single}) | {r['steps_run']} | {r['finetune_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="data.source (an absolute path is safest: the stages run in --workdir)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="an override every arm shares")
    ap.add_argument("--arm", action="append", required=True, help="name:key=value[,key=value]")
    ap.add_argument("--workdir", default="bench-ab")
    add_output_arguments(ap, "ab")
    args = ap.parse_args(argv)
    arms = [parse_arm(a) for a in args.arm]
    if len({n for n, _ in arms}) != len(arms):
        raise SystemExit("--arm names must differ")
    base = list(args.overrides)
    if args.data:
        base.insert(0, f"data.source={Path(args.data).resolve()}")  # the params file's checksum stays: --set it
    out = output_folder(args)
    report = run(Path(args.workdir).resolve(), Path(args.params).resolve(), base, arms)
    write_run(out, "ab", figures(report), report, table(report), argv, cpu=report["cpu"])
    return report


if __name__ == "__main__":
    main()
