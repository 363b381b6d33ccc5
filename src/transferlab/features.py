"""Frozen feature extraction, cached on disk.

Stage: `transferlab features` (dvc stage `features`).

The stored uint8 images stream through the frozen backbone batch by batch: the
upscale happens inside the model, one batch at a time, so the upscaled images of
the whole set are never in memory. Pooled features are written per split, with a
meta.json that records what produced them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def extract(model: keras.Model, x: np.ndarray, batch_size: int, desc: str = "extract") -> np.ndarray:
    """Run `model` over `x` (may be a memory map) in batches; returns float32 features."""
    out = np.empty((len(x), model.output_shape[-1]), np.float32)

    @tf.function(reduce_retracing=True)
    def forward(batch):
        return model(batch, training=False)

    with tqdm(total=len(x), desc=desc, unit="img", mininterval=2) as bar:
        for start in range(0, len(x), batch_size):
            batch = np.asarray(x[start:start + batch_size])
            out[start:start + len(batch)] = forward(tf.convert_to_tensor(batch)).numpy()
            bar.update(len(batch))
    return out


def extract_splits(
    model: keras.Model, x: dict[str, np.ndarray], out_dir: Path, batch_size: int, meta: dict
) -> dict:
    """Extract every split into `out_dir` (written to a temporary folder, then renamed)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    timings = {}
    try:
        for split in SPLITS:
            start = time.perf_counter()
            feats = extract(model, x[split], batch_size, desc=f"features {split}")
            seconds = time.perf_counter() - start
            np.save(tmp / f"{split}.npy", feats)
            rate = len(feats) / seconds if seconds > 0 else float("nan")
            timings[split] = {"images": int(len(feats)), "seconds": round(seconds, 2),
                              "images_per_second": round(rate, 1)}
            log.info("features %s: %d images in %.1f s (%.1f img/s)", split, len(feats), seconds, rate)
        meta = {**meta, "feature_dim": int(model.output_shape[-1]), "timings": timings}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta


def load_features(out_dir: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").exists():
        raise FileNotFoundError(f"{out_dir}: no cached features here; run `dvc repro features` first")
    feats = {s: np.load(out_dir / f"{s}.npy") for s in SPLITS}
    return feats, json.loads((out_dir / "meta.json").read_text())
