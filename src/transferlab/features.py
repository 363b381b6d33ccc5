"""Frozen feature extraction, cached on disk.

Used by the features stage (`transferlab.stages.features`) and the search.

The stored uint8 images stream through the frozen backbone batch by batch: the
upscale happens inside the model, one batch at a time, so the upscaled images of
the whole set are never in memory. Pooled features are written per split, with a
meta.json that records what produced them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from transferlab import data
from transferlab.folding import fold_batchnorm
from transferlab.files import atomic_dir
from transferlab.train import mirror

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _forward(model: keras.Model):
    """One compiled inference function per model, reused across splits and passes;
    it runs the model with its BatchNorm layers folded into their convolutions
    (`folding`: the same outputs, faster)."""
    fn = getattr(model, "_transferlab_forward", None)
    if fn is None:
        folded = fold_batchnorm(model, trained=False)

        @tf.function(reduce_retracing=True)
        def fn(batch):
            out = folded(batch, training=False)
            return out if isinstance(out, (list, tuple)) else [out]

        model._transferlab_forward = fn
    return fn


def extract_into(
    model: keras.Model, x: np.ndarray, sinks: list[np.ndarray | None], batch_size: int,
    desc: str = "extract", flip: bool = False,
) -> None:
    """Run `model` over `x` (may be a memory map) in batches, writing output k of
    each batch into sinks[k] (an array or memory map; None discards it).
    flip=True feeds the horizontally flipped images."""

    forward = _forward(model)
    # disable=None: a bar in a terminal, nothing in a log file (the stage logs a line per split)
    with tqdm(total=len(x), desc=desc, unit="img", mininterval=2, disable=None) as bar:
        for start in range(0, len(x), batch_size):
            batch = np.asarray(x[start:start + batch_size])
            if flip:
                batch = batch[:, :, ::-1]
            for sink, out in zip(sinks, forward(tf.convert_to_tensor(batch))):
                if sink is not None:
                    sink[start:start + len(batch)] = out.numpy()
                    data.release(sink, start, start + len(batch))
            data.release(x, start, start + len(batch))  # read once: out of resident memory
            bar.update(len(batch))


def extract(model: keras.Model, x: np.ndarray, batch_size: int, desc: str = "extract") -> np.ndarray:
    """Pooled features of `x`, in memory, float32."""
    out = np.empty((len(x), model.output_shape[-1]), np.float32)
    extract_into(model, x, [out], batch_size, desc)
    return out


def _memmap(path: Path, n: int, shape, dtype) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *shape))


def extract_splits(
    model: keras.Model, x: dict[str, np.ndarray], out_dir: Path, batch_size: int, meta: dict,
) -> dict:
    """Pooled features of every split into `out_dir`; written to a temporary
    folder, then renamed, so a crash never leaves a half-written output.

    If `model` has two outputs (boundary activations, pooled features), the
    activations of train (plain and flipped) and val are cached too, as float16
    memory maps under activations/: the fine-tune stage trains on them."""
    two = isinstance(model.output, (list, tuple))
    feature_dim = int((model.output[1] if two else model.output).shape[-1])
    timings = {}
    with atomic_dir(out_dir) as tmp:
        if two:
            (tmp / "activations").mkdir()
            act_shape = tuple(int(d) for d in model.output[0].shape[1:])
        for split in SPLITS:
            n = len(x[split])
            start = time.perf_counter()
            feats = _memmap(tmp / f"{split}.npy", n, (feature_dim,), np.float32)
            passes = [(False, "")]
            if two and split == "train":
                passes.append((True, "_flip"))
            for flip, suffix in passes:
                acts = None
                if two and split != "test":
                    acts = _memmap(tmp / "activations" / f"{split}{suffix}.npy", n, act_shape, np.float16)
                sinks = [acts, None if flip else feats] if two else [feats]
                extract_into(model, x[split], sinks, batch_size, f"features {split}{suffix}", flip)
                if acts is not None:
                    acts.flush()
            feats.flush()
            del feats
            seconds = time.perf_counter() - start
            images = n * len(passes)
            rate = images / seconds if seconds > 0 else float("nan")
            timings[split] = {"images": int(images), "seconds": round(seconds, 2),
                              "images_per_second": round(rate, 1)}
            log.info("features %s: %d images in %.1f s (%.1f img/s)", split, images, seconds, rate)
        if len(x["val"]):  # for the head's mirror check (train.mirror): pooled features of mirrored val images
            start, rows = time.perf_counter(), mirror.sample(len(x["val"]))
            mirrored = _memmap(tmp / "val_flip.npy", len(rows), (feature_dim,), np.float32)
            extract_into(model, data.Rows(x["val"], rows), [None, mirrored] if two else [mirrored], batch_size,
                         "features val, mirrored", flip=True)
            mirrored.flush()
            del mirrored
            timings["val_flip"] = {"images": len(rows), "seconds": round(time.perf_counter() - start, 2)}
            meta = {**meta, "val_flip_index": rows.tolist()}
        meta = {**meta, "feature_dim": feature_dim, "timings": timings}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_activations(out_dir: str | Path) -> dict[str, np.ndarray]:
    """The cached boundary activations (memory maps): train, train_flip, val."""
    act_dir = Path(out_dir) / "activations"
    if not act_dir.is_dir():
        raise FileNotFoundError(
            f"{act_dir}: no activation cache; the features stage writes one when "
            "finetune.mode is cached and finetune.unfreeze is between 1 and the block count - 1"
        )
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(act_dir.glob("*.npy"))}


def load_features(out_dir: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").exists():
        raise FileNotFoundError(f"{out_dir}: no cached features here; run `dvc repro features` first")
    feats = {s: np.load(out_dir / f"{s}.npy") for s in SPLITS}
    if (out_dir / "val_flip.npy").exists():  # mirrored val rows meta["val_flip_index"]
        feats["val_flip"] = np.load(out_dir / "val_flip.npy")
    return feats, json.loads((out_dir / "meta.json").read_text())
