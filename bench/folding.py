"""BatchNorm folding, measured: the fine-tune's training step and the stages'
inference with and without the frozen BatchNorm folded into the convolutions
(`transferlab.folding`), in one process, the two interleaved round by round.

    python -m bench folding [--backbone efficientnet_lite0] [--weights imagenet] [--input-size 160]
        [--unfreeze 6] [--rounds 3] [--name folding] [--out DIR]

The training step is the pipeline's (`train.trainer.build`: flip and shift
augmentation, AdamW, label smoothing 0.15, batch 128) on random uint8 32x32
images (the speed does not depend on the pixels); unfolded, the same model
assembled from the same body and head. Inference is the features stage's and
evaluate's: the classifier at batch 32 through a compiled forward. Each round
times a median over `--steps` steps after two warm-up steps, for each variant in
turn; the ratio is of the medians over the rounds. The folded and unfolded
outputs are compared too. Writes the run into docs/bench/<date>-<--name>/ (or
--out): results.json, README.md (a stub with the table), lscpu.txt; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_arguments, cpu_description, median_seconds, output_folder, write_run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--input-size", type=int, default=160)
    parser.add_argument("--unfreeze", default="6")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    add_output_arguments(parser, "folding")
    a = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    from transferlab import backbones
    from transferlab.train import recipe, surgery, trainer
    from transferlab.folding import FoldedConvBN, fold_batchnorm

    unfreeze = a.unfreeze if a.unfreeze == "all" else int(a.unfreeze)
    spec = backbones.get(a.backbone)
    body = backbones.build_body(a.backbone, a.input_size, a.weights)
    head = keras.Sequential([keras.Input((spec.feature_dim,)), keras.layers.Dense(512, activation="relu"),
                             keras.layers.Dropout(0.3), keras.layers.Dense(10, activation="softmax",
                                                                           name="predictions")], name="head")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (128, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 128)
    # the pipeline's recipe as this measured it: flip and shift, AdamW, label smoothing 0.15, batch 128
    r = recipe.Recipe(unfreeze=unfreeze, batch_size=128, seed=0, optimizer="adamw", learning_rate=1e-4,
                      weight_decay=3e-5, schedule="cosine", warmup_epochs=0.0, label_smoothing=0.15, ema=0.0,
                      train_bn=False, train_depthwise=True, flip=True, augment={"flip": True, "shift": 0.1})
    t = trainer.build(spec, body, head, r, y_train=y, y_val=y[:0], images=(x, x[:0]), image_size=32,
                      input_size=a.input_size)
    n_folded = sum(isinstance(layer, FoldedConvBN) for layer in t.model.get_layer(body.name).layers)
    unfolded = surgery.assemble(spec, body, head, 32, a.input_size, surgery.augmentation(flip=True, shift=0.1,
                                                                                           seed=0))
    train = {"folded": t.model, "unfolded": unfolded}
    for model in train.values():
        recipe.compile_model(model, "adamw", 1e-4, 3e-5, 0.15)
    plain = surgery.assemble(spec, body, head, 32, a.input_size)
    infer = {"folded": fold_batchnorm(plain, trained=False), "unfolded": plain}
    forward = {name: tf.function(lambda b, m=m: m(b, training=False)) for name, m in infer.items()}
    batch = tf.convert_to_tensor(x[:32])
    difference = float(np.abs(np.asarray(forward["folded"](batch)) - np.asarray(forward["unfolded"](batch))).max())

    rows = {f"{kind} {name}": [] for kind in ("train", "infer") for name in ("folded", "unfolded")}
    for r in range(a.rounds):
        for name in ("unfolded", "folded") if r % 2 == 0 else ("folded", "unfolded"):
            rows[f"train {name}"].append(median_seconds(lambda: train[name].train_on_batch(x, y), a.steps))
            rows[f"infer {name}"].append(median_seconds(lambda: forward[name](batch), 4 * a.steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)

    med = {k: float(np.median(v)) for k, v in rows.items()}
    results = {
        "cpu": cpu_description(), "backbone": a.backbone, "weights": a.weights, "input_size": a.input_size,
        "unfreeze": a.unfreeze, "folded_pairs": n_folded, "rounds": rows,
        "train_step_seconds": {"folded": med["train folded"], "unfolded": med["train unfolded"]},
        "train_speedup": med["train unfolded"] / med["train folded"],
        "inference_batch32_seconds": {"folded": med["infer folded"], "unfolded": med["infer unfolded"]},
        "inference_speedup": med["infer unfolded"] / med["infer folded"],
        "max_abs_output_difference": difference,
    }
    text = "\n".join([
        f"# BatchNorm folding ({a.backbone}, {a.input_size} px, top {a.unfreeze} blocks unfrozen)", "",
        f"CPU: {results['cpu']}", "",
        f"{n_folded} convolution + BatchNorm pairs folded; {a.rounds} rounds, medians of {a.steps} steps each "
        f"(inference {4 * a.steps}); the table holds the median over rounds.", "",
        "| what | unfolded | folded | speed-up |", "| --- | --- | --- | --- |",
        f"| training step, batch 128 (s) | {med['train unfolded']:.3f} | {med['train folded']:.3f} | "
        f"{results['train_speedup']:.2f}x |",
        f"| inference, batch 32 (s) | {med['infer unfolded']:.4f} | {med['infer folded']:.4f} | "
        f"{results['inference_speedup']:.2f}x |", "",
        f"Largest difference between the two models' probabilities on one batch: {difference:.2e}.",
    ])
    write_run(output_folder(a), "folding", {k: results[k] for k in (
        "train_speedup", "inference_speedup", "max_abs_output_difference", "folded_pairs")}, results, text + "\n", argv,
        cpu=results["cpu"])


if __name__ == "__main__":
    main()
