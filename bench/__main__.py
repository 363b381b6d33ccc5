"""One entry point for the benchmarks: `python -m bench <name> [args]`.

    python -m bench recipes --recipes ours --set budget=20m
    python -m bench ab --data ../shared/data/cifar10-jpeg.tar.gz --arm off:finetune.ema=0 --arm ema:finetune.ema=0.99
    python -m bench <name> --help

Every benchmark writes its run into docs/bench/<date>-<name>/ unless --out says
otherwise (bench/common.py: results.json, lscpu.txt, a README stub); then
`python bench/report.py` renders RESULTS.md and the runs' index from those folders.
bench/fastai_peer.py is not listed: it runs in the peer's own environment, as
a subprocess of `recipes`.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "recipes": "ours against the seeds' recipe and fastai's, test accuracy against wall time",
    "ab": "arms of the fine-tune and evaluate, from one shared prepare, features and head",
    "precision": "what precision: auto chooses here, the fine-tune's step in float32 and mixed_bfloat16",
    "folding": "the training step and inference with the frozen BatchNorm folded, and without",
    "memory": "peak RSS of prepare + features as the data set grows",
    "small_data": "the default pipeline on two small data sets",
    "throughput": "feature extraction and training step throughput choices",
    "finetune_paths": "fine-tuning throughput, the full path against the cached path",
    "study_table": "an Optuna study's trials as a table",
    "lr_range": "a learning-rate range test on the fine-tune of each project folder given",
    "scratch": "the from-scratch peer: airbench94 in Keras on CIFAR-10, test accuracy after each epoch, TTA at the end",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        for name, what in BENCHMARKS.items():
            print(f"  {name:15s} {what}")
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name not in BENCHMARKS:
        print(f"unknown benchmark {argv[0]!r}; choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    rc = importlib.import_module(f"bench.{name}").main(argv[1:])
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
