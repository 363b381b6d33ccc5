"""Using a model: predict on files and folders (from a file or the registry),
export to SavedModel and TFLite with the agreement check, and the UI helper's
binding."""

import json
import logging

import mlflow
import numpy as np
import pytest

import synth
from transferlab import backbones, cli, export, head, predict, registry, tracking, ui
from transferlab.train import surgery
from transferlab.tta import with_tta

CLASSES = synth.CLASSES


@pytest.fixture
def model_file(in_tmp):
    """A tiny classifier (uint8 16x16 images in), saved as .keras with classes.json."""
    spec = backbones.get("vgg16")
    body = backbones.build_body("vgg16", 32, "none")
    model = surgery.assemble(spec, body, head.build_head(512, 3, 8, 0.0), 16, 32)
    (in_tmp / "m").mkdir()
    model.save(in_tmp / "m" / "model.keras")
    (in_tmp / "m" / "classes.json").write_text(json.dumps(CLASSES))
    return in_tmp / "m" / "model.keras", model


@pytest.fixture
def photos(in_tmp):
    root = synth.make_image_folder(in_tmp / "photos", per_class=2, split=False, size=24)
    (root / "circle" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_predict_gives_the_models_top_k_with_class_names(model_file, photos):
    path, model = model_file
    loaded = predict.load(path=path)
    files = predict.image_files([str(photos)])
    assert len(files) == 7 and not any(f.name.startswith(".") for f in files)
    rows, skipped = predict.predict(loaded, files, top_k=2, batch_size=4, progress=False)
    assert [s["path"] for s in skipped] == [str(photos / "circle" / "broken.jpg")]
    assert len(rows) == 6
    from transferlab.data import decode_image

    for row in rows:
        expected = model.predict(decode_image(row["path"], 16)[None], verbose=0)[0]
        order = np.argsort(-expected)[:2]
        assert [p["label"] for p in row["predictions"]] == [CLASSES[i] for i in order]
        assert row["predictions"][0]["probability"] == pytest.approx(expected[order[0]], abs=1e-5)
    csv_text = predict.format_rows(rows, "csv").splitlines()
    assert csv_text[0] == "path,label_1,probability_1,label_2,probability_2" and len(csv_text) == 7


def test_predict_cli_reads_the_registry_by_alias_and_version(model_file, photos, in_tmp, caplog):
    _, model = model_file
    x = np.stack([synth.class_image(i, np.random.default_rng(i), 16) for i in range(3)])
    tracking.setup("serve-test")  # this store, and an experiment in it (not one a test before set)
    with mlflow.start_run():
        uri = registry.log_keras_model(model, x[:2], model.predict(x[:2], verbose=0), CLASSES)
    registry.register_and_promote(uri, "tiny", {"test_accuracy": 0.5})
    out = in_tmp / "pred.json"
    assert cli.main(["predict", str(photos / "square"), "--model", "tiny", "--format", "json",
                     "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(len(r["predictions"]) == 3 for r in rows)
    assert {p["label"] for p in rows[0]["predictions"]} == set(CLASSES)
    assert cli.main(["predict", str(photos / "square"), "--model", "tiny", "--version", "1"]) == 0
    assert cli.main(["predict", str(photos), "--model", "tiny", "--version", "7"]) == 1  # no such version
    assert "models:/tiny/7" in caplog.text


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_export_matches_the_keras_model(model_file, in_tmp, tta, monkeypatch):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    path, model = model_file
    if tta == "flip":  # what evaluate registers by default
        with_tta(model, "flip").save(path)
    loaded = predict.load(path=path)
    sample = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)

    def deprecated(*args, **kwargs):
        raise AssertionError("export ran tf.lite.Interpreter, deprecated for LiteRT")

    monkeypatch.setattr(tf.lite, "Interpreter", deprecated)
    report = export.export(loaded, in_tmp / "exports", sample)
    f = report["formats"]
    assert f["saved_model"]["max_abs_diff"] < 1e-5
    assert f["model_float32.tflite"]["max_abs_diff"] < 1e-4
    assert f["model_int8_dynamic.tflite"]["bytes"] < f["model_float32.tflite"]["bytes"] / 2
    # the exported files themselves, run here (the TFLite one in LiteRT, as a device runs
    # it), not only the report export wrote about them
    expected = loaded.model.predict(sample, verbose=0)
    saved = tf.saved_model.load(str(in_tmp / "exports" / "saved_model"))
    np.testing.assert_allclose(saved.serve(tf.constant(sample.astype(np.float32))).numpy(), expected, atol=1e-5)
    interpreter = Interpreter(model_path=str(in_tmp / "exports" / "model_float32.tflite"))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(sample.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], sample.astype(inp["dtype"]))
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert json.loads((in_tmp / "exports" / "classes.json").read_text()) == CLASSES


def test_ui_builds_a_new_store_before_the_server_starts(in_tmp, monkeypatch):
    """On a project with no store yet, `transferlab ui` builds mlflow.db itself
    (atomically) before the server starts, rather than leaving it to the server's
    migrations, which a Ctrl-C at start-up would leave half done."""
    import subprocess

    seen = {}

    def fake_run(cmd, *a, **kw):
        seen["db"] = (in_tmp / "mlflow.db").exists()
        seen["partials"] = list(in_tmp.glob("mlflow.db.creating-*"))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert not (in_tmp / "mlflow.db").exists()
    assert ui.main(in_tmp / "params.yaml", "127.0.0.1", 5000) == 0
    assert seen == {"db": True, "partials": []}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    assert client.search_experiments(max_results=1)  # a migrated store


def test_ui_binds_loopback_by_default_and_warns_when_exposed(in_tmp, caplog):
    args = cli._parser().parse_args(["ui"])
    with caplog.at_level(logging.WARNING):
        cmd = ui.ui_command(args.host, args.port)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and not caplog.records
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{in_tmp / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING):
        ui.ui_command("0.0.0.0", 5000)
    assert "no authentication" in caplog.text
