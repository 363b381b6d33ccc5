"""Throughput choices, measured: our feature extraction against a plain
`model.predict`, batch size, tf.data prefetch and caching, XLA, thread settings,
and the fine-tune's training step by batch size, with and without XLA.

    python -m bench throughput [--backbone efficientnet_lite0] [--input-size 96] [--images 2048]
        [--unfreeze 5] [--train-batch-sizes 64,128]

Every row runs the same model on the same uint8 32x32 images (random pixels:
the speed does not depend on them) after one warm-up batch. Thread settings
need a fresh TensorFlow, so each runs in its own process. Writes the run into
docs/bench/<date>-<--name>/ (or --out): results.json (every row), README.md (a
stub with the table), throughput.csv and lscpu.txt; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, output_folder, write_run  # noqa: E402


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def extraction_rows(backbone: str, input_size: int, weights: str, n: int, quick: bool) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    from transferlab import backbones, features

    model = backbones.build_feature_extractor(backbone, 32, input_size, weights)
    x = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    out = np.empty((n, model.output_shape[-1]), np.float32)
    rows = []

    def row(name, rate, **extra):
        rows.append({"what": "extraction", "variant": name, "images_per_second": round(rate, 1), **extra})
        print(f"{name:45s} {rate:8.1f} img/s", flush=True)

    sizes = (64,) if quick else (32, 64, 128, 256)
    for bs in sizes:
        features.extract_into(model, x[:bs], [out[:bs]], bs, "warm-up")
        row(f"ours (numpy batches -> tf.function), batch {bs}",
            timed(lambda: features.extract_into(model, x, [out], bs, "ours"), n), batch_size=bs)
    model.predict(x[:64], batch_size=64, verbose=0)
    row("plain model.predict, batch 64", timed(lambda: model.predict(x, batch_size=64, verbose=0), n),
        batch_size=64)
    if quick:
        return rows

    forward = tf.function(lambda b: model(b, training=False), reduce_retracing=True)

    def run_dataset(ds):
        for batch in ds:
            forward(batch).numpy()

    base = tf.data.Dataset.from_tensor_slices(x).batch(64)
    run_dataset(base.take(1))
    row("tf.data, batch 64, no prefetch", timed(lambda: run_dataset(base), n), batch_size=64)
    pre = base.prefetch(tf.data.AUTOTUNE)
    row("tf.data, batch 64, prefetch AUTOTUNE", timed(lambda: run_dataset(pre), n), batch_size=64)
    cached = base.cache().prefetch(tf.data.AUTOTUNE)
    run_dataset(cached)  # the first pass fills the cache
    row("tf.data, batch 64, cache + prefetch (2nd pass)", timed(lambda: run_dataset(cached), n), batch_size=64)

    xla = tf.function(lambda b: model(b, training=False), jit_compile=True)
    start = time.perf_counter()
    xla(tf.convert_to_tensor(x[:64])).numpy()
    compile_s = time.perf_counter() - start

    def run_xla():
        for i in range(0, n - n % 64, 64):
            xla(tf.convert_to_tensor(x[i:i + 64])).numpy()

    row("XLA (jit_compile=True), batch 64", timed(run_xla, n - n % 64), batch_size=64,
        compile_seconds=round(compile_s, 1))
    return rows


def training_rows(backbone: str, input_size: int, n: int, unfreeze: int, batch_sizes: list[int],
                  jit_options: tuple[bool, ...] = (False, True)) -> list[dict]:
    """The fine-tune's training step (the full path: augmentation, the frozen
    lower blocks, the unfrozen ones and the head) at each batch size: the median
    time of `n // batch` steps after two warm-up steps, as images per second."""
    import keras
    import numpy as np

    from transferlab import backbones, head
    from transferlab.train import surgery

    rows = []
    spec = backbones.get(backbone)
    rng = np.random.default_rng(0)
    for bs in batch_sizes:
        x = rng.integers(0, 255, (bs, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, bs)
        for jit in jit_options:
            keras.utils.set_random_seed(0)
            body = backbones.build_body(backbone, input_size, weights=None)
            surgery.set_trainable(spec, body, unfreeze)
            model = surgery.assemble(spec, body, head.build_head(spec.feature_dim, 10, 512, 0.5), 32, input_size,
                                      surgery.augmentation(True, 0.1, seed=0))
            model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"], jit_compile=jit)
            start = time.perf_counter()
            model.train_on_batch(x, y)  # compile
            compile_s = time.perf_counter() - start
            model.train_on_batch(x, y)
            times = []
            for _ in range(max(2, n // bs)):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                times.append(time.perf_counter() - start)
            rate = bs / float(np.median(times))
            # Keras falls back to jit_compile=False (with a warning) for layers XLA cannot take
            name = f"fine-tune step, unfreeze {unfreeze}, batch {bs}, jit_compile={model.jit_compile}"
            if jit and not model.jit_compile:
                name += " (asked for True: not supported by this model)"
            rows.append({"what": "training", "variant": name, "images_per_second": round(rate, 1),
                         "batch_size": bs, "compile_seconds": round(compile_s, 1)})
            print(f"{name:45s} {rate:8.1f} img/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--weights", default="none", help="speed does not depend on the weights' values")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--train-images", type=int, default=512)
    p.add_argument("--unfreeze", type=int, default=5)
    p.add_argument("--train-batch-sizes", default="64,128", help="comma-separated batch sizes of the training rows")
    p.add_argument("--threads", default="", help=argparse.SUPPRESS)  # "intra,inter": one child process
    p.add_argument("--quick", action="store_true", help="a few rows only (the test suite's smoke run)")
    add_output_arguments(p, "throughput")
    args = p.parse_args(argv)

    if args.threads:
        import tensorflow as tf

        intra, inter = (int(v) for v in args.threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        rows = extraction_rows(args.backbone, args.input_size, args.weights, args.images, quick=True)
        print("ROWS " + json.dumps([r for r in rows if "ours" in r["variant"]]))
        return 0

    rows = extraction_rows(args.backbone, args.input_size, args.weights, args.images, args.quick)
    if not args.quick:
        for threads in dict.fromkeys(("1,1", "1,2", "2,1", "2,2", f"{os.cpu_count()},{os.cpu_count()}")):
            proc = subprocess.run([sys.executable, __file__, "--threads", threads, "--backbone", args.backbone,
                                   "--input-size", str(args.input_size), "--images", str(args.images)],
                                  capture_output=True, text=True, check=True)
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))
            for r in json.loads(line[5:]):
                r["variant"] = f"threads intra,inter = {threads}: " + r["variant"]
                print(f"{r['variant']:45s} {r['images_per_second']:8.1f} img/s", flush=True)
                rows.append(r)
    batch_sizes = [int(b) for b in args.train_batch_sizes.split(",")]
    if args.quick:  # one cheap training row: the training step still builds and runs
        rows += training_rows(args.backbone, args.input_size, 2 * batch_sizes[0], args.unfreeze, batch_sizes[:1],
                              jit_options=(False,))
    else:
        rows += training_rows(args.backbone, args.input_size, args.train_images, args.unfreeze, batch_sizes)

    ours = next(r for r in rows if r["variant"].startswith("ours") and r["batch_size"] == 64)
    plain = next(r for r in rows if r["variant"].startswith("plain model.predict"))
    ratio = ours["images_per_second"] / plain["images_per_second"]
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"{args.backbone} at {args.input_size} px, {args.images} images (training: {args.train_images}), "
              f"{os.cpu_count()} CPU cores; ours / plain model.predict at batch 64 = {ratio:.2f}x")
    lines = [header, "", "| what | variant | images/s | compile s |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['what']} | {r['variant']} | {r['images_per_second']:,.1f} | {r.get('compile_seconds', '')} |"
              for r in rows]
    with (out / "throughput.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["what", "variant", "images_per_second", "batch_size", "compile_seconds"])
        w.writeheader()
        w.writerows(rows)
    write_run(out, "throughput", {"ratio_ours_to_predict": round(ratio, 3)}, {"rows": rows}, "\n".join(lines) + "\n",
              argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
