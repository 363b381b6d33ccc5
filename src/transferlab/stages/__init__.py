"""The DVC stages, one module each: prepare -> features -> head -> finetune -> evaluate.

Each module's `main(params)` reads params (and only the keys dvc.yaml lists for
it), calls the library with plain arguments, writes its outputs and logs one
MLflow run. `python -m transferlab.stages.<name>` is the stage's dvc.yaml
command; `transferlab <name>` runs the same function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from transferlab import config
from transferlab.errors import ConfigError, UserError

log = logging.getLogger("transferlab")

PREPARED = Path("data/prepared")
MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")


# When this process imported the stages, or when the last stage run in it ended:
# a stage's wall time (`stage_seconds`), imports and start-up included, which the
# budget's clock sums (transferlab.budget).
_clock = time.monotonic()


def stage_seconds() -> float:
    """Seconds since this stage began: this process started, or the previous
    stage run in it ended (`end_stage`)."""
    return time.monotonic() - _clock


def end_stage() -> float:
    """The stage's seconds (`stage_seconds`), and the clock restarted for a next stage in this process."""
    global _clock
    now = time.monotonic()
    seconds, _clock = now - _clock, now
    return seconds


def recorded_stage_seconds(*names: str) -> float:
    """Wall seconds the stages `names` took, as they recorded them in metrics/
    (`stage_seconds`), whether they ran now or DVC restored them from its cache:
    the clock a budget counts."""
    from transferlab.errors import BudgetError

    spent = 0.0
    for name in names:
        path = METRICS / f"{name}.json"
        recorded = json.loads(path.read_text()).get("stage_seconds") if path.exists() else None
        if recorded is None:
            raise BudgetError(f"{path}: no stage_seconds recorded, so the budget cannot count the {name} "
                              f"stage; run `dvc repro --force {name}` (or `budget: 0`)")
        spent += float(recorded)
    return spent


def features_dir(backbone: str, input_size: int | str) -> Path:
    """dvc.yaml's features output: named by the params' `backbone.input_size`
    ("auto" included; meta.json has the size it resolved to)."""
    return Path("data/features") / f"{backbone}-{input_size}"


def resolved(values: dict) -> str:
    """The params a stage read, as written beside its outputs (URL secrets masked)."""
    from transferlab.redact import redact_tree

    return yaml.safe_dump(redact_tree(values), sort_keys=False)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main: Callable[[config.Params], object], params_path: str | Path = "params.yaml") -> int:
    """Load params, check them as the stage asks (its module's PARAMS_CHECKS), run it; the
    exit status: 0, 1 (a user error) or 2 (params)."""
    try:
        params = config.load(params_path)
        for check in getattr(sys.modules[main.__module__], "PARAMS_CHECKS", ()):  # stages.common's
            check(params)
        main(params)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (UserError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def entry(main: Callable[[config.Params], object]) -> None:
    """`python -m transferlab.stages.<name> [--params FILE]`."""
    parser = argparse.ArgumentParser(description=sys.modules[main.__module__].__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    setup_logging()
    sys.exit(run(main, args.params))
