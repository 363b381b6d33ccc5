"""`transferlab export`: SavedModel, TFLite float32 and TFLite dynamic-range int8,
each checked against the Keras model.

    transferlab export --out exports/          # the champion
    transferlab export --model-path models/finetune/model.keras
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from transferlab.predict import LoadedModel

log = logging.getLogger(__name__)


def export(loaded: LoadedModel, out_dir: Path, sample: np.ndarray) -> dict:
    """SavedModel, TFLite float32 and TFLite dynamic-range int8, each checked
    against the Keras model on `sample` (uint8 images). Float exports must agree
    to 1e-4 in probability; the int8 one reports its top-1 agreement."""
    import tensorflow as tf

    from transferlab.files import atomic_dir

    reference = np.asarray(loaded.model.predict(sample, verbose=0))
    report: dict = {"source": loaded.source, "images_checked": int(len(sample)), "formats": {}}
    with atomic_dir(out_dir) as tmp:
        saved = tmp / "saved_model"
        loaded.model.export(str(saved), format="tf_saved_model", verbose=False)
        reloaded = tf.saved_model.load(str(saved))  # keep a reference: serve uses its variables
        got = np.asarray(reloaded.serve(tf.constant(sample.astype(np.float32))))
        report["formats"]["saved_model"] = _agreement(reference, got, saved.name)
        for name, quantize in (("model_float32.tflite", False), ("model_int8_dynamic.tflite", True)):
            converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
            if quantize:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            (tmp / name).write_bytes(converter.convert())
            report["formats"][name] = _agreement(reference, _run_tflite(tmp / name, sample), name)
            report["formats"][name]["bytes"] = (tmp / name).stat().st_size
        (tmp / "classes.json").write_text(json.dumps(loaded.classes) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    bad = [name for name, r in report["formats"].items()
           if "int8" not in name and r["max_abs_diff"] > 1e-4]
    if bad:
        raise RuntimeError(f"exported {bad} disagree with the Keras model beyond 1e-4: {report['formats']}")
    return report


def _run_tflite(path: Path, sample: np.ndarray) -> np.ndarray:
    """The TFLite file run as a device runs it: in LiteRT, the runtime that
    replaces the deprecated tf.lite.Interpreter (a dependency: ai-edge-litert)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [len(sample), *sample.shape[1:]])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], sample.astype(inp["dtype"]))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def _agreement(reference: np.ndarray, got: np.ndarray, name: str) -> dict:
    if got.shape != reference.shape:
        raise RuntimeError(f"{name}: output shape {got.shape}, the Keras model's is {reference.shape}")
    return {"max_abs_diff": float(np.abs(got - reference).max()),
            "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean())}


def main(loaded: LoadedModel, out: str | Path, images: int, prepared_dir: Path) -> int:
    """Exports checked on the first `images` test images (random ones without prepared data)."""
    from transferlab import data

    if (prepared_dir / "manifest.json").exists():
        sample = np.asarray(data.load_prepared(prepared_dir).x["test"][:images])
    else:
        log.warning("no %s: checking the exports on random images", prepared_dir)
        sample = np.random.default_rng(0).integers(0, 256, (images, loaded.image_size,
                                                             loaded.image_size, 3), dtype=np.uint8)
    report = export(loaded, Path(out), sample)
    for name, r in report["formats"].items():
        log.info("export %s: max |p - p_keras| %.2e, top-1 agreement %.4f", name, r["max_abs_diff"],
                 r["top1_agreement"])
    log.info("exported %s to %s", loaded.source, out)
    return 0
