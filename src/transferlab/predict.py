"""`transferlab predict`: classify image files with a trained model.

    transferlab predict photos/ --top-k 3 --format csv     # the champion
    transferlab predict cat.jpg --version 4 --format json

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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.errors import ModelNotFound

log = logging.getLogger(__name__)


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
    from transferlab.registry import CLASSES_FILE

    n = int(model.output_shape[-1])
    for candidate in (folder / CLASSES_FILE, Path("data/prepared/classes.json")):
        if candidate.is_file():
            classes = json.loads(candidate.read_text())
            if len(classes) == n:
                return classes
            log.warning("%s lists %d classes, the model has %d outputs: ignored", candidate, len(classes), n)
    log.warning("no class names for this model: predictions are class indices")
    return [str(i) for i in range(n)]


def image_files(inputs: list[str]) -> list[Path]:
    """Files as given; folders walked recursively for image files (hidden ones skipped)."""
    from transferlab import data

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += data.image_files(path)
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
    from transferlab.folding import fold_batchnorm

    model = fold_batchnorm(loaded.model, trained=False)  # the same probabilities, computed faster
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
                probs = np.asarray(model.predict_on_batch(np.stack(batch)))
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


def load_for(model_path: str | None, name: str | None, alias: str, version: str | None,
             params_path: str | Path) -> LoadedModel:
    """The model a command names: a local file, or a registered name (default:
    tracking.model_name in the params file) by alias or version."""
    if model_path:
        return load(path=model_path)
    from transferlab import config

    return load(name or config.load(params_path).tracking.model_name, alias=alias, version=version)


def main(inputs: list[str], loaded: LoadedModel, top_k: int, fmt: str, output: str | None,
         batch_size: int) -> int:
    files = image_files(inputs)
    if not files:
        raise FileNotFoundError(f"no image files in {inputs}")
    log.info("predict: %d file(s) with %s", len(files), loaded.source)
    rows, skipped = predict(loaded, files, top_k, batch_size)
    text = format_rows(rows, fmt)
    if output:
        Path(output).write_text(text)
        log.info("predictions written to %s", output)
    else:
        sys.stdout.write(text)
    for item in skipped:
        log.warning("skipped %s (%s)", item["path"], item["error"])
    return 1 if skipped and not rows else 0
