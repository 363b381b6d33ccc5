"""Command line: argparse and dispatch; each command lives in the module its name says.

    transferlab prepare   # data source -> data/prepared/            (stages/prepare.py)
    transferlab features  # frozen backbone -> data/features/...     (stages/features.py)
    transferlab head      # head on cached features -> models/head/  (stages/head.py)
    transferlab finetune  # unfreeze the top blocks -> models/finetune/  (stages/finetune.py)
    transferlab evaluate  # test set -> metrics, registered model    (stages/evaluate.py)
    transferlab run --set backbone.name=vgg16   # overrides -> params.yaml -> dvc repro  (run.py)
    transferlab tune [--workers 4]              # the Optuna search   (search/)
    transferlab predict photos/ --top-k 3       # the registered champion on image files (predict.py)
    transferlab export --out exports/           # SavedModel + TFLite, checked against Keras (export.py)
    transferlab ui                              # the MLflow UI on this project's store (ui.py)
    transferlab compare                         # backbones side by side, from MLflow (compare.py)

Every command takes `--params FILE` and `--set KEY=VALUE` (written into the
params file first). `dvc repro` runs the stages as `python -m
transferlab.stages.<name>` (dvc.yaml), so that this file is no dependency of
any stage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

log = logging.getLogger("transferlab")

STAGE_HELP = {
    "prepare": "data source -> data/prepared/",
    "features": "frozen backbone -> data/features/<backbone>-<input_size>/",
    "head": "head on the cached features -> models/head/",
    "finetune": "unfreeze the top blocks -> models/finetune/",
    "evaluate": "test set -> metrics, registered model",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="write an override into the params file first, e.g. --set backbone.name=vgg16")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="command")
    for name, text in STAGE_HELP.items():
        sub.add_parser(name, parents=[common], help=text)
    run_parser = sub.add_parser("run", parents=[common],
                                help="the whole pipeline (dvc repro) as one MLflow parent run")
    run_parser.add_argument("--budget", metavar="DURATION",
                            help="plan the pipeline to finish within this wall time, e.g. 20m or 1h "
                                 "(written to params.yaml as `budget`; 0: none)")
    tune = sub.add_parser("tune", parents=[common], help="the Optuna search (params.yaml: tune)")
    tune.add_argument("--workers", type=int, default=1,
                      help="worker processes on this machine (more than 1 needs PostgreSQL storage)")
    tune.add_argument("--storage", help="Optuna storage URL (default: $TRANSFERLAB_TUNE_STORAGE, then "
                      "tune.storage in params.yaml; the variable keeps a password out of `ps`)")
    tune.add_argument("--worker", action="store_true",
                      help="only run trials, joining a study that `transferlab tune` started")
    tune.add_argument("--worker-id", type=int, default=0, help="varies the sampler seed per worker")
    tune.add_argument("--apply", nargs="?", const="true", default="false", type=_yes_no,
                      help="write the best trial's params into params.yaml (unless params.yaml's own won); "
                           "a value, true or false, for the MLproject's `-P apply=...`")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="registered model name (default: tracking.model_name)")
    model.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    model.add_argument("--version", help="registry version (instead of the alias)")
    model.add_argument("--model-path", help="a local .keras file instead of the registry")
    predict = sub.add_parser("predict", parents=[common, model], help="classify image files or folders")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders (walked recursively)")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--format", choices=("csv", "json"), default="csv")
    predict.add_argument("--output", help="write here instead of stdout")
    predict.add_argument("--batch-size", type=int, default=64)
    export = sub.add_parser("export", parents=[common, model],
                            help="SavedModel + TFLite (float32, dynamic-range int8), checked against Keras")
    export.add_argument("--out", default="exports", help="output folder (default: exports/)")
    export.add_argument("--images", type=int, default=256, help="test images the check runs on")
    compare = sub.add_parser("compare", parents=[common],
                             help="backbones (and transfer vs scratch) side by side, from MLflow")
    compare.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    compare.add_argument("--last", type=int, help="keep the latest N runs per data set, backbone and weights")
    compare.add_argument("--out", default="reports", help="output folder (default: reports/)")
    ui = sub.add_parser("ui", parents=[common], help="the MLflow UI on the project's store")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, local only)")
    ui.add_argument("--port", type=int, default=5000)
    return parser


def _yes_no(value: str) -> bool:
    if value.lower() in ("true", "yes", "1"):
        return True
    if value.lower() in ("false", "no", "0", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, received {value!r}")


def _dispatch(args: argparse.Namespace) -> int:
    from transferlab import config, device

    if args.set and args.stage not in ("run", "tune"):  # those two write them under their own lock
        from transferlab.redact import redact_tree
        from transferlab.run import apply_overrides

        log.info("%s overrides: %s", args.params, redact_tree(apply_overrides(Path(args.params), args.set)))
    if args.stage in STAGE_HELP:
        from transferlab import stages

        return stages.run(importlib.import_module(f"transferlab.stages.{args.stage}").main, args.params)
    if args.stage == "run":
        from transferlab import run

        budget = [f"budget={args.budget}"] if args.budget is not None else []
        return run.main(Path(args.params), [*args.set, *budget])
    if args.stage == "ui":
        from transferlab import ui

        return ui.main(args.params, args.host, args.port)
    if args.stage == "compare":
        from transferlab import compare

        return compare.main(args.experiment or config.load(args.params).tracking.experiment, args.last, args.out)
    device.configure_device()
    if args.stage == "tune":
        from transferlab import search

        return search.main(Path(args.params), args.set, args.storage, args.workers, args.worker, args.worker_id,
                           args.apply)
    from transferlab import predict

    loaded = predict.load_for(args.model_path, args.model, args.alias, args.version, args.params)
    if args.stage == "predict":
        return predict.main(args.inputs, loaded, args.top_k, args.format, args.output, args.batch_size)
    from transferlab import export
    from transferlab.stages import PREPARED

    return export.main(loaded, args.out, args.images, PREPARED)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transferlab import stages
    from transferlab.errors import ConfigError, UserError

    stages.setup_logging()
    try:
        return _dispatch(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    # LookupError: compare's missing experiment
    except (UserError, FileNotFoundError, LookupError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
