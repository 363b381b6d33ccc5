"""Side-by-side comparison of pipeline runs from MLflow: backbones, and
transfer (ImageNet weights) against from scratch (weights none).

    transferlab compare                 # every evaluated pipeline run
    transferlab compare --last 1        # the latest run per data set, backbone and weights

One row per pipeline run (its parent run's summary) that reached the evaluate
stage, grouped by the data set it ran on (the parent's `dataset` tag: the
source's name and the manifest's digest): backbone, weights, input size, test
accuracy, balanced accuracy and macro-F1, parameter count, time per stage and images/s. Writes
reports/compare.csv, reports/compare.md and reports/compare.png.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ["dataset", "backbone", "weights", "input_size", "unfreeze", "test_accuracy", "test_balanced_accuracy",
           "test_macro_f1", "parameters",
           "features_seconds", "head_seconds", "finetune_seconds", "total_seconds",
           "features_images_per_second", "train_images_per_second", "run_id"]


def collect(experiment: str, last: int | None = None) -> list[dict]:
    """One row per pipeline parent run that reached the evaluate stage (its summary:
    tracking.summarize_parent), read with mlflow.search_runs."""
    import math

    import mlflow

    from transferlab import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} in {tracking.tracking_uri()}")
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    if runs.empty or "metrics.test_accuracy" not in runs:
        return []
    runs = runs[runs["metrics.test_accuracy"].notna()]

    def value(row, column):
        v = row.get(column)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    rows, seen = [], {}
    for _, run in runs.iterrows():
        row = {
            "dataset": value(run, "tags.dataset") or "?",  # runs before the tag existed: "?"
            "backbone": value(run, "params.backbone.name") or value(run, "tags.backbone"),
            "weights": value(run, "params.backbone.weights") or "?",
            "input_size": int(value(run, "metrics.input_size") or 0)  # "auto", resolved
                          or value(run, "params.backbone.input_size") or "?",
            "unfreeze": value(run, "params.finetune.unfreeze") or "?",
            "test_accuracy": value(run, "metrics.test_accuracy"),
            "test_balanced_accuracy": value(run, "metrics.test_balanced_accuracy"),  # None: runs before they were
            "test_macro_f1": value(run, "metrics.test_macro_f1"),
            "parameters": int(run["metrics.parameters"]) if value(run, "metrics.parameters") is not None else None,
            "features_seconds": value(run, "metrics.features_seconds"),
            "head_seconds": value(run, "metrics.head_seconds"),
            "finetune_seconds": value(run, "metrics.finetune_seconds"),
            "total_seconds": value(run, "metrics.pipeline_seconds"),
            "features_images_per_second": value(run, "metrics.features_images_per_second"),
            "train_images_per_second": value(run, "metrics.train_images_per_second"),
            "run_id": run["run_id"],
        }
        key = (row["dataset"], row["backbone"], row["weights"])
        if last is not None and seen.get(key, 0) >= last:
            continue
        seen[key] = seen.get(key, 0) + 1
        rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], -(r["test_accuracy"] or 0)))  # a group per data set, best first
    return rows


def write(rows: list[dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "compare.md").write_text(markdown(rows))
    return [out_dir / "compare.csv", out_dir / "compare.md", _plot(rows, out_dir / "compare.png")]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if c != "run_id"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> Path:
    """Test accuracy against total time, one labelled point per run; transfer
    runs filled, from-scratch runs hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    several = len({row["dataset"] for row in rows}) > 1
    for row in rows:
        if row["test_accuracy"] is None:
            continue
        scratch = str(row["weights"]).lower() in ("none", "null", "")
        ax.scatter(row["total_seconds"], row["test_accuracy"], s=60,
                   facecolors="none" if scratch else "C0", edgecolors="C0")
        where = f" on {str(row['dataset']).split('@')[0]}" if several else ""
        ax.annotate(f"{row['backbone']}{' (scratch)' if scratch else ''}{where}",
                    (row["total_seconds"], row["test_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("pipeline time: the stages that ran (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("backbones: accuracy against time (hollow: from scratch)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(experiment: str, last: int | None, out: str | Path) -> int:
    import sys

    rows = collect(experiment, last)
    if not rows:
        log.error("no evaluated pipeline run in experiment %r yet: run `dvc repro` or `mlflow run .`",
                  experiment)
        return 1
    paths = write(rows, Path(out))
    sys.stdout.write(markdown(rows))
    log.info("%d run(s) compared: %s", len(rows), ", ".join(str(p) for p in paths))
    return 0
