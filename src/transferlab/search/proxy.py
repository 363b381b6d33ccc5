"""What every trial trains on: a seeded, stratified share of the training images
(params.yaml `tune.train_fraction`, at least `tune.min_per_class` images of each
class: the whole set where a class has fewer) and the whole validation split, with their
pooled features at the proxy's input size, extracted once per study into
data/tune/cache and reused by every trial and worker. Trials never see the test
split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab import budget, config
from transferlab.errors import TuneError

log = logging.getLogger(__name__)

TUNE_DIR = Path("data/tune")


@dataclass
class TrialData:
    """The proxy's share of the training images and the whole validation split,
    with their pooled features at the proxy's size."""

    features: dict[str, np.ndarray]  # pooled: train (the share), val
    x: dict[str, np.ndarray]  # uint8 images: train (the share), val
    y: dict[str, np.ndarray]
    classes: list[str]
    meta: dict
    train_counts: dict  # images per class in the whole training split (the selection's rule reads them)


def proxy_size(params: config.Params) -> int:
    return params.tune.input_size or budget.input_size(params.backbone.input_size, params.budget)


def cache_dir(params: config.Params, fraction: float) -> Path:
    b = params.backbone
    return TUNE_DIR / "cache" / f"{b.name}-{proxy_size(params)}px-share{fraction:.4g}-seed{params.seed}"


def share(params: config.Params, y_train: np.ndarray) -> float:
    """The share of the training images a trial trains on: tune.train_fraction,
    raised until the smallest class gives tune.min_per_class images (all the
    training images where a class has fewer): a small data set is searched on
    the whole of it, not on a dozen images a class."""
    counts = np.bincount(y_train)
    smallest = int(counts[counts > 0].min())
    return min(1.0, max(params.tune.train_fraction, params.tune.min_per_class / smallest))


def _share_rows(params: config.Params, y_train: np.ndarray, fraction: float) -> np.ndarray:
    from transferlab import data

    if fraction >= 1:
        return np.arange(len(y_train))
    return data.split_rows(y_train, 1 - fraction, params.seed)[0]


def ensure_cache(params: config.Params, prepared_dir: Path) -> Path:
    """Pooled features of the proxy's training share and of the validation split,
    at the proxy's input size: made once (atomically) and reused by every trial
    and worker; made again when the data, backbone, size or share change."""
    import hashlib

    import keras

    from transferlab import backbones, data, features

    prepared = data.load_prepared(prepared_dir)
    y_train = np.asarray(prepared.y["train"])
    fraction = share(params, y_train)
    out = cache_dir(params, fraction)
    b = params.backbone
    want = {"backbone": b.name, "input_size": proxy_size(params), "weights": b.weights,
            "train_fraction": fraction, "seed": params.seed,
            "prepared": hashlib.sha256((prepared_dir / "manifest.json").read_bytes()).hexdigest()[:16],
            "mirror_check": 1}  # val_flip.npy: a trial's head checks whether a mirror keeps the labels
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return out
        log.info("%s was made for %s: rebuilding", out, {k: meta.get(k) for k in want})
    keras.utils.set_random_seed(params.seed)
    if fraction > params.tune.train_fraction:
        log.info("tune: a trial trains on %.1f%% of the training images (tune.min_per_class %d: the smallest "
                 "class has %d)", 100 * fraction, params.tune.min_per_class, int(min(c for c in np.bincount(y_train) if c)))
    index = _share_rows(params, y_train, fraction)
    image_size = int(prepared.x["train"].shape[1])
    model = backbones.build_feature_extractor(b.name, image_size, proxy_size(params), b.weights)
    x = {"train": data.Rows(prepared.x["train"], index), "val": prepared.x["val"],
         "test": prepared.x["test"][:0]}  # trials never see the test set
    features.extract_splits(model, x, out, params.features.batch_size,
                            {**want, "image_size": image_size, "train_index": index.tolist()})
    keras.backend.clear_session()
    return out


def load_trial_data(params: config.Params, prepared_dir: Path, cache: Path) -> TrialData:
    from transferlab import data, features

    prepared = data.load_prepared(prepared_dir)
    feats, meta = features.load_features(cache)
    index = np.asarray(meta["train_index"])
    y = {"train": np.asarray(prepared.y["train"])[index], "val": np.asarray(prepared.y["val"])}
    if len(y["val"]) == 0:
        raise TuneError("tune needs validation images: set data.val_fraction > 0 in params.yaml")
    x = {"train": np.asarray(prepared.x["train"][index]), "val": np.asarray(prepared.x["val"])}
    return TrialData({s: np.asarray(feats[s], np.float32) for s in ("train", "val", "val_flip") if s in feats}, x, y,
                     prepared.classes, meta, prepared.manifest["counts"]["train"])
