"""`precision: auto`, measured: what it chooses on this machine, and the
fine-tune's training step in float32 and in mixed_bfloat16.

    python -m bench precision [--params params.yaml] [--input-size 160] [--rounds 3] [--steps 8]
        [--name precision] [--out DIR]

The fine-tune is the shipped one (params.yaml's backbone and finetune sections,
`train.trainer.build`) on random uint8 32x32 images (the speed does not depend
on the pixels). First `train.precision.select` runs as the finetune stage runs
it (the budget's probe in each policy) and its choice is recorded; then each
round times a median over `--steps` training steps of each policy in turn (the
order alternating), after two warm-up steps; the ratio is of the medians over
the rounds. Writes the run into docs/bench/<date>-<--name>/ (or --out):
results.json, README.md (a stub with the table), lscpu.txt; asserts nothing.
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
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--input-size", type=int, default=160, help="the fine-tune's input size (the hour's: 160)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    add_output_arguments(parser, "precision")
    a = parser.parse_args(argv)

    import keras
    import numpy as np

    from transferlab import backbones, config
    from transferlab.head import build_head
    from transferlab.train import precision, recipe, trainer

    params = config.load(a.params)
    b, f = params.backbone, params.finetune
    spec = backbones.get(b.name)
    r = recipe.Recipe.from_params(f, seed=params.seed, batch_size=f.batch_size,
                                  flip=f.augment.flip is not False)  # auto: flips, as CIFAR-10 keeps them
    body = backbones.build_body(b.name, a.input_size, b.weights)
    head = build_head(spec.feature_dim, 10, params.head.units, params.head.dropout)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16 * r.batch_size, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, len(x))

    def build(policy: str):
        trains = body
        if policy != "float32":
            trains = backbones.build_body(b.name, a.input_size, weights=None)
            trains.set_weights(body.get_weights())
        return trainer.build(spec, trains, head, r, y_train=y, y_val=y[:0], images=(x, x[:0]), image_size=32,
                             input_size=a.input_size)

    built = {}

    def probe(t):
        built[next(p for p in precision.CPU_CANDIDATES if p not in built)] = t
        return trainer.probe(t, r.batch_size)

    choice, _, _ = precision.select("auto", "cpu", None, build, probe)
    if not choice.timed:  # no bf16 instructions: select did not time; build both for the rounds
        built = {}
        for name in precision.CPU_CANDIDATES:
            with precision.policy(name):
                built[name] = build(name)
    for t in built.values():
        recipe.compile_model(t.model, r.optimizer, r.learning_rate, r.weight_decay, r.label_smoothing)
    xb, yb = x[:r.batch_size], y[:r.batch_size]
    rows = {name: [] for name in built}
    for i in range(a.rounds):
        for name in list(built) if i % 2 == 0 else list(built)[::-1]:
            rows[name].append(median_seconds(lambda: built[name].model.train_on_batch(xb, yb), a.steps))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rows.items()), flush=True)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    ratio = med["mixed_bfloat16"] / med["float32"]
    results = {
        "cpu": cpu_description(), "backbone": b.name, "weights": b.weights, "input_size": a.input_size,
        "unfreeze": f.unfreeze, "batch_size": r.batch_size, "bf16_instructions": precision.cpu_has_bf16(),
        "auto_chose": choice.precision, "auto_reason": choice.reason, "probe_step_seconds": choice.step_seconds,
        "rounds": rows, "train_step_seconds": med, "bf16_over_float32": ratio, "keras": keras.__version__,
    }
    text = "\n".join([
        f"# precision: auto ({b.name}, {a.input_size} px, top {f.unfreeze} blocks, batch {r.batch_size})", "",
        f"CPU: {results['cpu']}", "",
        f"`precision: auto` chose **{choice.precision}** ({choice.reason}).", "",
        f"{a.rounds} rounds, medians of {a.steps} training steps each; the table holds the median over rounds.", "",
        "| policy | probe's mean step (s) | training step (s) |", "| --- | --- | --- |",
        *(f"| {k} | {choice.step_seconds.get(k, float('nan')):.3f} | {med[k]:.3f} |" for k in med), "",
        f"mixed_bfloat16 / float32: {ratio:.2f}x the step time.",
    ])
    write_run(output_folder(a), "precision", {"auto_chose": choice.precision, "bf16_over_float32": round(ratio, 3),
                                              **{f"{k}_step_seconds": round(v, 4) for k, v in med.items()}},
              results, text + "\n", argv, cpu=results["cpu"])


if __name__ == "__main__":
    main()
