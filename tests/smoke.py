"""A fresh install's smoke run on one Python (.ci/run runs it on 3.12 and 3.13,
each in its own virtualenv): the tiny config through `dvc repro` in a temporary
copy of the project, then the registered model through `mlflow.pyfunc` in a
process where transferlab cannot be imported. Not collected by pytest.

    python tests/smoke.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import tinyproject

PYFUNC = """
import sys; sys.modules["transferlab"] = None  # as on a machine without the project
import json, numpy as np, mlflow
model = mlflow.pyfunc.load_model("models:/{name}@champion")
probs = np.asarray(model.predict(np.load("x.npy")))
json.dump(probs.tolist(), open("probs.json", "w"))
"""


def main() -> int:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transferlab-smoke-") as tmp:
        dest, env = tinyproject.make(Path(tmp) / "project")
        out = tinyproject.run(["dvc", "repro"], dest, env)
        stages = [s for s in ("prepare", "features", "head", "finetune", "evaluate")
                  if f"Running stage '{s}'" in out]
        assert len(stages) == 5, f"dvc repro ran {stages}:\n{out[-3000:]}"
        accuracy = json.loads((dest / "metrics/evaluate.json").read_text())["test_accuracy"]

        # the CLI's predictions of the test images, and those images as the model takes them
        from transferlab import data

        files = sorted((dest / "tiny-images" / "test").rglob("*.png"))
        classes = json.loads((dest / "data/prepared/classes.json").read_text())
        tinyproject.run(["transferlab", "predict", *map(str, files), "--top-k", str(len(classes)),
                         "--format", "json", "--output", "predict.json"], dest, env)
        rows = json.loads((dest / "predict.json").read_text())
        expected = np.array([[next(p["probability"] for p in r["predictions"] if p["label"] == c)
                              for c in classes] for r in rows])
        size = tinyproject.TINY["data"]["image_size"]
        np.save(dest / "x.npy", np.stack([data.decode_image(f, size) for f in files]))
        name = tinyproject.TINY["tracking"]["model_name"]
        env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}
        tinyproject.run([sys.executable, "-c", PYFUNC.format(name=name)], dest, env)
        probs = np.array(json.loads((dest / "probs.json").read_text()))
        np.testing.assert_allclose(probs, expected, atol=1e-5)
    print(f"smoke passed on Python {platform.python_version()}: dvc repro (5 stages, test accuracy "
          f"{accuracy:.3f}) and the registered model through mlflow.pyfunc ({len(files)} images) "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
