"""What the benchmark scripts share: the clock, the machine's description, and
the one output convention: each run is a folder docs/bench/<date>-<name>/ with
results.json (the figures and the script's data), the machine's lscpu and a
README stub (the command and the commit; the question and the answer are the
author's to write)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "bench"


class Clock:
    """Wall time since start, less the time spent in probes (add it to `paused`)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.paused = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused


def cpu_description() -> str:
    """The CPU's model name, family/model numbers and the flags that decide its
    speed here (AVX-512, native bf16, AMX), as /proc/cpuinfo gives them, and the core count (and how
    many of them this process may run on, where `taskset` or a container's affinity restricts it)."""
    info: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.machine()}, {os.cpu_count()} CPU cores"
    flags = set(info.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = f"{os.cpu_count()} CPU cores" + (f", {usable} of them usable here (affinity)" if usable != os.cpu_count()
                                              else "")
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')}, model "
            f"{info.get('model', '?')}; {' '.join(wanted) or 'no AVX2'}), {cores}")


def run_folder(name: str, day: str | None = None, root: Path = RUNS) -> Path:
    """docs/bench/<date>-<name>/, today's date unless `day` is given; a second
    run of the same name on the same day gets -2, -3, ... rather than
    overwriting the first."""
    base = f"{day or date.today().isoformat()}-{name}"
    folder, n = root / base, 1
    while folder.exists():
        n += 1
        folder = root / f"{base}-{n}"
    return folder


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def commit() -> str | None:
    """The checkout's short commit, with "+changes" when tracked files differ from it."""
    head = _git("rev-parse", "--short", "HEAD")
    if head and _git("status", "--porcelain", "--untracked-files=no"):
        head += "+changes"
    return head


def lscpu() -> str | None:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def command(script: str, argv: list[str] | None) -> str:
    """The command line of this run, as typed from the repository root."""
    return shlex.join(["python", "-m", "bench", script, *(sys.argv[1:] if argv is None else argv)])


def write_run(out: str | Path, script: str, figures: dict, data: dict, text: str, argv: list[str] | None = None,
              cpu: str | None = None, echo: bool = True) -> Path:
    """One run of bench/<script>.py into `out`: results.json ({name, date,
    command, commit, cpu, lscpu, figures, **data}; the question and the answer
    left null for the author), lscpu.txt (where `lscpu` runs) and README.md (a
    stub with the command, the commit and `text`, the script's table; an
    existing README is kept). Prints `text` unless `echo` is false. Returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    listing = lscpu()
    if listing is not None:
        (out / "lscpu.txt").write_text(listing)
    parts = out.name.split("-", 3)
    dated = len(parts) == 4 and all(p.isdigit() for p in parts[:3])
    day, name = ("-".join(parts[:3]), parts[3]) if dated else (date.today().isoformat(), out.name)
    results = {"name": name, "date": day, "question": None, "answer": None, "command": command(script, argv), "commit": commit(), "cpu": cpu or cpu_description(),
               "lscpu": "lscpu.txt" if listing is not None else None,
               "measures": [], "figures": figures, **data}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    readme = out / "README.md"
    if not readme.exists():
        readme.write_text("\n".join([
            f"# {out.name}", "", "**Question.** (to write)", "", "**Answer.** (to write)", "", "**Command.**", "",
            "```bash", results["command"], "```", "", f"**Commit.** {results['commit'] or 'not recorded'}. "
            f"**CPU.** {results['cpu']}", "",
            "For RESULTS.md: write the question and the answer here and in results.json, list in its `measures` the",
            "targets the run measures (hour, budget-20m, seeds, fastai, scratch, small-data, memory), in",
            "`supersedes` the runs it replaces and in `short_because` why it falls short of an accuracy target,",
            "then run `python bench/report.py`.", "",
            "## Output", "", text.rstrip("\n"), ""]))
    if echo:
        print(text)
    print(f"written: {out}/results.json, README.md" + (", lscpu.txt" if listing is not None else ""))
    return out


def output_folder(args) -> Path:
    """The run's folder from the parsed --out and --name."""
    return Path(args.out).resolve() if args.out else run_folder(args.name)


def add_output_arguments(parser, name: str) -> None:
    """--out and --name, the same for every benchmark: the run goes to --out, or
    to docs/bench/<today>-<--name>/."""
    parser.add_argument("--name", default=name, help=f"the run's name: docs/bench/<date>-<name>/ (default {name})")
    parser.add_argument("--out", default=None, help="the run's folder instead of docs/bench/<date>-<name>/")


def median_seconds(fn, steps: int) -> float:
    """The median wall time of `steps` calls of `fn`, after two warm-up calls."""
    import time

    import numpy as np

    for _ in range(2):  # warm-up
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
