"""What every stage after prepare shares: the params check it runs before it
reads them (`PARAMS_CHECKS`: against the backbone and the budget,
config.pipeline) and how it starts (`begin`: the device, the seeds, the
prepared data). Apart from the stages' package, so that the data stage imports
none of it."""

from __future__ import annotations

from transferlab import config, data, device
from transferlab.config import pipeline
from transferlab.stages import PREPARED


# `transferlab.stages.run` runs these on the loaded params before the stage's main
PARAMS_CHECKS = (pipeline.check,)


def begin(params: config.Params) -> data.Prepared:
    """The device, the seeds (and deterministic ops), then the prepared data (memory-mapped)."""
    device.configure_device(params.precision)
    device.seed_everything(params.seed, params.deterministic)
    return data.load_prepared(PREPARED)
