"""The from-scratch peer: airbench94 (Keller Jordan, 2024, "94% on CIFAR-10 in
3.29 Seconds on a Single GPU", arXiv 2404.00498), written by us in Keras.

    python -m bench scratch [--data ../shared/data/cifar10-jpeg.tar.gz] [--epochs 9.9] [--out DIR]
    python -m bench scratch --limit 5120 --epochs 1 --out /tmp/scratch   # a smoke run
    python -m bench recipes --recipes ours,scratch                       # beside ours

The paper's recipe, with the numbers of its reference script airbench94.py (`hyp`):
- data: the 50,000 training images normalised by their channel mean and std; each
  epoch a random translation by up to 2 px (reflect padding) and the alternating
  flip (a random half mirrored once, then every image mirrored on odd epochs);
- network, 1.97 M parameters: a frozen 2x2 conv without padding whose 24 filters
  are +/- the eigenvectors of the normalised 2x2 patches' covariance over 5,000
  images, scaled by 1/sqrt(eigenvalue + 5e-4), its bias trained for 3 epochs (the
  reference takes the pickle's first 5,000, a mix of classes; here a seeded
  random 5,000, as a folder is read class by class); GELU; three groups 64, 256,
  256 wide (conv3x3, maxpool 2, BatchNorm, GELU, conv3x3, BatchNorm, GELU),
  each conv's first filters the identity; maxpool 3, a linear layer without
  bias, times 1/9. BatchNorm: scale fixed at 1, eps 1e-12,
  statistics 0.6 old + 0.4 new (PyTorch's momentum=0.4, Keras's momentum=0.6);
- optimiser: batch 1024 (an epoch's partial batch dropped), 9.9 epochs (476
  steps), the batch's summed cross entropy with label smoothing 0.2, PyTorch's
  SGD (Nesterov momentum 0.85, L2 through the momentum). lr 11.5 and decay 0.0153
  are per 1024 examples: lr = 11.5 / (1024 * (1 + 1/(1 - 0.85))), decay = 0.0153
  * 1024 / the same; BatchNorm biases at 64x the lr; both times a triangle 0.2 ->
  1 (at 23 % of the steps) -> 0.07;
- Lookahead: from epoch 3, every 5 steps the weights (BatchNorm statistics too)
  become their EMA, decay 0.95^5 * (step / steps)^3, and are reset to it after
  every epoch;
- evaluation (TTA level 2): the logits of the image and its mirror (1/2) and of
  that pair translated 1 px up-left and down-right (1/4 each).

The clock starts once the data is decoded (the seeds' recipe starts from
prepared arrays, the paper from data on the GPU), counts the whitening and the
final TTA (as the paper does) and stops while each epoch's test accuracy (no
TTA) is measured. Writes the run through bench/common.py, or with --result the
recipe's result only, for bench/recipes.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Clock, add_output_arguments, output_folder, write_run  # noqa: E402

# airbench94.py's hyp
BATCH_SIZE, EPOCHS = 1024, 9.9
LR, WEIGHT_DECAY, MOMENTUM = 11.5, 0.0153, 0.85  # lr and decay per 1024 examples
BIAS_SCALER = 64.0  # the BatchNorm biases' lr multiplier
LABEL_SMOOTHING = 0.2
SCHEDULE = (0.2, 0.23, 0.07)  # the triangle: start, where it peaks at 1 (share of steps), end
WHITEN_BIAS_EPOCHS = 3
LOOKAHEAD_START, LOOKAHEAD_EVERY, LOOKAHEAD_DECAY, LOOKAHEAD_POWER = 3, 5, 0.95, 3.0
WIDTHS = (64, 256, 256)
BN_MOMENTUM, BN_EPSILON = 0.6, 1e-12
OUTPUT_SCALE = 1 / 9
TRANSLATE = 2  # pixels
WHITEN_IMAGES, WHITEN_EPS = 5000, 5e-4


# --------------------------------------------------------------------------- model


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images, in pixel units (float64, in chunks)."""
    pixels = x.reshape(-1, x.shape[-1])
    chunks = np.array_split(pixels, max(1, len(pixels) >> 22))
    total = sum(np.stack([c.sum(0, dtype=np.float64), np.square(c, dtype=np.float64).sum(0)]) for c in chunks)
    mean = total[0] / len(pixels)
    return mean, np.sqrt(total[1] / len(pixels) - mean ** 2)


def whitening_kernel(x: np.ndarray, mean: np.ndarray, std: np.ndarray, eps: float = WHITEN_EPS) -> np.ndarray:
    """The first layer's (2, 2, 3, 24) kernel: the eigenvectors of the (uncentred)
    covariance of the normalised images' 2x2 patches, largest eigenvalue first,
    each scaled by 1/sqrt(eigenvalue + eps), then the same 12 negated."""
    cov, count = np.zeros((12, 12)), 0
    for start in range(0, len(x), 500):
        z = (x[start:start + 500].astype(np.float64) - mean) / std
        h, w = z.shape[1] - 1, z.shape[2] - 1
        # (dy, dx, channel) order: a Keras kernel's (kh, kw, in) flattened
        patches = np.stack([z[:, dy:dy + h, dx:dx + w] for dy in (0, 1) for dx in (0, 1)], axis=-2).reshape(-1, 12)
        cov += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(cov / count)
    filters = eigenvectors[:, ::-1] / np.sqrt(eigenvalues[::-1] + eps)
    return np.concatenate([filters, -filters], axis=1).reshape(2, 2, 3, 24).astype(np.float32)


def partial_identity(shape, dtype=None):
    """PyTorch's default conv init (uniform, bound 1/sqrt(fan_in)), then the first
    `in` filters set to the identity: the reference's dirac_ init."""
    import keras

    w = np.array(keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")(shape, dtype))
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    w[..., :n] = 0
    w[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1
    return w


def conv_group(x, width: int, name: str):
    """conv3x3, maxpool 2, BatchNorm, GELU, then conv3x3, BatchNorm, GELU."""
    from keras import layers

    for i in (1, 2):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=partial_identity,
                          name=f"{name}_conv{i}")(x)
        if i == 1:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale=False, name=f"{name}_bn{i}")(x)
        x = layers.Activation("gelu", name=f"{name}_gelu{i}")(x)
    return x


def build_model(mean, std, classes: int = 10, widths=WIDTHS):
    """The network on 32x32 pixels in [0, 255] (module docstring); its whitening
    kernel is frozen and set by `set_whitening`."""
    import keras
    from keras import layers

    inputs = keras.Input((32, 32, 3), name="pixels")
    x = layers.Normalization(mean=mean, variance=np.square(std), name="normalize")(inputs)
    x = layers.Conv2D(24, 2, padding="valid", name="whiten")(x)
    x = layers.Activation("gelu", name="whiten_gelu")(x)
    for i, width in enumerate(widths, 1):
        x = conv_group(x, width, f"group{i}")
    x = layers.MaxPooling2D(3, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(classes, use_bias=False, name="logits",
                     kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))(x)
    model = keras.Model(inputs, layers.Rescaling(OUTPUT_SCALE, name="scale")(x), name="airbench94")
    model.get_layer("whiten").kernel.trainable = False
    return model


def set_whitening(model, x: np.ndarray, seed: int = 0) -> None:
    """The whitening kernel from a seeded random WHITEN_IMAGES of `x`. The
    reference takes its first 5,000, a mix of classes in the canonical pickle;
    an image folder is read class by class, where the first 5,000 would be one
    class (airplanes in CIFAR-10)."""
    norm = model.get_layer("normalize")
    mean, std = np.array(norm.mean).ravel(), np.sqrt(np.array(norm.variance).ravel())
    chosen = np.random.default_rng(seed).permutation(len(x))[:WHITEN_IMAGES]
    model.get_layer("whiten").kernel.assign(whitening_kernel(x[np.sort(chosen)], mean, std))


# --------------------------------------------------------------------------- training


def schedule(steps: int, start: float = SCHEDULE[0], peak: float = SCHEDULE[1], end: float = SCHEDULE[2]):
    """The lr multiplier of steps 0..steps: linear from `start` to 1 at
    int(peak * steps), then to `end`."""
    return np.interp(np.arange(steps + 1), [0, int(peak * steps), steps], [start, 1.0, end])


def total_steps(n: int, batch_size: int, epochs: float) -> int:
    return math.ceil(n // batch_size * epochs)


def rates(batch_size: int) -> dict:
    """The reference's rescaling of the per-1024-examples lr and decay for its
    summed loss and Nesterov momentum: each group's lr and its L2 coefficient."""
    kilostep = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr, decay = LR / kilostep, WEIGHT_DECAY * batch_size / kilostep
    return {"lr": lr, "l2": decay / lr, "bias_lr": lr * BIAS_SCALER, "bias_l2": decay / (lr * BIAS_SCALER)}


def augment(padded, shifts, flips):
    """Crops of the reflect-padded uint8 batch at `shifts` (row, column offsets
    into the padding), mirrored where `flips`, as float32 pixels."""
    import tensorflow as tf

    size = padded.shape[1] - 2 * TRANSLATE
    x = tf.gather(padded, shifts[:, :1] + tf.range(size), axis=1, batch_dims=1)
    x = tf.gather(x, shifts[:, 1:] + tf.range(size), axis=2, batch_dims=1)
    return tf.cast(tf.where(flips[:, None, None, None], tf.reverse(x, [2]), x), tf.float32)


def make_step(model, batch_size: int):
    """The training step and its whitening-bias gate (1: trained, 0: frozen; no
    decay or momentum either, as a PyTorch parameter without a gradient)."""
    import tensorflow as tf
    from keras import layers

    whiten_bias = model.get_layer("whiten").bias
    betas = [layer.beta for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    special = {id(v) for v in betas} | {id(whiten_bias)}
    others = [v for v in model.trainable_variables if id(v) not in special]
    r = rates(batch_size)
    variables = [*others, whiten_bias, *betas]
    groups = [(r["lr"], r["l2"])] * (len(others) + 1) + [(r["bias_lr"], r["bias_l2"])] * len(betas)
    buffers = [tf.Variable(tf.zeros(v.shape), trainable=False) for v in variables]
    gate = tf.Variable(1.0, trainable=False)
    classes = model.output_shape[-1]

    @tf.function(reduce_retracing=True)
    def step(padded, shifts, flips, labels, scale):
        x = augment(padded, shifts, flips)
        target = tf.one_hot(labels, classes) * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / classes
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(target, logits))
        grads = tape.gradient(loss, variables)
        for var, grad, buf, (lr, l2) in zip(variables, grads, buffers, groups):
            g = grad + l2 * var
            buf.assign(MOMENTUM * buf + g)
            rate = scale * lr * (gate if var is whiten_bias else 1.0)
            var.assign_sub(rate * (g + MOMENTUM * buf))
        return loss / tf.cast(tf.shape(labels)[0], tf.float32)

    return step, gate


def lookahead(model):
    """The reference's Lookahead: slow copies of every weight (BatchNorm's moving
    statistics too; all float32 here) and `update(decay)`, which moves them
    towards the model's weights and copies them back (decay 1: a reset)."""
    import tensorflow as tf

    slow = [tf.Variable(w.value, trainable=False) for w in model.weights]

    @tf.function
    def update(decay):
        for s, w in zip(slow, model.weights):
            s.assign_add((1 - decay) * (w - s))  # PyTorch's lerp_: a frozen weight stays exact
            w.assign(s)

    return update


def train(model, x: np.ndarray, y: np.ndarray, epochs: float = EPOCHS, batch_size: int = BATCH_SIZE, seed: int = 0,
          on_epoch=None) -> list[float]:
    """The recipe's training loop on uint8 images (whitening set beforehand);
    `on_epoch(epoch)` after each epoch. Returns each step's mean loss."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    padded = np.pad(x, ((0, 0), (TRANSLATE, TRANSLATE), (TRANSLATE, TRANSLATE), (0, 0)), mode="reflect")
    mirrored = rng.random(len(x)) < 0.5  # the alternating flip's random half
    per_epoch, steps = len(x) // batch_size, total_steps(len(x), batch_size, epochs)
    scales = schedule(steps).astype(np.float32)
    step, gate = make_step(model, batch_size)
    slow, losses = None, []
    for epoch in range(math.ceil(epochs)):
        gate.assign(float(epoch < WHITEN_BIAS_EPOCHS))
        order = rng.permutation(len(x))
        flips = mirrored ^ bool(epoch % 2)
        shifts = rng.integers(0, 2 * TRANSLATE + 1, (len(x), 2), dtype=np.int32)
        for b in range(per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss = step(padded[idx], shifts[idx], flips[idx], y[idx].astype(np.int32), tf.constant(scales[len(losses)]))
            losses.append(float(loss))
            if epoch >= LOOKAHEAD_START and len(losses) % LOOKAHEAD_EVERY == 0:
                if slow is None:
                    slow = lookahead(model)
                else:
                    slow(tf.constant(LOOKAHEAD_DECAY ** LOOKAHEAD_EVERY * (len(losses) / steps) ** LOOKAHEAD_POWER))
            if len(losses) >= steps:
                break
        if slow is not None:
            slow(tf.constant(1.0))
        if on_epoch:
            on_epoch(epoch)
    return losses


# --------------------------------------------------------------------------- evaluation


def predict(model, x: np.ndarray, tta: bool = False, batch_size: int = 1000) -> np.ndarray:
    """Logits of uint8 images, or with `tta` the reference's level 2 (module docstring)."""
    import tensorflow as tf

    def mirror(v):
        return 0.5 * model(v, training=False) + 0.5 * model(tf.reverse(v, [2]), training=False)

    @tf.function(reduce_retracing=True)
    def logits(batch):
        batch = tf.cast(batch, tf.float32)
        if not tta:
            return model(batch, training=False)
        padded = tf.pad(batch, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
        return 0.5 * mirror(batch) + 0.25 * (mirror(padded[:, :-2, :-2]) + mirror(padded[:, 2:, 2:]))

    return np.concatenate([logits(x[i:i + batch_size]).numpy() for i in range(0, len(x), batch_size)])


def accuracy(model, x, y, tta: bool = False) -> float:
    return float((predict(model, x, tta).argmax(1) == y).mean())


# --------------------------------------------------------------------------- the run


def load_cifar10(source: str, workdir: Path, seed: int, limit: int = 0):
    """Train and test uint8 arrays and class names through transferlab's data
    code (an archive, a folder or the CIFAR-10 URL); `limit`: a seeded random
    `limit` images of each split, for a smoke run."""
    from transferlab import data

    ds, _ = data.load_source(source, "auto", workdir, None, 32, 0.1, seed)  # 0.1: only without a test split
    arrays = [np.array(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)]
    ds.close()
    if limit:
        rng = np.random.default_rng(seed)
        for i in (0, 2):
            keep = np.sort(rng.permutation(len(arrays[i]))[:limit])
            arrays[i], arrays[i + 1] = arrays[i][keep], arrays[i + 1][keep]
    return (*arrays, ds.classes)


def run(source: str, workdir: Path, epochs: float, seed: int, limit: int = 0) -> dict:
    """Decode, then train and evaluate on the clock (module docstring); the
    recipe's result in bench/recipes.py's shape."""
    import keras

    keras.utils.set_random_seed(seed)
    t0 = time.perf_counter()
    x_train, y_train, x_test, y_test, classes = load_cifar10(source, workdir, seed, limit)
    load_seconds = time.perf_counter() - t0
    if len(y_train) < BATCH_SIZE:
        raise SystemExit(f"{source}: {len(y_train)} training images, fewer than one batch of {BATCH_SIZE}")
    clock, points = Clock(), []
    model = build_model(*channel_stats(x_train), classes=len(classes))
    set_whitening(model, x_train, seed)
    init_seconds = clock.now()  # the model built, the whitening set

    def probe(epoch: int) -> None:
        seconds, t = round(clock.now(), 2), time.perf_counter()
        acc = accuracy(model, x_test, y_test)
        clock.paused += time.perf_counter() - t
        points.append({"phase": "train", "epoch": epoch + 1, "seconds": seconds, "test_accuracy": round(acc, 5),
                       "val_accuracy": None})
        print(f"[probe] scratch epoch {epoch + 1}: test {acc:.4f} at {seconds:.0f} s", flush=True)

    losses = train(model, x_train, y_train, epochs, BATCH_SIZE, seed, on_epoch=probe)
    train_seconds = clock.now() - init_seconds
    tta = accuracy(model, x_test, y_test, tta=True)
    wall = clock.now()
    # the peer's headline, judged like its epochs (bench/report.py passes over phase "final" only)
    points.append({"phase": "tta", "epoch": math.ceil(epochs), "seconds": round(wall, 2),
                   "test_accuracy": round(tta, 5), "val_accuracy": None})
    print(f"[scratch] TTA test accuracy {tta:.4f} at {wall:.0f} s", flush=True)
    return {
        "recipe": "scratch",
        "config": f"airbench94 in Keras from scratch, {epochs:g} epochs of {len(y_train):,} images, batch "
                  f"{BATCH_SIZE}, TTA level 2",
        "after_head": None,
        "after_finetune": round(tta, 5),
        "wall_seconds": round(wall, 2),
        "stages": {"init": round(init_seconds, 2), "train": round(train_seconds, 2),
                   "tta": round(wall - init_seconds - train_seconds, 2)},
        "load_seconds": round(load_seconds, 2),  # decoding, not on the clock
        "extract_images_per_second": None,
        # the table's training column ("finetune"): here the whole network's training, from scratch
        "train_images_per_second": {"finetune": round(len(losses) * BATCH_SIZE / train_seconds, 1)},
        "steps": len(losses),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
        "points": points,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"),
                   help="CIFAR-10: an image-folder archive or folder, or the canonical archive or URL")
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="a seeded random N images per split (0: all); smoke runs")
    p.add_argument("--workdir", default=str(ROOT / "bench/work/scratch"), help="the extracted archive's cache")
    p.add_argument("--result", default=None, help="write only the recipe's result JSON here (bench/recipes.py)")
    add_output_arguments(p, "scratch")
    args = p.parse_args(argv)
    result = run(args.data, Path(args.workdir).resolve(), args.epochs, args.seed, args.limit)
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    rows = [f"| {q['phase']} | {q['epoch']} | {q['seconds']:.0f} s | {q['test_accuracy']:.2%} |"
            for q in result["points"]]
    text = "\n".join([result["config"], "", "| phase | epoch | wall time | test accuracy |", "| --- | --- | --- | --- |",
                      *rows, "", f"Peak RSS {result['peak_rss_gb']:.2f} GB; training "
                      f"{result['train_images_per_second']['finetune']:,.0f} images/s."]) + "\n"
    figures = {"scratch_test_accuracy": result["after_finetune"], "scratch_peak_rss_gb": result["peak_rss_gb"],
               "scratch_wall_minutes": round(result["wall_seconds"] / 60, 1)}
    write_run(output_folder(args), "scratch", figures, {"results": [result]}, text, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
