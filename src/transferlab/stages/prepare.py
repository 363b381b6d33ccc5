"""Stage prepare: the data source -> data/prepared/ (uint8 arrays, class names,
manifest), metrics/prepare.json (image counts and the stage's wall time).

    python -m transferlab.stages.prepare     # dvc.yaml's command; `transferlab prepare` alike
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transferlab import config, data, tracking
from transferlab.files import write_atomic, write_json
from transferlab.redact import redact
from transferlab.stages import METRICS, PREPARED, entry, resolved, end_stage

log = logging.getLogger(__name__)

KEYS = ("seed", "data", "tracking.experiment")  # no model key: a new backbone reuses the prepared data


def main(params: config.Params) -> dict:
    """Returns the manifest."""
    d = params.data
    start = time.perf_counter()
    ds, digest = data.load_source(
        d.source, d.format, Path(d.cache_dir), d.checksum, d.image_size, d.test_fraction, params.seed
    )
    try:
        manifest = data.write_prepared(
            ds, PREPARED, d.val_fraction, params.seed,
            {"source": redact(d.source), "checksum": digest, "format": d.format, "seed": params.seed},
            val_min_per_class=d.val_min_per_class,
        )
    finally:
        ds.close()
    values = config.subset(params, *KEYS)
    write_atomic(PREPARED / "params.yaml", resolved(values))
    seconds = time.perf_counter() - start
    summary = {**{f"{k}_images": v for k, v in manifest["totals"].items()}, "num_skipped": manifest["num_skipped"],
               "prepare_seconds": round(seconds, 2), "stage_seconds": round(end_stage(), 2)}
    write_json(METRICS / "prepare.json", summary)
    log.info("prepare: %s in %.1f s; skipped %d file(s)", manifest["totals"], seconds, manifest["num_skipped"])
    with tracking.stage_run("prepare", experiment=params.tracking.experiment, params=config.flatten(values),
                            inputs=[], dataset=manifest):
        import mlflow

        mlflow.log_metrics(summary)
        mlflow.set_tag("data.checksum", digest)
        mlflow.log_artifact(str(PREPARED / "manifest.json"))
    return manifest


if __name__ == "__main__":
    entry(main)
