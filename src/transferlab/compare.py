"""Side-by-side comparison of pipeline runs from MLflow: backbones, and
transfer (ImageNet weights) against from scratch (weights none).

    transferlab compare                 # every evaluated pipeline run
    transferlab compare --last 1        # the latest run per backbone and weights

One row per pipeline run that reached the evaluate stage: backbone, weights,
input size, test accuracy, parameter count, time per stage and images/s. Writes
reports/compare.csv, reports/compare.md and reports/compare.png.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ["backbone", "weights", "input_size", "unfreeze", "test_accuracy", "parameters",
           "features_seconds", "head_seconds", "finetune_seconds", "total_seconds",
           "features_images_per_second", "train_images_per_second", "run_id"]


def collect(experiment: str, last: int | None = None) -> list[dict]:
    """Rows from the experiment's stage runs, grouped by their parent run."""
    import mlflow

    from transferlab import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} in {tracking.tracking_uri()}")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list", max_results=5000)
    by_parent: dict[str, dict] = {}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        stage = run.data.tags.get("stage")
        if parent and stage in ("features", "head", "finetune", "evaluate"):
            by_parent.setdefault(parent, {})[stage] = run
    rows = []
    for parent, stages in by_parent.items():
        if "evaluate" not in stages:
            continue
        ev = stages["evaluate"]
        params = {}
        for run in stages.values():
            params.update(run.data.params)
        metrics = {}
        for run in stages.values():
            metrics.update(run.data.metrics)
        times = [metrics.get(f"{s}_seconds") for s in ("features", "head", "finetune", "evaluate")]
        rows.append({
            "backbone": ev.data.tags.get("backbone"),
            "weights": params.get("backbone.weights", "?"),
            "input_size": params.get("backbone.input_size", "?"),
            "unfreeze": params.get("finetune.unfreeze", "?"),
            "test_accuracy": metrics.get("test_accuracy"),
            "parameters": int(metrics["parameters"]) if "parameters" in metrics else None,
            "features_seconds": metrics.get("features_seconds"),
            "head_seconds": metrics.get("head_seconds"),
            "finetune_seconds": metrics.get("finetune_seconds"),
            "total_seconds": round(sum(t for t in times if t is not None), 1),
            "features_images_per_second": metrics.get("features_images_per_second"),
            "train_images_per_second": metrics.get("train_images_per_second"),
            "run_id": parent,
            "_start": ev.info.start_time,
        })
    rows.sort(key=lambda r: r["_start"], reverse=True)
    if last is not None:
        kept, seen = [], {}
        for row in rows:
            key = (row["backbone"], row["weights"])
            if seen.get(key, 0) < last:
                kept.append(row)
                seen[key] = seen.get(key, 0) + 1
        rows = kept
    for row in rows:
        row.pop("_start")
    rows.sort(key=lambda r: (r["test_accuracy"] is None, -(r["test_accuracy"] or 0)))
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
    for row in rows:
        if row["test_accuracy"] is None:
            continue
        scratch = str(row["weights"]).lower() in ("none", "null", "")
        ax.scatter(row["total_seconds"], row["test_accuracy"], s=60,
                   facecolors="none" if scratch else "C0", edgecolors="C0")
        ax.annotate(f"{row['backbone']}{' (scratch)' if scratch else ''}",
                    (row["total_seconds"], row["test_accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("features + head + finetune + evaluate (s)")
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
