"""The shape of params.yaml: one frozen dataclass a section, and the choices
of the keys that have a fixed set. No defaults: params.yaml is the one place a
default lives, so a params file gives every key."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class DataConfig:
    # A local path (archive or directory) or an http(s)/file URL.
    source: str
    # auto | cifar10 | image_folder
    format: str
    # "md5:<hex>" or "sha256:<hex>"; required before a CIFAR-10 pickle is loaded.
    checksum: str | None
    # px (>= 8) | auto: the images' median shorter side, at most 224 (data.folders.native_size)
    image_size: int | str
    val_fraction: float
    # At least this many validation images of each class, where the class keeps as
    # many for training (a class too small to validate is named in the manifest).
    val_min_per_class: int
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
    # flip: true | false | auto (flips where a mirror keeps the labels: train.mirror)
    flip: bool | str
    shift: float
    rotation: float
    zoom: float
    # Random Erasing: the share of images with one patch replaced by noise
    erase: float


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
    # the share of each batch a step trains on: the images with the highest loss
    # (selective backprop); 1: all
    backprop: float
    patience: int
    augment: AugmentConfig
    progressive: ProgressiveConfig


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    # test-time augmentation: flip (mean of the image and its mirror) | none | auto
    # (flip where a mirror keeps the labels and it lowers the validation NLL)
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
    min_per_class: int  # the share raised until the smallest class gives this many (search.proxy.share)
    input_size: int
    head_epochs: int
    finetune_epochs: int
    # `--apply` retrains the winner and params.yaml's configuration as trials on the
    # whole training split at the pipeline's input size, and writes it only if it wins there too.
    confirm: bool
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
    # The fine-tune's dtype policy (transferlab.train.precision): auto | float32 |
    # mixed_bfloat16 | mixed_float16; on a GPU every stage's.
    precision: str
    # The validation metric that picks models everywhere (transferlab.train.selection):
    # auto | accuracy | balanced_accuracy | macro_f1.
    select: str
    # The loss's class weights: auto | balanced | none (transferlab.train.selection).
    class_weight: str
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
    "precision": ("auto", "float32", "mixed_bfloat16", "mixed_float16"),
    "select": ("auto", "accuracy", "balanced_accuracy", "macro_f1"),
    "class_weight": ("auto", "balanced", "none"),
    "data.format": ("auto", "cifar10", "image_folder", "csv"),
    "head.optimizer": ("adam", "adamw", "sgd", "rmsprop"),
    "finetune.optimizer": ("adam", "adamw", "sgd", "rmsprop"),
    "finetune.mode": ("cached", "full"),
    "finetune.schedule": ("cosine", "linear", "plateau"),
    "tune.pruner": ("median", "hyperband", "none"),
    "tune.monitor": ("auto", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_loss"),
    "evaluate.tta": ("auto", "flip", "none"),
}
