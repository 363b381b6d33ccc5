"""The trials of an Optuna study as a table: number, state, value, the value
after each fine-tune epoch, seconds and params (CSV and Markdown).

    python bench/study_table.py --storage sqlite:///optuna.db --study transferlab --out docs/bench/tune-DATE
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import optuna


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default="sqlite:///optuna.db")
    p.add_argument("--study", default="transferlab")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    table = rows(optuna.load_study(study_name=args.study, storage=args.storage))
    keys = list(dict.fromkeys(k for r in table for k in r))
    md = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    md += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in table]
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "trials.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(table)
        (args.out / "trials.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
