"""RESULTS.md and the runs' index, rendered from docs/bench/<date>-<name>/results.json.

    python bench/report.py            # writes RESULTS.md and docs/bench/README.md
    python bench/report.py --check    # exit 1 if either differs from what the folders give

Where each target stands now, and each peer: for every target, the current run
of each machine kind (the latest by date among the runs that measure it and
that no later run supersedes), with its folder, CPU and date. A run says what it
measures (`measures`: hour, budget-20m, seeds, fastai, scratch, small-data,
memory), which runs it replaces (`supersedes`) and, where it falls short of an
accuracy target, why (`short_because`) in its results.json. The judging lives
here; the bench scripts only measure. The output is deterministic: sorted, no
time of generation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "bench"

HOUR_MINUTES, BUDGET_MINUTES = 60, 20
HOUR_GOAL, BUDGET_GOAL = 0.95, 0.93  # the targets now
EARLIER_HOUR_GOAL, EARLIER_BUDGET_GOAL = 0.93, 0.90  # met before, still tracked
RSS_LIMIT_GB = 4.0
SEEDS_SOONER = 5.0  # the seeds' final accuracy, reached at least this many times sooner
MEMORY_RATIO = 1.5  # peak RSS of 20,000 images against 2,000, at 224 px

# Why the accuracy targets fall short, where it holds for every run; each run adds its own reason.
SHORT_COMMON = (
    "The fine-tune gains with every epoch it is given: on each machine kind measured, the hour (160 px) scores "
    "above the 20 minutes (128 px), and each run's reason below gives the epochs its time held. No change measured "
    "at equal time has won: input size 144, progressive resizing, frozen depthwise kernels, EMA, selective "
    "backprop, and Lite1 or Lite2 at a smaller input size tied; one block fewer unfrozen, batch 64 and BatchNorm "
    "training lost; the learning rate stayed the best of three (their runs are in "
    "[docs/bench](docs/bench/README.md)). The data is a JPEG re-encoding of CIFAR-10 (quality 75, 4:2:0 chroma), on "
    "which the from-scratch peer reaches 90.71 % against its published 94.01 %: a gap not explained (this data, or "
    "a fault in our implementation of the peer). What the re-encoding costs ours is not measured: the canonical "
    "archive cannot be downloaded on these machines.")
NO_REASON = "(not written: add `short_because` to its results.json)"


# --------------------------------------------------------------------------- reading


RUN_FIELDS = ("name", "date", "command", "figures")


def load_runs(root: Path = RUNS) -> list[dict]:
    """Every run folder's results.json, with its folder name as `folder`, sorted
    by folder; a results.json that is not a run record (`RUN_FIELDS`) is left out."""
    runs = []
    for path in sorted(root.glob("*/results.json")):
        run = json.loads(path.read_text())
        if isinstance(run, dict) and all(k in run for k in RUN_FIELDS):
            run["folder"] = path.parent.name
            runs.append(run)
    return runs


def not_runs(root: Path = RUNS) -> list[str]:
    """The folders under `root` that hold no run record."""
    return sorted({p.name for p in root.iterdir() if p.is_dir()} - {r["folder"] for r in load_runs(root)})


def current(runs: list[dict], measure: str) -> list[dict]:
    """The runs that measure `measure` and are current: not superseded for it
    (a run replaces another only in what it measures itself), and for each CPU
    the latest by date (the last folder name on a tie)."""
    replaced = {name for r in runs if measure in r.get("measures", []) for name in r.get("supersedes", [])}
    latest: dict[str, dict] = {}
    for r in runs:
        if measure in r.get("measures", []) and r["folder"] not in replaced:
            key = r.get("cpu") or "?"
            if key not in latest or (r["date"], r["folder"]) > (latest[key]["date"], latest[key]["folder"]):
                latest[key] = r
    return sorted(latest.values(), key=lambda r: (r["date"], r["folder"]), reverse=True)


# --------------------------------------------------------------------------- judging


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def standing(value: float, goal: float, higher_is_better: bool = True, unit: str = "points",
             scale: float = 100.0) -> str:
    """"met" when `value` reaches `goal`, else "not met" and by how much."""
    met = value >= goal if higher_is_better else value <= goal
    if met:
        return "met"
    return f"**not met**, by {abs(goal - value) * scale:.2f} {unit}"


def within(run: dict, goal: float, minutes: float) -> str:
    """Test accuracy at least `goal` in at most `minutes` of wall time."""
    f = run["figures"]
    if f["wall_minutes"] > minutes:
        return f"**not met**: {f['wall_minutes']:.1f} min, over {minutes} min"
    return standing(f["test_accuracy"], goal)


def first_time(points: list[dict], accuracy: float) -> float | None:
    """Wall seconds at which test accuracy first reached `accuracy`."""
    hits = [p["seconds"] for p in points if p["test_accuracy"] >= accuracy]
    return min(hits) if hits else None


def recipe(run: dict, name: str) -> dict | None:
    return next((r for r in run.get("results", []) if r["recipe"] == name), None)


def sooner_than_peer(ours: dict, peer: dict) -> tuple[bool, str]:
    """Whether ours reached every accuracy the peer reached after an epoch, sooner;
    and the pairs of times."""
    pairs, met = [], bool(peer["points"])
    for p in peer["points"]:
        if p["phase"] == "final":
            continue
        t = first_time(ours["points"], p["test_accuracy"])
        met = met and t is not None and t < p["seconds"]
        pairs.append(f"{pct(p['test_accuracy'])} at {p['seconds'] / 60:.1f} min: ours "
                     + (f"{t / 60:.1f} min" if t is not None else "never"))
    return met, "; ".join(pairs) or "no points"


def seeds_ratio(ours: dict, seeds: dict) -> tuple[float | None, str]:
    """How many times sooner ours reached the seeds' final accuracy than the seeds did."""
    goal = seeds["after_finetune"]
    t_seeds, t_ours = first_time(seeds["points"], goal), first_time(ours["points"], goal)
    if not (t_seeds and t_ours):
        return None, f"seeds' final {pct(goal)}: ours never reached it"
    return t_seeds / t_ours, (f"seeds' final {pct(goal)} at {t_seeds / 60:.1f} min, ours at {t_ours / 60:.1f} min: "
                              f"{t_seeds / t_ours:.1f}x")


# --------------------------------------------------------------------------- rendering


def _cells(run: dict) -> str:
    return f"[{run['folder']}](docs/bench/{run['folder']}/) | {run.get('cpu') or 'not recorded'} | {run['date']}"


def _acc_time(run: dict) -> str:
    f = run["figures"]
    return f"{pct(f['test_accuracy'])} in {f['wall_minutes']:.1f} min"


def target_rows(runs: list[dict], earlier: bool = False) -> list[str]:
    hour_goal = EARLIER_HOUR_GOAL if earlier else HOUR_GOAL
    budget_goal = EARLIER_BUDGET_GOAL if earlier else BUDGET_GOAL
    rows = []
    for r in current(runs, "hour"):
        rows.append(f"| default `dvc repro`: >= {100 * hour_goal:.0f} % test within {HOUR_MINUTES} min | "
                    f"{within(r, hour_goal, HOUR_MINUTES)} | {_acc_time(r)} | {_cells(r)} |")
    for r in current(runs, "budget-20m"):
        rows.append(f"| `--budget 20m`: >= {100 * budget_goal:.0f} % test, within the budget | "
                    f"{within(r, budget_goal, BUDGET_MINUTES)} | {_acc_time(r)} | {_cells(r)} |")
    if not earlier:
        scratch = current(runs, "scratch")
        if not scratch:
            rows.append("| ahead of the from-scratch peer at every accuracy it reaches | not measured | "
                        "no run of the peer yet | - | - | - |")
        for r in scratch:
            met, pairs = sooner_than_peer(recipe(r, "ours"), recipe(r, "scratch"))
            rows.append(f"| ahead of the from-scratch peer at every accuracy it reaches | "
                        f"{'met' if met else '**not met**'} | {pairs} | {_cells(r)} |")
        for r in current(runs, "hour") + current(runs, "budget-20m"):
            rss = r["figures"]["peak_rss_gb"]
            rows.append(f"| peak RSS <= {RSS_LIMIT_GB:.0f} GB | "
                        f"{standing(rss, RSS_LIMIT_GB, higher_is_better=False, unit='GB', scale=1)} | "
                        f"{rss:.2f} GB | {_cells(r)} |")
        return rows
    for r in current(runs, "fastai"):
        met, pairs = sooner_than_peer(recipe(r, "ours"), recipe(r, "fastai"))
        rows.append(f"| ahead of fastai's `fine_tune` at every accuracy it reached | {'met' if met else '**not met**'} "
                    f"| {pairs} | {_cells(r)} |")
    for r in current(runs, "seeds"):
        ratio, text = seeds_ratio(recipe(r, "ours"), recipe(r, "seeds"))
        verdict = "**not met**" if ratio is None else standing(ratio, SEEDS_SOONER, unit="x", scale=1)
        rows.append(f"| the seeds' final accuracy >= {SEEDS_SOONER:.0f}x sooner | {verdict} | {text} | {_cells(r)} |")
    for r in current(runs, "small-data"):
        for name, s in sorted(r["figures"]["sets"].items()):
            beat = s["test_accuracy"] > s["baseline_test_accuracy"]
            kept = s["finetune_best_val_accuracy"] >= s["head_best_val_accuracy"]
            rows.append(f"| small data ({name}): above the raw-pixel baseline, fine-tune no worse than the head | "
                        f"{'met' if beat and kept else '**not met**'} | {pct(s['test_accuracy'])} against "
                        f"{pct(s['baseline_test_accuracy'])}; val {pct(s['finetune_best_val_accuracy'])} against the "
                        f"head's {pct(s['head_best_val_accuracy'])} | {_cells(r)} |")
    for r in current(runs, "memory"):
        ratio = r["figures"]["peak_rss_ratio"]
        rows.append(f"| memory: 224 px folder, 20,000 against 2,000 images <= {MEMORY_RATIO}x peak RSS | "
                    f"{standing(ratio, MEMORY_RATIO, higher_is_better=False, unit='x', scale=1)} | {ratio:.2f}x | "
                    f"{_cells(r)} |")
    return rows


def short_rows(runs: list[dict]) -> list[str]:
    """One line for each current run short of an accuracy target (now or earlier):
    each goal it misses and by how much, and its reason."""
    rows = []
    for measure, target, goals, minutes in (
            ("hour", "default `dvc repro`", (HOUR_GOAL, EARLIER_HOUR_GOAL), HOUR_MINUTES),
            ("budget-20m", "`--budget 20m`", (BUDGET_GOAL, EARLIER_BUDGET_GOAL), BUDGET_MINUTES)):
        for r in current(runs, measure):
            missed = [f">= {100 * goal:.0f} % {verdict.replace('**', '')}" for goal in goals
                      if (verdict := within(r, goal, minutes)) != "met"]
            if missed:
                rows.append(f"- {target}: {'; '.join(missed)} ([{r['folder']}](docs/bench/{r['folder']}/), "
                            f"{r.get('cpu') or 'CPU not recorded'}). {r.get('short_because') or NO_REASON}")
    return rows


def peer_rows(runs: list[dict]) -> list[str]:
    rows = []
    for r in current(runs, "seeds"):
        s = recipe(r, "seeds")
        ratio, text = seeds_ratio(recipe(r, "ours"), s)
        rows.append(f"| the seeds' recipe ({s['config']}) | {pct(s['after_finetune'])} in {s['wall_seconds'] / 60:.1f} "
                    f"min | {text} | {_cells(r)} |")
    for r in current(runs, "fastai"):
        p = recipe(r, "fastai")
        _, pairs = sooner_than_peer(recipe(r, "ours"), p)
        rows.append(f"| fastai ({p['config']}) | {pct(p['after_finetune'])} in {p['wall_seconds'] / 60:.1f} min | "
                    f"{pairs} | {_cells(r)} |")
    scratch = current(runs, "scratch")
    for r in scratch:
        p = recipe(r, "scratch")
        _, pairs = sooner_than_peer(recipe(r, "ours"), p)
        rows.append(f"| from scratch ({p['config']}) | {pct(p['after_finetune'])} in {p['wall_seconds'] / 60:.1f} min "
                    f"| {pairs} | {_cells(r)} |")
    if not scratch:
        rows.append("| from scratch (the airbench94 recipe in Keras) | not measured | - | - | - | - |")
    return rows


HEADER = "| target | standing | measured | run | CPU | date |\n| --- | --- | --- | --- | --- | --- |"


def render(runs: list[dict]) -> str:
    short = short_rows(runs)
    lines = [
        "# Results",
        "",
        "Generated by `python bench/report.py` from `docs/bench/<date>-<name>/results.json`; do not edit by hand.",
        "Each row is the current run of one machine kind: the latest that measures the target and that no later",
        "run replaced. Every run, with its question and answer: [docs/bench/README.md](docs/bench/README.md).",
        "Test accuracy is on CIFAR-10's 10,000 test images (a standard error of about 0.26 points); wall time is",
        "the pipeline's, test probes excluded.",
        "",
        "## Targets",
        "",
        HEADER,
        *target_rows(runs),
        "",
        *(["## Why the targets fall short", "", SHORT_COMMON, "", *short, ""] if short else []),
        "## Earlier targets, still tracked",
        "",
        HEADER,
        *target_rows(runs, earlier=True),
        "",
        "## Peers",
        "",
        "| peer | its result | against ours | run | CPU | date |",
        "| --- | --- | --- | --- | --- | --- |",
        *peer_rows(runs),
    ]
    return "\n".join(lines) + "\n"


def _clause(text: str | None) -> str:
    return (text or "(not written yet)").replace("|", "\\|").replace("\n", " ")


def render_index(runs: list[dict]) -> str:
    lines = ["# Benchmark runs", "",
             "One folder per run, `<date>-<name>/`: `results.json` (the figures), `lscpu.txt` (the machine, where one",
             "was kept) and a README (the question, the command, the commit, the answer, the notes). `python -m bench",
             "<name>` writes a new one; `python bench/report.py` renders this index and [RESULTS.md](../../RESULTS.md).",
             "Generated; do not edit by hand.", "",
             "| date | run | question | answer |", "| --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (r["date"], r["folder"]), reverse=True):
        lines.append(f"| {r['date']} | [{r['folder'][11:]}]({r['folder']}/) | {_clause(r.get('question'))} | "
                     f"{_clause(r.get('answer'))} |")
    return "\n".join(lines) + "\n"


def outputs(root: Path = RUNS) -> dict[Path, str]:
    runs = load_runs(root)
    return {ROOT / "RESULTS.md": render(runs), root / "README.md": render_index(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if any differs")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"written: {path.relative_to(ROOT)}")
    for path in stale:
        print(f"stale: {path.relative_to(ROOT)} (run python bench/report.py)", file=sys.stderr)
    for folder in not_runs():
        print(f"left out: docs/bench/{folder}/ has no results.json with {', '.join(RUN_FIELDS)}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
