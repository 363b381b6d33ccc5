"""params.yaml -> typed, frozen dataclasses, one module a job:

    schema    the sections and their choices (no defaults: params.yaml holds every one)
    parse     load, the type check, subset and flatten
    checks    each key on its own (ranges, formats)
    pipeline  what the keys mean for the model (backbone blocks, the budget); not imported here

`from transferlab import config; config.load("params.yaml")`.
"""

from transferlab.config.parse import flatten, from_dict, load, subset, to_dict
from transferlab.config.schema import (CHOICES, AugmentConfig, BackboneConfig, DataConfig, EvaluateConfig,
                                       FeaturesConfig, FinetuneConfig, HeadConfig, Params, ProgressiveConfig,
                                       SpaceConfig, TrackingConfig, TuneConfig)
from transferlab.errors import ConfigError

__all__ = ["CHOICES", "AugmentConfig", "BackboneConfig", "ConfigError", "DataConfig", "EvaluateConfig",
           "FeaturesConfig", "FinetuneConfig", "HeadConfig", "Params", "ProgressiveConfig", "SpaceConfig",
           "TrackingConfig", "TuneConfig", "flatten", "from_dict", "load", "subset", "to_dict"]
