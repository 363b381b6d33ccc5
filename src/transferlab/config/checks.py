"""Each key of params.yaml checked on its own: ranges, fractions, formats.
Nothing here knows a backbone or the budget (`config.pipeline` checks those),
so that reading params costs the data stage no dependency on the model."""

from __future__ import annotations

from transferlab.config.schema import Params
from transferlab.errors import ConfigError


def validate(params: Params) -> None:
    _data(params)
    size = params.backbone.input_size
    if isinstance(size, str) and size != "auto" or isinstance(size, int) and size < 1:
        raise ConfigError(f"backbone.input_size must be a size in pixels or 'auto' (chosen by the budget), "
                          f"received: {size!r}")
    if not 0.0 <= params.head.dropout < 1.0:
        raise ConfigError(f"head.dropout must be in [0, 1), received: {params.head.dropout}")
    share = params.features.train_fraction
    if not 0 < share <= 1:
        raise ConfigError(f"features.train_fraction must be in (0, 1], received: {share}")
    if params.features.min_train_images < 0:
        raise ConfigError(f"features.min_train_images must be >= 0, received: {params.features.min_train_images}")
    _finetune(params)
    _tune(params)


def _data(params: Params) -> None:
    d = params.data
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), received: {d.val_fraction}")
    if d.val_min_per_class < 0:
        raise ConfigError(f"data.val_min_per_class must be >= 0, received: {d.val_min_per_class}")
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be in (0, 1), received: {d.test_fraction}")
    if d.image_size != "auto" and (isinstance(d.image_size, str) or d.image_size < 8):
        raise ConfigError(f"data.image_size must be a size in pixels (at least 8) or auto, received: {d.image_size!r}")
    if d.checksum is not None and d.checksum.split(":", 1)[0] not in ("md5", "sha256"):
        raise ConfigError(
            f"data.checksum must look like 'md5:<hex>' or 'sha256:<hex>', received: {d.checksum!r}"
        )


def _finetune(params: Params) -> None:
    f = params.finetune
    if isinstance(f.unfreeze, str) and f.unfreeze != "all" or isinstance(f.unfreeze, int) and f.unfreeze < 0:
        raise ConfigError(f"finetune.unfreeze must be a number of blocks or 'all', received: {f.unfreeze!r}")
    if f.steps < 0 or f.min_steps < 0:
        raise ConfigError(f"finetune.steps and finetune.min_steps must be >= 0, received: {f.steps}, {f.min_steps}")
    p = f.progressive
    if not 0.0 < p.scale <= 1.0:
        raise ConfigError(f"finetune.progressive.scale (the smaller input size over backbone.input_size) must "
                          f"be in (0, 1], 1 for off, received: {p.scale}")
    if not 0.0 <= p.fraction < 1.0:
        raise ConfigError(f"finetune.progressive.fraction (the share of steps at the smaller size) must be in "
                          f"[0, 1), received: {p.fraction}")
    if isinstance(f.augment.flip, str) and f.augment.flip != "auto":
        raise ConfigError(f"finetune.augment.flip must be true, false or auto, received: {f.augment.flip!r}")
    if not 0.0 <= f.augment.erase <= 1.0:
        raise ConfigError(f"finetune.augment.erase is a probability in [0, 1], received: {f.augment.erase}")
    if not 0.0 <= f.label_smoothing < 1.0:
        raise ConfigError(f"finetune.label_smoothing must be in [0, 1), received: {f.label_smoothing}")
    if not 0.0 < f.backprop <= 1.0:
        raise ConfigError(f"finetune.backprop is the share of each batch a step trains on, in (0, 1] "
                          f"(1: all), received: {f.backprop}")
    if not 0.0 <= f.ema < 1.0:
        raise ConfigError(f"finetune.ema is a momentum in [0, 1) (0: off), received: {f.ema}")
    if f.replans:
        _replans(f.replans)


def _replans(r: list) -> None:
    at = [pair[0] for pair in r if len(pair) == 2]
    # each plan past its step, except a last [step, step]: the budget's deadline ended the run there
    if (len(at) != len(r) or at[0] != 0 or at != sorted(set(at)) or any(b <= a for a, b in r[:-1])
            or r[-1][1] < r[-1][0] or r[-1] == [0, 0]):
        raise ConfigError(f"finetune.replans: expected [[0, steps], [step, steps], ...] with the steps at which "
                          f"they were planned increasing and each plan past its step (the last may end at its "
                          f"step), received: {r!r}")


def _tune(params: Params) -> None:
    t, s = params.tune, params.tune.space
    if any(isinstance(u, str) and u != "all" for u in s.unfreeze):
        raise ConfigError(f"tune.space.unfreeze holds block counts or 'all', received: {s.unfreeze}")
    ranges = {"learning_rate": s.learning_rate, "dropout": s.dropout, "weight_decay": s.weight_decay,
              "head_learning_rate": s.head_learning_rate, "label_smoothing": s.label_smoothing}
    for name, pair in ranges.items():
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"tune.space.{name} must be [low, high] with low <= high, received: {pair}")
    if not (0 <= s.label_smoothing[0] and s.label_smoothing[1] < 1):
        raise ConfigError(f"tune.space.label_smoothing must lie in [0, 1), received: {s.label_smoothing}")
    if t.input_size < 0:
        raise ConfigError(f"tune.input_size must be >= 0 (0: backbone.input_size), received: {t.input_size}")
    if min(s.learning_rate[0], s.head_learning_rate[0], s.weight_decay[0]) <= 0:
        raise ConfigError("tune.space.learning_rate, head_learning_rate and weight_decay are searched "
                          "on a log scale: their lows must be > 0")
    if not (0 <= s.dropout[0] and s.dropout[1] < 1):
        raise ConfigError(f"tune.space.dropout must lie in [0, 1), received: {s.dropout}")
    if not s.units or min(s.units) < 0:
        raise ConfigError(f"tune.space.units must be a non-empty list of widths >= 0, received: {s.units}")
    if not 0 < t.train_fraction <= 1:
        raise ConfigError(f"tune.train_fraction must be in (0, 1], received: {t.train_fraction}")
    if t.min_per_class < 0:
        raise ConfigError(f"tune.min_per_class must be >= 0, received: {t.min_per_class}")
    if t.heartbeat_seconds < 1:
        raise ConfigError(f"tune.heartbeat_seconds must be >= 1, received: {t.heartbeat_seconds}")
    if t.n_trials < 1 or t.head_epochs < 1 or t.finetune_epochs < 0:
        raise ConfigError("tune.n_trials and tune.head_epochs must be >= 1, tune.finetune_epochs >= 0")
