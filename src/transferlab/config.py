"""params.yaml -> typed, frozen dataclasses.

Every knob of the pipeline lives in params.yaml, and params.yaml is the only
place a default lives: these dataclasses have none, so a params file must give
every key. An unknown key, a missing one or a value of the wrong type is an
error that names the key and lists what is valid; a typo or a partial file never
silently falls back to another recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from transferlab.errors import ConfigError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


@dataclass(frozen=True)
class DataConfig:
    # A local path (archive or directory) or an http(s)/file URL.
    source: str
    # auto | cifar10 | image_folder
    format: str
    # "md5:<hex>" or "sha256:<hex>"; required before a CIFAR-10 pickle is loaded.
    checksum: str | None
    image_size: int
    val_fraction: float
    # Only used when the source has no test split of its own.
    test_fraction: float
    cache_dir: str


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    # imagenet | none | a path to a local weights file
    weights: str
    # Input resolution the stored images are upscaled to inside the model, or
    # "auto": the size the budget favours (transferlab.budget.input_size).
    input_size: int | str


@dataclass(frozen=True)
class FeaturesConfig:
    batch_size: int
    # The share of the training images the head trains on (seeded, stratified),
    # but at least min_train_images of them (all of a smaller set).
    train_fraction: float
    min_train_images: int


@dataclass(frozen=True)
class HeadConfig:
    units: int
    dropout: float
    optimizer: str
    learning_rate: float
    epochs: int
    batch_size: int
    patience: int


@dataclass(frozen=True)
class AugmentConfig:
    # "full" mode applies all of these to the images; "cached" mode caches the
    # activations of both horizontal flips and picks one per sample and epoch.
    flip: bool
    shift: float
    rotation: float
    zoom: float
    # Random Erasing: the share of images with one patch replaced by noise
    erase: float


def augment_options(a: AugmentConfig) -> dict:
    """The augmentation as finetune.prepare's `augment`: each field read by name
    (so a stage's params check sees every key it reads)."""
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(AugmentConfig)}


@dataclass(frozen=True)
class ProgressiveConfig:
    # Progressive resizing (full path): the first `fraction` of the fine-tune's
    # steps (whole epochs) at `scale` x backbone.input_size (down to a multiple
    # of 32, at least the backbone's smallest), the rest at backbone.input_size.
    # Convolution weights do not depend on the input size, so the same weights
    # go on at the larger one. scale 1 or fraction 0: off.
    scale: float
    fraction: float


@dataclass(frozen=True)
class FinetuneConfig:
    # Top N blocks of the registry's block list; 0 = head only; "all".
    unfreeze: int | str
    # cached: run the frozen part once, cache its activations, train the rest;
    # full: every image through the whole network every epoch.
    mode: str
    optimizer: str
    learning_rate: float
    weight_decay: float
    # cosine | linear: linear warmup, then a decay to zero at the last step;
    # plateau: ReduceLROnPlateau.
    schedule: str
    warmup_epochs: float
    epochs: int
    # 0: `epochs` epochs, but at least `min_steps` optimizer steps (or what the
    # budget plans); N > 0: exactly N steps (a budget's plan, replayed).
    steps: int
    # A budgeted run's re-plans, replayed without the clock: [[0, steps], [step, steps], ...],
    # as its metrics/finetune.json records them under plan.replans; []: none.
    replans: list[list[int]]
    min_steps: int
    label_smoothing: float
    # momentum of a moving average of the weights (Keras' use_ema), written into them
    # at every epoch's end; 0: none
    ema: float
    # the unfrozen blocks' BatchNorm layers train too (batch statistics, gamma and beta,
    # moving statistics); false: every BatchNorm stays frozen in inference mode
    train_bn: bool
    # the unfrozen blocks' depthwise convolutions train too; false: they keep their
    # pretrained kernels, and the step skips their filter gradient
    train_depthwise: bool
    batch_size: int
    patience: int
    augment: AugmentConfig
    progressive: ProgressiveConfig


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    # test-time augmentation: flip (mean of the image and its mirror) | none | auto
    # (flip where it lowers the validation NLL)
    tta: str
    # a temperature fitted on val (one scalar, minimum NLL), kept where it lowers val NLL
    calibrate: bool
    # a logistic regression on the raw pixels, reported beside the model
    baseline: bool


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str
    # Registered model name; the alias "champion" marks the best test accuracy.
    model_name: str
    # Set by `transferlab tune --apply`: the study's MLflow run these params came
    # from; the pipeline's run and that run are linked by tags.
    tuned_by: str | None


@dataclass(frozen=True)
class SpaceConfig:
    """The Optuna search space: [low, high] ranges, or a list of choices."""

    unfreeze: list[int | str]  # registry blocks; "all" = every block
    learning_rate: list[float]  # fine-tune, log scale
    head_learning_rate: list[float]  # log scale
    dropout: list[float]
    weight_decay: list[float]  # log scale
    label_smoothing: list[float]
    units: list[int]  # choices


@dataclass(frozen=True)
class TuneConfig:
    study: str
    # sqlite:///optuna.db (one worker) or postgresql+psycopg2://user:pass@host/db (many)
    storage: str
    n_trials: int
    timeout_minutes: float  # 0: no limit
    pruner: str  # median | hyperband | none
    monitor: str
    # The proxy a trial trains: the pipeline's recipe (full path, augmentation) on a
    # seeded, stratified share of the training images, at a smaller input size
    # (0: backbone.input_size), for a few fine-tune epochs with the schedule sized
    # to them. Validation is the whole validation split, the same for every trial.
    train_fraction: float
    input_size: int
    head_epochs: int
    finetune_epochs: int
    # A worker silent this long x3 has died: its trial is marked failed and retried.
    heartbeat_seconds: int
    space: SpaceConfig


@dataclass(frozen=True)
class Params:
    seed: int
    # The pipeline's wall-time budget ("20m", "1h30m", "900s"), or 0: none
    # (finetune.epochs decides). See transferlab.budget.
    budget: str | float
    # true: TensorFlow's deterministic ops too (slower), so that two runs on the
    # same machine give identical numbers; seeds are always set.
    deterministic: bool
    # The tf.distribute strategy of the head and the fine-tune (transferlab.device):
    # auto | mirrored | none. Batch sizes are per replica.
    distribute: str
    data: DataConfig
    backbone: BackboneConfig
    features: FeaturesConfig
    head: HeadConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    tune: TuneConfig


CHOICES = {
    "distribute": ("auto", "mirrored", "none"),
    "data.format": ("auto", "cifar10", "image_folder"),
    "head.optimizer": ("adam", "adamw", "sgd", "rmsprop"),
    "finetune.optimizer": ("adam", "adamw", "sgd", "rmsprop"),
    "finetune.mode": ("cached", "full"),
    "finetune.schedule": ("cosine", "linear", "plateau"),
    "tune.pruner": ("median", "hyperband", "none"),
    "tune.monitor": ("val_accuracy", "val_loss"),
    "evaluate.tta": ("auto", "flip", "none"),
}


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, received: {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, received: {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, received: {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, received: {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    where = prefix or "the top level"
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys: {names}"
        )
    missing = [name for name in names if name not in raw]
    if missing:
        raise ConfigError(
            f"missing key(s) {missing} in {where}: a params file gives every key (params.yaml is "
            "the one place defaults live; copy the missing ones from the project's params.yaml)"
        )
    values = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], key)
            continue
        value = _check_type(raw[name], hint, key)
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: must be one of {list(CHOICES[key])}, received: {value!r}")
        values[name] = value
    return cls(**values)


def _validate(params: Params) -> None:
    from transferlab.backbones import BACKBONES  # the registry owns the names

    if params.backbone.name not in BACKBONES:
        raise ConfigError(
            f"backbone.name: unknown backbone {params.backbone.name!r}; "
            f"registered: {sorted(BACKBONES)}"
        )
    d = params.data
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), received: {d.val_fraction}")
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be in (0, 1), received: {d.test_fraction}")
    if d.image_size < 8:
        raise ConfigError(f"data.image_size must be at least 8, received: {d.image_size}")
    if d.checksum is not None and d.checksum.split(":", 1)[0] not in ("md5", "sha256"):
        raise ConfigError(
            f"data.checksum must look like 'md5:<hex>' or 'sha256:<hex>', received: {d.checksum!r}"
        )
    size = params.backbone.input_size
    if isinstance(size, str) and size != "auto" or isinstance(size, int) and size < 1:
        raise ConfigError(f"backbone.input_size must be a size in pixels or 'auto' (chosen by the budget), "
                          f"received: {size!r}")
    h = params.head
    if not 0.0 <= h.dropout < 1.0:
        raise ConfigError(f"head.dropout must be in [0, 1), received: {h.dropout}")
    u = params.finetune.unfreeze
    n_blocks = len(BACKBONES[params.backbone.name].blocks)
    if isinstance(u, str) and u != "all" or isinstance(u, int) and not 0 <= u <= n_blocks:
        raise ConfigError(
            f"finetune.unfreeze must be 0..{n_blocks} (blocks of {params.backbone.name}) "
            f"or 'all', received: {u!r}"
        )
    f = params.finetune
    share = params.features.train_fraction
    if not 0 < share <= 1:
        raise ConfigError(f"features.train_fraction must be in (0, 1], received: {share}")
    if params.features.min_train_images < 0:
        raise ConfigError(f"features.min_train_images must be >= 0, received: {params.features.min_train_images}")
    if share < 1 and f.mode == "cached" and 0 < (n_blocks if u == "all" else u) < n_blocks:
        raise ConfigError("features.train_fraction < 1 needs finetune.mode: full (the cached path caches the "
                          "activations of every training image)")
    if f.steps < 0 or f.min_steps < 0:
        raise ConfigError(f"finetune.steps and finetune.min_steps must be >= 0, received: {f.steps}, {f.min_steps}")
    _validate_progressive(params)
    if not 0.0 <= f.augment.erase <= 1.0:
        raise ConfigError(f"finetune.augment.erase is a probability in [0, 1], received: {f.augment.erase}")
    if not 0.0 <= f.label_smoothing < 1.0:
        raise ConfigError(f"finetune.label_smoothing must be in [0, 1), received: {f.label_smoothing}")
    if not 0.0 <= f.ema < 1.0:
        raise ConfigError(f"finetune.ema is a momentum in [0, 1) (0: off), received: {f.ema}")
    from transferlab import budget

    try:
        seconds = budget.parse(params.budget)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if seconds and f.steps:
        raise ConfigError(f"budget ({params.budget!r}) and finetune.steps ({f.steps}) both size the fine-tune: "
                          "set budget: 0 to replay a plan's steps, or finetune.steps: 0 to plan to the budget")
    if f.replans:
        _validate_replans(f, seconds)
    if seconds and f.schedule == "plateau":
        raise ConfigError(f"budget ({params.budget!r}): a budgeted fine-tune decays its learning rate to zero at "
                          "the budget's end; set finetune.schedule to cosine or linear, or budget: 0 for plateau")
    _validate_tune(params, n_blocks)


def _validate_replans(f: FinetuneConfig, budget_seconds: float | None) -> None:
    r = f.replans
    if budget_seconds or f.steps:
        raise ConfigError("finetune.replans replays a budgeted run: set budget: 0 and finetune.steps: 0 with it")
    if f.schedule not in ("cosine", "linear"):
        raise ConfigError("finetune.replans needs finetune.schedule cosine or linear, as the budgeted run it replays")
    at = [pair[0] for pair in r if len(pair) == 2]
    # each plan past its step, except a last [step, step]: the budget's deadline ended the run there
    if (len(at) != len(r) or at[0] != 0 or at != sorted(set(at)) or any(b <= a for a, b in r[:-1])
            or r[-1][1] < r[-1][0] or r[-1] == [0, 0]):
        raise ConfigError(f"finetune.replans: expected [[0, steps], [step, steps], ...] with the steps at which "
                          f"they were planned increasing and each plan past its step (the last may end at its "
                          f"step), received: {r!r}")


def _validate_progressive(params: Params) -> None:
    p = params.finetune.progressive
    if not 0.0 < p.scale <= 1.0:
        raise ConfigError(f"finetune.progressive.scale (the smaller input size over backbone.input_size) must "
                          f"be in (0, 1], 1 for off, received: {p.scale}")
    if not 0.0 <= p.fraction < 1.0:
        raise ConfigError(f"finetune.progressive.fraction (the share of steps at the smaller size) must be in "
                          f"[0, 1), received: {p.fraction}")


def _validate_tune(params: Params, n_blocks: int) -> None:
    t, s = params.tune, params.tune.space
    unfreeze = [n_blocks if u == "all" else u for u in s.unfreeze]
    if any(isinstance(u, str) for u in unfreeze):
        raise ConfigError(f"tune.space.unfreeze holds block counts or 'all', received: {s.unfreeze}")
    ranges = {"unfreeze": unfreeze, "learning_rate": s.learning_rate, "dropout": s.dropout,
              "weight_decay": s.weight_decay, "head_learning_rate": s.head_learning_rate,
              "label_smoothing": s.label_smoothing}
    for name, pair in ranges.items():
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"tune.space.{name} must be [low, high] with low <= high, received: {pair}")
    if not 0 <= unfreeze[0] <= unfreeze[1] <= n_blocks:
        raise ConfigError(f"tune.space.unfreeze must lie in 0..{n_blocks} or 'all' (the {n_blocks} blocks of "
                          f"{params.backbone.name}), received: {s.unfreeze}")
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
    if t.heartbeat_seconds < 1:
        raise ConfigError(f"tune.heartbeat_seconds must be >= 1, received: {t.heartbeat_seconds}")
    if t.n_trials < 1 or t.head_epochs < 1 or t.finetune_epochs < 0:
        raise ConfigError("tune.n_trials and tune.head_epochs must be >= 1, tune.finetune_epochs >= 0")


def from_dict(raw: dict) -> Params:
    params = _build(Params, raw, "")
    _validate(params)
    return params


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file; run from the project root or pass --params")
    with path.open() as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def subset(params: Params, *keys: str) -> dict:
    """The values of the dotted `keys` ("seed", "finetune", "backbone.name"), nested
    as in params.yaml: what a stage reads, logs and writes beside its outputs. A
    wrapped params object (`__wrapped__`, as tests use to record what a stage
    reads) counts a whole section as read."""
    out: dict = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        node = getattr(node, "__wrapped__", node)
        value = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node
        *parents, leaf = key.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, the shape MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
