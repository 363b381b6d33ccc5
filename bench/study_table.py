"""The trials of an Optuna study as a table: number, state, value, the value
after each fine-tune epoch, seconds and params (CSV and Markdown).

    python -m bench study_table --storage sqlite:///optuna.db --study transferlab   # -> docs/bench/<date>-tune/

Writes trials.csv, and the run's results.json (the table's rows), README.md (a
stub with the table) and lscpu.txt, into docs/bench/<date>-<--name>/ or --out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, output_folder, write_run  # noqa: E402


def rows(study: optuna.Study) -> list[dict]:
    out = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        out.append({
            "trial": t.number, "state": t.state.name, "params_yaml": bool(t.user_attrs.get("params_yaml")),
            "value": None if t.value is None else round(t.value, 4),
            "per_epoch": " ".join(f"{t.intermediate_values[s]:.4f}" for s in sorted(t.intermediate_values)),
            "seconds": None if seconds is None else round(seconds),
            **{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in sorted(t.params.items())},
        })
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default="sqlite:///optuna.db")
    p.add_argument("--study", default="transferlab")
    add_output_arguments(p, "tune")
    args = p.parse_args(argv)
    table = rows(optuna.load_study(study_name=args.study, storage=args.storage))
    keys = list(dict.fromkeys(k for r in table for k in r))
    md = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    md += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in table]
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "trials.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    values = [r["value"] for r in table if r["value"] is not None]
    write_run(out, "study_table", {"trials": len(table), **({"best_value": max(values)} if values else {})},
              {"trials": table}, "\n".join(md) + "\n", argv)


if __name__ == "__main__":
    main()
