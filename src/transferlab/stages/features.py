"""Stage features: the frozen backbone once over the training and validation
images -> data/features/<backbone>-<input_size>/ (pooled features per split,
meta.json; with finetune.mode cached, the activations at the unfreeze boundary
for both flips). `features.train_fraction` < 1: the training images of a seeded,
stratified share only (their rows: meta.json's train_index), for the head to
train on, which leaves a short budget more time for the fine-tune; never fewer
than `features.min_train_images` (a small data set's head trains on all).
`backbone.input_size: auto` takes the size the budget picks (budget.input_size).

    python -m transferlab.stages.features    # dvc.yaml's command; `transferlab features` alike
"""

from __future__ import annotations

import time

import numpy as np

from transferlab import backbones, budget, config, data, features, tracking
from transferlab.files import write_atomic, write_json
from transferlab.stages import METRICS, PREPARED, entry, features_dir, resolved, end_stage
from transferlab.stages.common import PARAMS_CHECKS, begin  # noqa: F401 (PARAMS_CHECKS: for stages.run)
from transferlab.train import surgery

KEYS = ("seed", "deterministic", "precision", "budget", "backbone", "features", "finetune.unfreeze", "finetune.mode",
        "tracking.experiment")


def main(params: config.Params) -> dict:
    """Returns the throughput summary written to metrics/features.json."""
    prepared = begin(params)
    b, f = params.backbone, params.finetune
    spec = backbones.get(b.name)
    image_size = int(prepared.x["train"].shape[1])
    size = budget.input_size(b.input_size, params.budget)
    meta = {"backbone": b.name, "input_size": size, "weights": b.weights, "image_size": image_size}
    if surgery.uses_cache(spec, f.mode, f.unfreeze):
        body = backbones.build_body(b.name, size, b.weights)
        split = surgery.split_body(spec, body, f.unfreeze)
        model = surgery.cache_extractor(spec, split, image_size, size)
        meta.update(boundary=split.boundary, unfreeze=f.unfreeze)
    else:
        model = backbones.build_feature_extractor(b.name, image_size, size, b.weights)
    out_dir = features_dir(b.name, b.input_size)
    x = {"train": prepared.x["train"], "val": prepared.x["val"], "test": prepared.x["test"][:0]}  # test: unused
    n = len(prepared.y["train"])
    keep = min(n, max(round(params.features.train_fraction * n), params.features.min_train_images))
    if keep < n:  # the head trains on a seeded, stratified share of the training images
        index = np.sort(data.stratified_split(np.arange(n), prepared.y["train"], 1 - keep / n, params.seed)[0])
        x["train"] = prepared.x["train"][index]
        meta["train_index"] = index.tolist()
    start = time.perf_counter()
    meta = features.extract_splits(model, x, out_dir, params.features.batch_size, meta)
    values = config.subset(params, *KEYS)
    write_atomic(out_dir / "params.yaml", resolved(values))
    seconds = time.perf_counter() - start
    total = sum(t["images"] for t in meta["timings"].values())
    summary = {"input_size": size, "features_seconds": round(seconds, 2),
               "features_images_per_second": round(total / seconds, 1),
               "stage_seconds": round(end_stage(), 2)}
    write_json(METRICS / "features.json", summary)
    with tracking.stage_run("features", experiment=params.tracking.experiment, backbone=b.name,
                            params=config.flatten(values), inputs=[str(PREPARED)], dataset=prepared.manifest):
        import mlflow

        mlflow.log_metrics(summary)
        mlflow.log_artifact(str(out_dir / "meta.json"))
    return summary


if __name__ == "__main__":
    entry(main)
