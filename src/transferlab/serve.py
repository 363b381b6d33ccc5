"""Using a trained model: predict on image files, export for serving.

    transferlab predict photos/ --top-k 3 --format csv     # the champion
    transferlab predict cat.jpg --version 4 --format json
    transferlab export --out exports/                       # SavedModel + TFLite

The model comes from the Model Registry (`models:/<name>@champion` by default,
or a version), or from a local .keras file with --model-path. It takes uint8
images of the size it was trained on (upscaling and preprocessing are inside),
so an image only needs decoding and resizing to that size.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """A registered model, alias, version or file that does not exist."""


@dataclass
class LoadedModel:
    model: object  # keras.Model
    classes: list[str]
    source: str  # what was loaded, for logs and reports

    @property
    def image_size(self) -> int:
        return int(self.model.input_shape[1])


def model_uri(name: str, alias: str | None = "champion", version: str | None = None) -> str:
    return f"models:/{name}/{version}" if version else f"models:/{name}@{alias}"


def load(name: str | None = None, alias: str | None = "champion", version: str | None = None,
         path: str | Path | None = None) -> LoadedModel:
    """A registered model (by alias or version) or a local .keras file, with its
    class names. Keras models are loaded with safe_mode (no arbitrary code)."""
    import keras

    from transferlab import tracking

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such model file (a .keras file, e.g. models/finetune/model.keras)")
        model = keras.saving.load_model(path, safe_mode=True)
        return LoadedModel(model, _classes_near(path.parent, model), str(path))
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking.tracking_uri())
    uri = model_uri(name, alias, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        except MlflowException as exc:
            raise ModelNotFound(
                f"{uri} in {tracking.tracking_uri()}: {exc.message}. List the registered versions with "
                f"`mlflow ui` (Models tab), or pass --version N or --model-path FILE"
            ) from None
        keras_files = sorted(local.rglob("*.keras"))
        if not keras_files:
            raise ModelNotFound(f"{uri}: no .keras file among the model's artifacts")
        model = keras.saving.load_model(keras_files[0], safe_mode=True)
        classes = _classes_near(local, model)
    return LoadedModel(model, classes, uri)


def _classes_near(folder: Path, model) -> list[str]:
    from transferlab.tracking import CLASSES_FILE

    n = int(model.output_shape[-1])
    for candidate in (folder / CLASSES_FILE, Path("data/prepared/classes.json")):
        if candidate.is_file():
            classes = json.loads(candidate.read_text())
            if len(classes) == n:
                return classes
            log.warning("%s lists %d classes, the model has %d outputs: ignored", candidate, len(classes), n)
    log.warning("no class names for this model: predictions are class indices")
    return [str(i) for i in range(n)]


# --------------------------------------------------------------------------- predict


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given; folders walked recursively for image files (hidden ones skipped)."""
    from transferlab.data import IMAGE_EXTENSIONS

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [Path(dirpath) / f for f in sorted(filenames)
                        if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return out


def predict(loaded: LoadedModel, files: list[Path], top_k: int = 3, batch_size: int = 64,
            progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Top-k (label, probability) per decodable file; undecodable files are
    returned separately with the reason, never silently dropped."""
    from tqdm import tqdm

    from transferlab.data import decode_image

    k = max(1, min(top_k, len(loaded.classes)))
    rows, skipped = [], []
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress, mininterval=1) as bar:
        for start in range(0, len(files), batch_size):
            batch, names = [], []
            for path in files[start:start + batch_size]:
                try:
                    batch.append(decode_image(path, loaded.image_size))
                    names.append(path)
                except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
                    skipped.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
            if batch:
                probs = np.asarray(loaded.model.predict_on_batch(np.stack(batch)))
                for path, p in zip(names, probs):
                    top = np.argsort(-p)[:k]
                    rows.append({"path": str(path), "predictions": [
                        {"label": loaded.classes[i], "probability": round(float(p[i]), 6)} for i in top]})
            bar.update(len(files[start:start + batch_size]))
    return rows, skipped


def format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    k = max((len(r["predictions"]) for r in rows), default=0)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "probability")]])
    for r in rows:
        writer.writerow([r["path"], *[v for p in r["predictions"] for v in (p["label"], p["probability"])]])
    return buf.getvalue()


# --------------------------------------------------------------------------- export


def export(loaded: LoadedModel, out_dir: Path, sample: np.ndarray) -> dict:
    """SavedModel, TFLite float32 and TFLite dynamic-range int8, each checked
    against the Keras model on `sample` (uint8 images). Float exports must agree
    to 1e-4 in probability; the int8 one reports its top-1 agreement."""
    import tensorflow as tf

    from transferlab.data import atomic_dir

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
    try:  # LiteRT, tf.lite.Interpreter's successor, when installed
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
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
